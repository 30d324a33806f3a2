"""The code search service on awkward input and settings: queries with no lexical terms in every
ranking mode, token settings refused at start, malformed Authorization headers, and searches that
answer while a reindex is encoding."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from code_search_repo import make_repository
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from mbert_retrieval.code.encoders import load_encoder
from mbert_retrieval.code.index import build_code_index
from mbert_retrieval.server import CodeSearchService, create_app
from mbert_retrieval.server.run import check_token

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKEN = "a-long-enough-test-token"
# Stopwords, one-letter words, punctuation, an emoji, control characters: BM25 keeps no term of them.
TERMLESS_QUERIES = ["the", "a", "x", "_", "?!", "()", "\U0001f600", "\x00", "\x00\x00", "the a of", "--- ..."]
MODES = [None, "hybrid", "dense", "bm25"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, hf_mlm_dir) -> Path:
    tmp = tmp_path_factory.mktemp("hardening")
    repo = make_repository(tmp / "repo", ("json",))
    model = load_encoder(str(hf_mlm_dir))
    build_code_index(repo, tmp / "index", model, model_name="tiny", show_progress=False)
    return tmp / "index"


@pytest.fixture(scope="module")
def reranking_client(index_dir, hf_mlm_dir):
    from mbert_retrieval.models.cross_encoder import CrossEncoder

    service = CodeSearchService(
        index_dir,
        load_encoder(str(hf_mlm_dir)),
        model_name="tiny",
        reranker=CrossEncoder.from_pretrained(hf_mlm_dir),
    )
    with TestClient(create_app(service, token=TOKEN)) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield service, client
    service.close()


def hits(client, **body) -> list[tuple[str, int]]:
    response = client.post("/search", json=body)
    assert response.status_code == 200, (body, response.status_code, response.text)
    return [(h["path"], h["start_line"]) for h in response.json()["hits"]]


def test_the_queries_really_have_no_bm25_terms(reranking_client):
    service, _ = reranking_client
    assert service.index.bm25.tokenize(TERMLESS_QUERIES) == [[] for _ in TERMLESS_QUERIES]


@pytest.mark.parametrize("rerank", [False, True], ids=["plain", "reranked"])
@pytest.mark.parametrize("mode", MODES, ids=[str(m) for m in MODES])
def test_termless_queries_answer_in_every_mode(reranking_client, mode, rerank):
    """bm25 finds nothing; hybrid falls back to the dense ranking alone; none is a 500."""
    _, client = reranking_client
    for query in TERMLESS_QUERIES:
        found = hits(client, query=query, k=5, mode=mode, rerank=rerank)
        if mode == "bm25":
            assert found == [], query
        else:
            assert len(found) == 5, query
        if mode in (None, "hybrid") and not rerank:
            assert found == hits(client, query=query, k=5, mode="dense", rerank=False), query


def test_queries_with_terms_still_use_both_rankings(reranking_client):
    _, client = reranking_client
    query = "scanstring"
    lexical = hits(client, query=query, k=3, mode="bm25", rerank=False)
    assert lexical and lexical[0][0] in ("json/decoder.py", "json/scanner.py")
    assert lexical[0] in hits(client, query=query, k=10, mode="hybrid", rerank=False)


# --------------------------------------------------------------------------------------- authorization


def test_an_empty_token_is_refused_when_the_app_is_created(reranking_client):
    service, _ = reranking_client
    for token in ("", "  ", "\t\n"):
        with pytest.raises(ValueError, match="token is empty"):
            create_app(service, token=token)


@pytest.mark.parametrize(
    "headers, status",
    [
        ([("Authorization", "Bearer")], 401),
        ([("Authorization", "Bearer ")], 401),
        ([("Authorization", "Bearer    ")], 401),
        ([("Authorization", "")], 401),
        ([("Authorization", f"Bearer {TOKEN}x")], 401),
        ([("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")], 400),
        ([("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer wrong")], 400),
        ([("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {TOKEN}")], 400),
        ([("Authorization", f"Bearer {TOKEN}")], 200),
        ([("Authorization", f"bearer  {TOKEN} ")], 200),
    ],
    ids=[
        "bare-scheme",
        "empty",
        "blank",
        "empty-header",
        "longer",
        "twice",
        "right-first",
        "right-last",
        "right",
        "spaces",
    ],
)
def test_authorization_header_checks(reranking_client, headers, status):
    service, _ = reranking_client
    client = TestClient(create_app(service, token=TOKEN))
    response = client.post("/search", json={"query": "parse json", "k": 2}, headers=headers)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["detail"] == "more than one Authorization header"


@pytest.mark.parametrize(
    "token, host, allowed, error",
    [
        ("", "127.0.0.1", False, "token is empty"),
        ("   ", "127.0.0.1", False, "token is empty"),
        ("", "0.0.0.0", True, "token is empty"),
        (None, "0.0.0.0", False, "--allow-no-token"),
        (None, "192.168.1.20", False, "--allow-no-token"),
        (None, "example.org", False, "--allow-no-token"),
        (None, "0.0.0.0", True, None),
        (None, "127.0.0.1", False, None),
        (None, "::1", False, None),
        (None, "localhost", False, None),
        ("secret", "0.0.0.0", False, None),
    ],
)
def test_check_token(token, host, allowed, error):
    if error is None:
        check_token(token, host, allowed)
    else:
        with pytest.raises(ValueError, match=error):
            check_token(token, host, allowed)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--token", ""], {}, "token is empty"),
        (["--token", "  "], {}, "token is empty"),
        ([], {"MBERT_RETRIEVAL_TOKEN": ""}, "token is empty"),
        (["--host", "0.0.0.0"], {}, "--allow-no-token"),
        (["--host", "0.0.0.0", "--allow-no-token"], {}, "not a code index"),  # past the token check
        (["--host", "0.0.0.0", "--token", "secret"], {}, "not a code index"),
    ],
    ids=["empty", "blank", "empty-variable", "no-token-public", "allowed", "token"],
)
def test_serve_refuses_unsafe_token_settings_at_start(tmp_path, monkeypatch, args, env, message):
    from mbert_retrieval.cli import app

    monkeypatch.delenv("MBERT_RETRIEVAL_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--port", "1", *args], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output


# ------------------------------------------------------------------------------- search during reindex


class GatedModel:
    """A model whose document encoding (what a reindex does, never a search) waits for a gate file,
    and leaves a marker when it starts. Picklable, so it goes to the reindex process."""

    def __init__(self, model, folder: Path):
        self.model = model
        self.started, self.gate = folder / "encoding-started", folder / "gate-open"

    def encode_queries(self, texts):
        return self.model.encode_queries(texts)

    def encode_documents(self, texts):
        self.started.touch()
        deadline = time.monotonic() + 120
        while not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.model.encode_documents(texts)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_searches_answer_while_a_reindex_is_encoding(index_dir, hf_mlm_dir, tmp_path):
    model = GatedModel(load_encoder(str(hf_mlm_dir)), tmp_path)
    service = CodeSearchService(index_dir, model, model_name="tiny")
    client = TestClient(create_app(service))
    before = service.index.snapshot
    try:
        service.reindex(full=True)
        wait_for(model.started.exists, 180, "the reindex to start encoding")
        answered = []

        def search_all():
            for query in ("decode a JSON document", "the", "scanner"):
                for mode in MODES:
                    answered.append(client.post("/search", json={"query": query, "mode": mode}).status_code)

        searching = threading.Thread(target=search_all, daemon=True)
        searching.start()
        searching.join(60)
        assert not searching.is_alive(), "searches waited for the reindex"
        assert answered == [200] * 12
        assert service.state.running and service.index.snapshot == before  # still encoding

        model.gate.touch()
        wait_for(lambda: not service.state.running, 180, "the reindex to finish")
        assert service.state.last_error is None and service.state.completed == 1
        assert service.index.snapshot != before
        assert client.post("/search", json={"query": "scanner"}).status_code == 200
    finally:
        model.gate.touch()
        service.close()


def test_a_failed_reindex_is_reported_and_the_next_one_works(tmp_path, hf_mlm_dir):
    repo = make_repository(tmp_path / "repo", ("json",))
    model = load_encoder(str(hf_mlm_dir))
    build_code_index(repo, tmp_path / "index", model, model_name="tiny", show_progress=False)
    service = CodeSearchService(tmp_path / "index", model, model_name="tiny")
    client = TestClient(create_app(service))
    before = service.index.snapshot
    try:
        hidden = tmp_path / "hidden"
        repo.rename(hidden)
        response = client.post("/reindex", json={"wait": True})
        assert response.status_code == 500 and response.json()["status"] == "failed"
        assert str(repo) in response.json()["error"] and "\n" not in response.json()["error"]
        assert client.get("/health").json()["last_reindex_error"] == response.json()["error"]
        assert client.post("/search", json={"query": "scanner"}).json()["snapshot"] == before

        hidden.rename(repo)
        response = client.post("/reindex", json={"wait": True, "full": True})
        assert response.status_code == 200 and response.json()["status"] == "completed"
        assert client.get("/health").json()["last_reindex_error"] is None
    finally:
        service.close()


def test_idle_connections_outlive_pooled_clients_own_expiry(monkeypatch):
    """The server keeps an idle keep-alive connection open longer than pooled clients keep it (httpx:
    5 s), so a client never sends its next request on a connection the server is just closing (a reset
    instead of an answer, seen under load while reindexing)."""
    import httpx
    import uvicorn
    from fastapi import FastAPI

    from mbert_retrieval.server import run, start_in_thread

    client_expiry = httpx.Limits().keepalive_expiry
    background = start_in_thread(FastAPI())
    try:
        assert background.server.config.timeout_keep_alive > client_expiry
    finally:
        background.stop()
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(options))
    run.serve(FastAPI(), host="127.0.0.1", port=8765)
    assert served["timeout_keep_alive"] > client_expiry
