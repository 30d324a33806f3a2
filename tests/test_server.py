"""The code search HTTP service, through a real HTTP client against uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from code_search_repo import OUTSIDE_WORD, documented_functions, make_repository

from mbert_retrieval.code.encoders import has_default_model, load_encoder
from mbert_retrieval.code.index import build_code_index
from mbert_retrieval.server import CodeSearchService, Limits, create_app, start_in_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKEN = "correct-horse-battery-staple"
HIT_FIELDS = {"path", "start_line", "end_line", "symbol", "kind", "language", "snippet", "score"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, hf_mlm_dir):
    tmp = tmp_path_factory.mktemp("server")
    repo = make_repository(tmp / "repo", ("json", "email"))
    (repo / "email" / "_header_value_parser.py").unlink()  # the largest file: keeps the build quick
    model = load_encoder(str(hf_mlm_dir))
    build_code_index(repo, tmp / "index", model, model_name=str(hf_mlm_dir), show_progress=False)
    service = CodeSearchService(tmp / "index", model, model_name=str(hf_mlm_dir))
    server = start_in_thread(create_app(service, token=TOKEN, limits=Limits(max_k=50, max_body_bytes=16_384)))
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    yield repo, service, client
    client.close()
    server.stop()
    service.close()


def search(client, **body):
    response = client.post("/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()["hits"]


def test_health_and_openapi_schema(served):
    _, service, client = served
    health = httpx.get(f"{client.base_url}/health")  # no token needed
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["chunks"] == len(service.index) and body["files"] > 30
    schema = client.get("/openapi.json").json()
    assert {"/search", "/reindex", "/health"} <= set(schema["paths"])
    assert {"query", "k", "path", "language"} <= set(
        schema["components"]["schemas"]["SearchRequest"]["properties"]
    )


def test_hits_are_well_formed_and_quote_the_repository(served):
    repo, _, client = served
    hits = search(client, query="split a header value into words", k=7)
    assert len(hits) == 7
    for hit in hits:
        assert set(hit) == HIT_FIELDS
        assert isinstance(hit["score"], float) and 1 <= hit["start_line"] <= hit["end_line"]
        file = (repo / hit["path"]).resolve()
        assert file.is_relative_to(repo.resolve()) and file.is_file()
        lines = file.read_text().splitlines()[hit["start_line"] - 1 : hit["end_line"]]
        assert hit["snippet"] == "\n".join(lines[:40])
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_known_functions_are_found_by_their_docstring_words(served):
    """The words of a docstring find its function: the lexical ranking nearly always, and the hybrid
    ranking (fused with a random-weight model here, so half noise) mostly."""
    repo, _, client = served
    functions = documented_functions(repo, "email", limit=16) + documented_functions(repo, "json", limit=4)
    assert len(functions) >= 16
    found = {"bm25": [], "hybrid": []}
    for path, symbol, docstring in functions:
        for mode, k in (("bm25", 5), ("hybrid", 10)):
            hits = search(client, query=docstring, k=k, mode=mode)
            found[mode].append(any(h["path"] == path and h["symbol"] == symbol for h in hits))
        print(
            f"bm25 {found['bm25'][-1]!s:5} hybrid {found['hybrid'][-1]!s:5}  {path}  {symbol}  <- {docstring!r}"
        )
    # Some docstrings are generic ("Return the string value of the header."): a few misses are fair.
    assert sum(found["bm25"]) >= 0.8 * len(functions)
    assert sum(found["hybrid"]) >= 0.65 * len(functions)


def test_language_and_path_filters(served):
    _, _, client = served
    js = search(client, query="sort users by name", k=5, language="javascript")
    assert js and {h["language"] for h in js} == {"javascript"}
    assert js[0]["symbol"] == "fetchSortedUsers"
    mime = search(client, query="create a MIME document", k=10, path="email/mime/*.py")
    assert mime and all(h["path"].startswith("email/mime/") for h in mime)
    assert search(client, query="anything", k=5, path="no_such_folder/**") == []


BAD_REQUESTS = [
    ({"query": "", "k": 5}, 422, "query must not be empty"),
    ({"query": "   \n", "k": 5}, 422, "query must not be empty"),
    ({"query": "x", "k": 0}, 422, "k must be between 1 and 50"),
    ({"query": "x", "k": 10**9}, 422, "k must be between 1 and 50"),
    ({"query": "x", "k": -3}, 422, "k must be between 1 and 50"),
    ({"query": "x", "k": "ten"}, 422, "k"),
    ({"k": 5}, 422, "query"),
    ({"query": "x" * 2001}, 422, "longer than 2000"),
    ({"query": "x", "language": "cobol"}, 422, "unknown language"),
    ({"query": "x", "mode": "sparse"}, 422, "mode"),
    ({"query": "x", "path": "../../etc/passwd"}, 422, "must not contain '..'"),
    ({"query": "x", "path": "json/../../../etc/*"}, 422, "must not contain '..'"),
    ({"query": "x", "path": "/etc/*"}, 422, "relative to the repository root"),
    ({"query": "x", "path": "~/.ssh/*"}, 422, "relative to the repository root"),
    ({"query": "x", "path": "..\\..\\windows"}, 422, "backslash"),
    ({"query": "x", "path": "a\u0000b"}, 422, "NUL"),
    ({"query": "x", "rerank": True}, 422, "without a reranker"),
]


@pytest.mark.parametrize(
    "body, status, message", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))]
)
def test_bad_search_requests_get_clear_4xx_answers(served, body, status, message):
    _, _, client = served
    response = client.post("/search", json=body)
    assert response.status_code == status, response.text
    assert message in json.dumps(response.json()["detail"])


def test_malformed_bodies_are_4xx_never_500(served):
    _, _, client = served
    headers = {"Content-Type": "application/json"}
    for raw in (b"{not json", b"[1, 2]", b'"query"', b"\xff\xfe\x00", b'{"query": "\\ud800", "k": 3}', b""):
        response = client.post("/search", content=raw, headers=headers)
        assert 400 <= response.status_code < 500, (raw, response.status_code, response.text)
    response = client.post("/search", content=b'{"query": "\\ud800 lone surrogate"}', headers=headers)
    assert response.status_code == 422 and "not valid Unicode" in response.text


def test_oversized_bodies_are_refused(served):
    _, _, client = served
    response = client.post("/search", json={"query": "x" * 20_000, "k": 3})
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def streamed():  # no Content-Length: the limit applies while reading
        yield b'{"query": "'
        for _ in range(40):
            yield b"y" * 1000
        yield b'"}'

    response = client.post("/search", content=streamed(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
def test_token_is_required(served, headers):
    _, _, client = served
    for path, body in (("/search", {"query": "parse json", "k": 3}), ("/reindex", {})):
        response = httpx.post(f"{client.base_url}{path}", json=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["detail"] == "missing or invalid bearer token"
        assert response.headers["www-authenticate"] == "Bearer"


def test_skipped_and_outside_files_never_appear(served):
    repo, service, client = served
    assert service.index.meta["skipped"]["not_utf8"] == 1
    for query in (OUTSIDE_WORD, "café latin1", "ignored_build_function", "ignoredVendor"):
        hits = search(client, query=query, k=20, mode="bm25")
        assert all(h["path"] not in ("link_outside.py", "latin1.py", "build/generated.py") for h in hits)
        assert all(OUTSIDE_WORD not in h["snippet"] for h in hits)
    everything = search(client, query="def", k=50, path="**")
    root = repo.resolve()
    assert all((root / h["path"]).resolve().is_relative_to(root) for h in everything)


def test_reindex_picks_up_edits_and_swaps_the_snapshot(served):
    repo, service, client = served
    before = service.index.snapshot
    target = repo / "json" / "scanner.py"
    target.write_text(
        target.read_text()
        + '\n\ndef tabulate_planetary_orbits(bodies):\n    """Tabulate planetary orbits."""\n'
    )
    response = client.post("/reindex", json={"wait": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed" and body["snapshot"] != before
    assert (
        body["report"]["files_changed"] == 1
        and body["report"]["files_unchanged"] == body["report"]["files"] - 1
    )
    hits = search(client, query="tabulate planetary orbits", k=3)
    assert hits[0]["symbol"] == "tabulate_planetary_orbits" and hits[0]["path"] == "json/scanner.py"
    assert client.get("/health").json()["reindexes_completed"] >= 1


def test_the_example_ide_client_prints_path_line_symbol_score(served):
    _, _, client = served
    example = Path(__file__).resolve().parents[1] / "examples" / "ide_client.py"
    command = [
        sys.executable,
        str(example),
        "Scan the string s for a JSON string",
        "-k",
        "3",
        "--path",
        "json/*",
    ]
    result = subprocess.run(
        command + ["--url", str(client.base_url).rstrip("/"), "--token", TOKEN],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        location, symbol, score = line.split("  ")
        path, number = location.rsplit(":", 1)
        assert path.startswith("json/") and int(number) >= 1 and float(score) > 0
    assert any("py_scanstring" in line for line in lines)
    wrong = subprocess.run(
        command + ["--url", str(client.base_url).rstrip("/")], capture_output=True, text=True
    )
    assert wrong.returncode == 1 and "401" in wrong.stderr


def test_optional_rerank_stage(served, hf_mlm_dir):
    from mbert_retrieval.models.cross_encoder import CrossEncoder

    _, service, _ = served
    reranking = CodeSearchService(
        service.index_dir,
        service.model,
        model_name=service.model_name,
        reranker=CrossEncoder.from_pretrained(hf_mlm_dir),
    )
    server = start_in_thread(create_app(reranking))
    try:
        body = {"query": "decode a JSON document", "k": 5}
        reranked = httpx.post(f"{server.url}/search", json=body, timeout=60).json()["hits"]
        plain = httpx.post(f"{server.url}/search", json={**body, "rerank": False}, timeout=60).json()["hits"]
    finally:
        server.stop()
    first_stage = search(served[2], query=body["query"], k=50)
    assert len(reranked) == 5 and {(h["path"], h["start_line"]) for h in reranked} <= {
        (h["path"], h["start_line"]) for h in first_stage
    }
    assert [h["score"] for h in plain] == [h["score"] for h in first_stage[:5]]
    assert [h["score"] for h in reranked] != [h["score"] for h in plain]


# ------------------------------------------------------------------------------------ command line


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mbert_retrieval.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_command_line_index_code_and_serve(tmp_path, hf_mlm_dir):
    repo = make_repository(tmp_path / "repo", ("json",))
    built = run_cli("index-code", str(repo), "--index", str(tmp_path / "index"), "--model", str(hf_mlm_dir))
    assert built.returncode == 0, built.stderr
    assert "full build" in built.stdout and "1 not_utf8" in built.stdout

    port = free_port()
    command = [sys.executable, "-m", "mbert_retrieval.cli", "serve", "--index", str(tmp_path / "index")]
    command += ["--port", str(port), "--token", TOKEN]
    server = subprocess.Popen(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        response = httpx.post(
            f"{url}/search",
            json={"query": "Scan the string s for a JSON string", "k": 5},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert response.status_code == 200
        assert "py_scanstring" in [h["symbol"] for h in response.json()["hits"]]
        assert httpx.post(f"{url}/search", json={"query": "x"}, timeout=60).status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_command_line_errors_are_one_line_and_exit_code_2(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mbert_retrieval.cli import app
    from mbert_retrieval.models import dense

    runner = CliRunner()
    repo = make_repository(tmp_path / "repo", ("json",))
    with monkeypatch.context() as without_default:
        without_default.setattr(dense, "DEFAULT_MODEL_DIR", tmp_path / "absent")
        assert not has_default_model()
        result = runner.invoke(app, ["index-code", str(repo), "--index", str(tmp_path / "index")])
        assert result.exit_code == 2 and "--model" in result.output
    result = runner.invoke(app, ["serve", "--index", str(tmp_path), "--port", str(free_port())])
    assert result.exit_code == 2 and "not a code index" in result.output
    assert not (tmp_path / "CURRENT.json").exists()
