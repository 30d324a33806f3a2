"""The code index: full and incremental builds, hybrid / dense / BM25 search, filters, snapshots."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from code_search_repo import OUTSIDE_WORD, make_repository

from mbert_retrieval.code.chunking import chunk_file
from mbert_retrieval.code.encoders import ModelNotFoundError, has_default_model, load_encoder
from mbert_retrieval.code.index import (
    POINTER,
    SNAPSHOT_PREFIX,
    CodeIndex,
    FusionSettings,
    build_code_index,
    compile_path_glob,
    document_text,
)
from mbert_retrieval.index.storage import IndexFormatError

NEW_FUNCTION = '''

def summarize_quarterly_revenue(ledger):
    """Summarize quarterly revenue figures from the accounting ledger."""
    return sum(ledger)
'''


class CountingModel:
    """Records every document text the index asks the model to encode."""

    def __init__(self, model):
        self.model = model
        self.encoded: list[str] = []

    def encode_documents(self, texts):
        self.encoded += list(texts)
        return self.model.encode_documents(texts)

    def encode_queries(self, texts):
        return self.model.encode_queries(texts)


PACKAGES = ("json", "email/mime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(hf_mlm_dir):
    return load_encoder(str(hf_mlm_dir))


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    """A repository, its full index, then the same index updated after edits."""
    tmp = tmp_path_factory.mktemp("code_index")
    repo = make_repository(tmp / "repo", PACKAGES)
    counting = CountingModel(model)
    full = build_code_index(repo, tmp / "index", counting, model_name="tiny", show_progress=False)
    return tmp, repo, counting, full


def test_full_build_indexes_every_source_file(built):
    tmp, repo, counting, report = built
    index = CodeIndex.load(tmp / "index")
    assert report.full and report.files == report.files_added == len(index.files)
    assert report.chunks == len(index) == len(counting.encoded)
    assert {"not_utf8", "binary", "gitignored", "symlink", "too_large", "generated"} <= set(report.skipped)
    assert {c.language for c in index.chunks} >= {"python", "javascript", "go"}
    assert all(".." not in c.path.split("/") and not c.path.startswith("/") for c in index.chunks)
    assert not any(OUTSIDE_WORD in c.text for c in index.chunks)
    # Stored chunks are exact slices of the files they come from.
    for chunk in index.chunks[::25]:
        lines = (repo / chunk.path).read_text().splitlines()
        assert chunk.text == "\n".join(lines[chunk.start_line - 1 : chunk.end_line])


def test_incremental_update_encodes_only_changed_files_and_matches_a_full_rebuild(built, model):
    tmp, repo, counting, full_report = built
    edited = repo / "json" / "decoder.py"
    edited.write_text(edited.read_text() + NEW_FUNCTION)
    (repo / "json" / "tool.py").unlink()
    (repo / "web" / "extra.js").write_text(
        "/** Format a price in euros. */\nfunction formatPrice(p) { return p; }\n"
    )
    before = CodeIndex.load(tmp / "index")

    counting.encoded.clear()
    update = build_code_index(repo, tmp / "index", counting, model_name="tiny", show_progress=False)
    print(f"\nfull build: {full_report.seconds:.2f}s ({full_report.chunks_encoded} chunks encoded)")
    print(
        f"incremental update after editing one file: {update.seconds:.2f}s ({update.chunks_encoded} encoded)"
    )

    expected = chunk_file("json/decoder.py", edited.read_text()) + chunk_file(
        "web/extra.js", (repo / "web" / "extra.js").read_text()
    )
    assert not update.full
    assert (update.files_changed, update.files_added, update.files_removed) == (1, 1, 1)
    assert update.files_unchanged == full_report.files - 2
    assert sorted(counting.encoded) == sorted(document_text(c) for c in expected)
    assert update.chunks_encoded == len(expected)

    after = CodeIndex.load(tmp / "index")
    assert after.snapshot != before.snapshot
    assert not any(c.path == "json/tool.py" for c in after.chunks)
    # The slow reference: a full build of the edited repository gives the same index.
    reference = tmp / "reference"
    build_code_index(repo, reference, model, model_name="tiny", show_progress=False)
    fresh = CodeIndex.load(reference)
    assert after.entries() == fresh.entries()
    for query in ("scan a json string", "summarize quarterly revenue", "attach an image to a message"):
        for mode in ("dense", "bm25", "hybrid"):
            got = after.search(model, query, k=8, mode=mode)
            want = fresh.search(model, query, k=8, mode=mode)
            assert [(h.path, h.start_line) for h in got] == [(h.path, h.start_line) for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-5, atol=1e-6)
    hits = after.search(model, "summarize quarterly revenue ledger", k=3)
    assert hits[0].symbol == "summarize_quarterly_revenue"

    counting.encoded.clear()
    again = build_code_index(repo, tmp / "index", counting, model_name="tiny", show_progress=False)
    assert again.chunks_encoded == 0 and counting.encoded == [] and again.files_unchanged == again.files


def test_a_different_model_or_full_flag_rebuilds_everything(built, model, tmp_path):
    tmp, repo, _, _ = built
    index_dir = tmp_path / "index"
    shutil.copytree(tmp / "index", index_dir)
    counting = CountingModel(model)
    report = build_code_index(repo, index_dir, counting, model_name="another", show_progress=False)
    assert report.full and report.chunks_encoded == report.chunks == len(counting.encoded)
    report = build_code_index(repo, index_dir, model, model_name="another", full=True, show_progress=False)
    assert report.full


def test_dense_search_with_filters_matches_brute_force(built, model):
    """The filtered FAISS ranking against cosine similarity over every allowed chunk."""
    tmp, _, _, _ = built
    index = CodeIndex.load(tmp / "index")
    vectors = model.encode_documents([document_text(c) for c in index.chunks])
    query = "create a MIME document"
    query_vector = model.encode_queries([query])[0]
    for path, language in ((None, None), ("email/mime/*", None), ("*.py", "python"), (None, "javascript")):
        allowed = [
            i
            for i, c in enumerate(index.chunks)
            if (language is None or c.language == language)
            and (path is None or compile_path_glob(path).match_file(c.path))
        ]
        scores = vectors[allowed] @ query_vector
        want = [allowed[i] for i in np.argsort(-scores, kind="stable")[:5]]
        hits = index.search(model, query, k=5, path=path, language=language, mode="dense")
        assert [(h.path, h.start_line) for h in hits] == [
            (index.chunks[i].path, index.chunks[i].start_line) for i in want
        ]
        np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:5], rtol=1e-4, atol=1e-5)
        assert all(language is None or h.language == language for h in hits)


def test_bm25_and_hybrid_find_functions_by_their_docstring(built, model):
    tmp, _, _, _ = built
    index = CodeIndex.load(tmp / "index")
    hits = index.search(
        model, "Remove the least recently used entry when the cache is full", k=3, mode="bm25"
    )
    assert hits[0].symbol == "Cache.evictOldest" and hits[0].language == "javascript"
    hits = index.search(model, "euclidean distance between two points", k=5, language="go")
    assert hits[0].symbol == "Point.Distance"
    hybrid = index.search(model, "Scan the string s for a JSON string", k=10, path="json/**")
    assert "py_scanstring" in [h.symbol for h in hybrid]
    assert all(h.path.startswith("json/") for h in hybrid)


def test_fusion_is_configurable(built, model, tmp_path):
    tmp, repo, _, _ = built
    settings = FusionSettings(mode="bm25", depth=20)
    build_code_index(repo, tmp_path / "index", model, model_name="tiny", fusion=settings, show_progress=False)
    index = CodeIndex.load(tmp_path / "index")
    assert index.fusion == settings
    default = index.search(model, "decode a JSON document", k=5)
    explicit = index.search(model, "decode a JSON document", k=5, mode="bm25")
    assert [(h.path, h.start_line, h.score) for h in default] == [
        (h.path, h.start_line, h.score) for h in explicit
    ]
    with pytest.raises(ValueError, match="fusion mode"):
        FusionSettings(mode="sparse")


@pytest.mark.parametrize(
    "glob", ["../secret/*", "/etc/passwd", "json/../../x", "~/notes", "..", "a\\..\\b", "!*.py", "", " "]
)
def test_path_globs_outside_the_root_are_refused(built, model, glob):
    tmp, _, _, _ = built
    index = CodeIndex.load(tmp / "index")
    with pytest.raises(ValueError, match="path glob"):
        index.search(model, "anything", k=3, path=glob)


def test_bad_search_arguments_are_clear_errors(built, model):
    index = CodeIndex.load(built[0] / "index")
    with pytest.raises(ValueError, match="non-empty"):
        index.search(model, "   ", k=3)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(model, "x", k=0)
    with pytest.raises(ValueError, match="unknown language"):
        index.search(model, "x", k=3, language="cobol")


def test_readers_always_load_a_complete_snapshot_while_rebuilds_run(built, model, tmp_path):
    tmp, repo, _, _ = built
    index_dir = tmp_path / "index"
    shutil.copytree(tmp / "index", index_dir)
    errors, loads, done = [], [], threading.Event()

    def read_repeatedly():
        while not done.is_set():
            try:
                index = CodeIndex.load(index_dir)  # checks chunks, vectors and BM25 agree
                loads.append((index.snapshot, len(index)))
            except Exception as err:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(err)

    reader = threading.Thread(target=read_repeatedly)
    reader.start()
    try:
        target = repo / "json" / "scanner.py"
        original = target.read_text()
        for n in range(4):
            target.write_text(original + f"\n\ndef rebuilt_{n}():\n    return {n}\n")
            build_code_index(repo, index_dir, model, model_name="tiny", show_progress=False)
            time.sleep(0.05)
        target.write_text(original)
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert len({snapshot for snapshot, _ in loads}) >= 2
    snapshots = [p for p in index_dir.iterdir() if p.name.startswith(SNAPSHOT_PREFIX)]
    assert len(snapshots) <= 2  # old snapshots are cleaned up
    assert not [p for p in index_dir.iterdir() if p.name.startswith(".building-")]


def test_corrupt_or_missing_indexes_are_clear_errors(built, tmp_path):
    with pytest.raises(IndexFormatError, match="not a code index"):
        CodeIndex.load(tmp_path)
    index_dir = tmp_path / "index"
    shutil.copytree(built[0] / "index", index_dir)
    (index_dir / POINTER).write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt"):
        CodeIndex.load(index_dir)
    (index_dir / POINTER).write_text(json.dumps({"snapshot": f"{SNAPSHOT_PREFIX}gone"}))
    with pytest.raises(IndexFormatError, match="is missing"):
        CodeIndex.load(index_dir)
    (index_dir / POINTER).write_text(json.dumps({"snapshot": "../../etc"}))
    with pytest.raises(IndexFormatError, match="invalid snapshot"):
        CodeIndex.load(index_dir)


def test_building_into_a_foreign_folder_or_from_an_empty_repo_is_refused(model, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    repo = make_repository(tmp_path / "repo", packages=())
    with pytest.raises(IndexFormatError, match="not a code index"):
        build_code_index(repo, foreign, model, model_name="tiny", show_progress=False)
    assert (foreign / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "image.png").write_bytes(b"\x89PNG\0\0")
    with pytest.raises(ValueError, match="no indexable source files"):
        build_code_index(empty, tmp_path / "index", model, model_name="tiny", show_progress=False)


def test_without_a_model_the_error_says_to_pass_one(monkeypatch, tmp_path):
    from mbert_retrieval.models import dense

    monkeypatch.setattr(dense, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    assert not has_default_model()
    with pytest.raises(ModelNotFoundError, match="--model"):
        load_encoder(None)


def test_rerank_stage_rescores_the_first_stage_candidates(built, model, hf_mlm_dir):
    """Reranked hits are the first stage's top candidates, ordered by the cross-encoder's scores."""
    from mbert_retrieval.models.cross_encoder import CrossEncoder

    index = CodeIndex.load(built[0] / "index")
    reranker = CrossEncoder.from_pretrained(hf_mlm_dir)
    query = "decode a JSON document"
    candidates = index.search(model, query, k=12)
    hits = index.search(model, query, k=5, reranker=reranker, rerank_depth=12)
    by_location = {(c.path, c.start_line): c for c in candidates}
    assert len(hits) == 5 and all((h.path, h.start_line) in by_location for h in hits)
    chunk_of = {(c.path, c.start_line): c for c in index.chunks}
    expected = reranker.predict(
        [(query, document_text(chunk_of[(c.path, c.start_line)])) for c in candidates]
    )
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1][:5], rtol=1e-5, atol=1e-6)


def test_the_report_counts_the_chunks_the_model_truncated(hf_mlm_dir, tmp_path, caplog):
    """The build reports the count once, instead of a warning per batch of chunks."""
    short = load_encoder(str(hf_mlm_dir))
    short.max_length = 24
    repo = tmp_path / "repo"
    repo.mkdir()
    long_body = "\n".join(f"    total += value_{n}" for n in range(40))
    (repo / "long.py").write_text(f"def add_everything():\n    total = 0\n{long_body}\n    return total\n")
    (repo / "short.py").write_text("def one():\n    return 1\n")
    with caplog.at_level("WARNING"):
        report = build_code_index(repo, tmp_path / "index", short, model_name="tiny", show_progress=False)
    assert report.chunks_truncated == 1 and "1 longer than the model reads" in report.summary()
    assert "truncated" not in caplog.text
    short.encode_documents(["word " * 40])  # outside a build, the model logs what it truncates again
    assert "1 of 1 texts are longer than 24 tokens and were truncated" in caplog.text
