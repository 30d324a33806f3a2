"""The `Index` protocol: one test body, run on every index (FaissIndex, PlaidIndex, MaxSimIndex, BM25Index)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

pytest.importorskip("faiss")

from mbert_retrieval.index import BM25Index, FaissIndex, Index, MaxSimIndex, PlaidIndex  # noqa: E402
from mbert_retrieval.index.base import rankings, search_allowed  # noqa: E402
from mbert_retrieval.index.storage import IndexFormatError  # noqa: E402

DIM = 16
N_DOCS = 40
IDS = [f"doc-{n}" for n in range(N_DOCS)]
WORDS = "parse json read file sort list http request string date hash merge split copy path number".split()


@dataclass
class Case:
    make: Callable[[], Index]
    items: Any  # one per id in IDS
    queries: Any
    model_name: str | None = "test-model"


def unit(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)


def token_matrices(rng, n: int) -> list[np.ndarray]:
    return [unit(rng.standard_normal((int(rng.integers(3, 9)), DIM))) for _ in range(n)]


def texts(rng, n: int, words: tuple[int, int]) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(*words)))) for _ in range(n)]


def make_case(name: str) -> Case:
    rng = np.random.default_rng(0)
    if name == "faiss":
        vectors = unit(rng.standard_normal((N_DOCS, DIM)))
        return Case(lambda: FaissIndex(DIM, model_name="test-model"), vectors, vectors[:5] + 0.1)
    if name in ("plaid", "maxsim"):
        documents = token_matrices(rng, N_DOCS)
        queries = np.stack([unit(d[:3] + 0.1) for d in documents[:5]])
        if name == "plaid":
            return Case(
                lambda: PlaidIndex(model_name="test-model", n_centroids=16, device="cpu"), documents, queries
            )
        return Case(lambda: MaxSimIndex(model_name="test-model"), documents, queries)
    return Case(BM25Index, texts(rng, N_DOCS, (4, 9)), texts(rng, 5, (2, 3)), model_name=None)


@pytest.fixture(params=["faiss", "plaid", "maxsim", "bm25"])
def case(request) -> Case:
    return make_case(request.param)


def check_answer(answer, n_queries: int, width: int, known: set[str]) -> list[list[str]]:
    """The shape every index answers in: id lists of str, best first, and float32 scores
    [n_queries, width], -inf past the end of a shorter list."""
    ids, scores = answer
    assert isinstance(ids, list) and len(ids) == n_queries
    assert (
        isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (n_queries, width)
    )
    for row, row_scores in zip(ids, scores):
        assert isinstance(row, list) and all(isinstance(i, str) for i in row)
        assert len(set(row)) == len(row) <= width and set(row) <= known
        found = row_scores[: len(row)]
        assert np.isfinite(found).all() and np.isneginf(row_scores[len(row) :]).all()
        assert list(found) == sorted(found, reverse=True)
    return ids


def items_of(case: Case, ids: list[str]):
    chosen = [IDS.index(i) for i in ids]
    return case.items[chosen] if isinstance(case.items, np.ndarray) else [case.items[n] for n in chosen]


def test_add_search_delete(case):
    index = case.make()
    n_queries = len(case.queries)
    assert isinstance(index, Index) and len(index) == 0 and index.ids == []
    assert check_answer(index.search(case.queries, k=3), n_queries, 0, set()) == [[]] * n_queries

    index.add(IDS[:25], items_of(case, IDS[:25]))
    index.add(IDS[25:], items_of(case, IDS[25:]))
    assert len(index) == N_DOCS and index.ids == IDS
    top = check_answer(index.search(case.queries, k=5), n_queries, 5, set(IDS))
    assert sum(map(len, top)) >= n_queries
    check_answer(index.search(case.queries, k=10 * N_DOCS), n_queries, N_DOCS, set(IDS))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(IDS[:1], items_of(case, IDS[:1]))
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(case.queries, k=0)

    gone = sorted({row[0] for row in top if row})
    index.delete(gone)
    kept = [i for i in IDS if i not in gone]
    assert len(index) == len(kept) and index.ids == kept
    after = check_answer(index.search(case.queries, k=5), n_queries, 5, set(kept))
    assert not set(gone) & {i for row in after for i in row}
    with pytest.raises(KeyError, match="not in the index"):
        index.delete(["no-such-document"])

    index.add(gone, items_of(case, gone))  # deleted ids can come back
    assert len(index) == N_DOCS and set(index.ids) == set(IDS)


def test_save_and_load(case, tmp_path):
    index = case.make()
    index.save(tmp_path / "empty")
    empty = type(index).load(tmp_path / "empty", device="cpu")
    assert len(empty) == 0 and empty.search(case.queries, k=3)[0] == [[]] * len(case.queries)

    index.add(IDS, case.items)
    index.delete(IDS[:3])
    before = index.search(case.queries, k=5)
    index.save(tmp_path / "index")
    loaded = type(index).load(tmp_path / "index", expected_model=case.model_name, device="cpu")
    assert type(loaded) is type(index) and loaded.ids == index.ids and len(loaded) == len(index)
    after = loaded.search(case.queries, k=5)
    assert after[0] == before[0]
    np.testing.assert_allclose(after[1], before[1], rtol=1e-5)

    loaded.add(IDS[:3], items_of(case, IDS[:3]))  # a loaded index goes on changing
    assert len(loaded) == N_DOCS
    if case.model_name is not None:
        with pytest.raises(IndexFormatError, match="built with model 'test-model'"):
            type(index).load(tmp_path / "index", expected_model="another-model", device="cpu")


def test_damaged_files_are_refused(case, tmp_path):
    index = case.make()
    index.add(IDS, case.items)
    index.save(tmp_path / "index")
    largest = max((tmp_path / "index").glob("data-*/*"), key=lambda path: path.stat().st_size)
    data = largest.read_bytes()

    largest.write_bytes(data[:-8])
    with pytest.raises(IndexFormatError, match="truncated"):
        type(index).load(tmp_path / "index", device="cpu")
    largest.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(IndexFormatError, match="checksum"):
        type(index).load(tmp_path / "index", device="cpu")
    (tmp_path / "index" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt manifest"):
        type(index).load(tmp_path / "index", device="cpu")
    with pytest.raises(IndexFormatError, match="does not exist"):
        type(index).load(tmp_path / "nothing-here", device="cpu")


def test_search_allowed_keeps_to_the_allowed_documents(case):
    """`search_allowed` gives what a search of every document would, less the ones left out."""
    index = case.make()
    index.add(IDS, case.items)
    allowed = set(IDS[1::3])  # a third of the documents, the best of the first query among them or not
    full = rankings(index.search(case.queries, k=N_DOCS))
    for k in (1, 4, N_DOCS):
        ids, scores = search_allowed(index, case.queries, k, allowed)
        check_answer((ids, scores), len(case.queries), min(k, N_DOCS), allowed)
        for row, row_scores, everything in zip(ids, scores, full):
            want = [(i, s) for i, s in everything if i in allowed][:k]
            assert row == [i for i, _ in want]
            np.testing.assert_allclose(row_scores[: len(row)], [s for _, s in want], rtol=1e-5)
    assert search_allowed(index, case.queries, 3, set())[0] == [[]] * len(case.queries)


def test_search_allowed_asks_for_more_until_enough_pass():
    """Few allowed documents among many: the index is searched deeper until k of them are found."""
    rng = np.random.default_rng(1)
    vectors = unit(rng.standard_normal((3000, DIM)))
    ids = [f"v{n}" for n in range(3000)]
    index = FaissIndex(DIM)
    index.add(ids, vectors)
    queries = vectors[:2]
    allowed = set(ids[2::500])  # 6 documents, most of them far from both queries
    got, scores = search_allowed(index, queries, 5, allowed)
    for row, row_scores, query in zip(got, scores, queries):
        chosen = sorted(allowed, key=lambda i: -float(vectors[ids.index(i)] @ query))[:5]
        assert row == chosen
        np.testing.assert_allclose(row_scores, [vectors[ids.index(i)] @ query for i in chosen], rtol=1e-5)
