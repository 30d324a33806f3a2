"""FaissIndex: string ids and metadata, exact results against brute force, add / delete / update for
every kind, training on first add, and a save / load round trip."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from mbert_retrieval.index.faiss_index import FaissIndex  # noqa: E402

DIM = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny indexes: OpenMP threads only contend with each other (badly so on a busy machine)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit_vectors(n, seed=0, dim=DIM):
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(vectors, ids, queries, k):
    scores = queries @ vectors.T
    top = np.argsort(-scores, axis=1)[:, :k]
    return [[ids[i] for i in row] for row in top], np.take_along_axis(scores, top, axis=1)


@pytest.fixture
def data():
    vectors = unit_vectors(2000)
    ids = [f"doc-{i}" for i in range(len(vectors))]
    queries = unit_vectors(20, seed=1)
    return vectors, ids, queries


def test_flat_is_exact_with_string_ids_and_metadata(data):
    vectors, ids, queries = data
    index = FaissIndex(DIM, kind="flat")
    index.add(ids, vectors, metadata=[{"n": i} for i in range(len(ids))])
    found, scores = index.search(queries, k=5)
    expected_ids, expected_scores = brute_force(vectors, ids, queries, 5)
    assert found == expected_ids
    assert scores.dtype == np.float32 and scores.shape == (20, 5)
    assert np.allclose(scores, expected_scores, atol=1e-5)
    assert index.metadata("doc-7") == {"n": 7} and len(index) == 2000 and "doc-7" in index


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "IVF16,Flat"])
def test_delete_and_update(data, kind):
    vectors, ids, queries = data
    index = FaissIndex(DIM, kind=kind, nprobe=16)
    index.add(ids, vectors, metadata=[{"v": 1}] * len(ids))
    hits, _ = index.search(queries, k=3)
    gone = sorted({row[0] for row in hits})
    index.delete(gone)
    assert len(index) == len(ids) - len(gone) and gone[0] not in index
    after, _ = index.search(queries, k=10)
    assert not set(gone) & {i for row in after for i in row}

    # Point one document at a query: it must become that query's best hit, with its new metadata.
    index.update(["doc-5"], queries[:1], metadata=[{"v": 2}])
    top, scores = index.search(queries[:1], k=1)
    assert top == [["doc-5"]] and index.metadata("doc-5") == {"v": 2}
    if kind == "flat":
        assert np.isclose(scores[0, 0], 1.0, atol=1e-5)
    # update() of an id not in the index adds it
    index.update(["brand-new"], queries[1:2])
    assert index.search(queries[1:2], k=1)[0] == [["brand-new"]]


def test_approximate_kinds_agree_with_flat(data):
    vectors, ids, queries = data
    exact, _ = brute_force(vectors, ids, queries, 10)
    for kind, floor in [("hnsw", 0.95), ("ivfpq", 0.5)]:
        index = FaissIndex(DIM, kind=kind, nprobe=32)
        index.add(ids, vectors)
        found, _ = index.search(queries, k=10)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]) >= floor, kind


def test_ivf_trains_on_first_add_and_needs_enough_vectors(data):
    vectors, ids, _ = data
    index = FaissIndex(DIM, kind="ivfpq", nlist=64, pq_m=8)
    with pytest.raises(ValueError, match="at least 256 vectors"):
        index.add(ids[:100], vectors[:100])
    assert len(index) == 0
    index.add(ids[:1000], vectors[:1000])
    index.add(ids[1000:], vectors[1000:])  # already trained: no retraining
    assert len(index) == 2000

    automatic = FaissIndex(DIM, kind="ivfpq")
    automatic.add(ids, vectors)
    assert "IVF" in automatic.factory_string(automatic._ivf().nlist) and automatic._ivf().nlist <= 2000 / 39


def test_l2_scores_are_negative_squared_distances(data):
    vectors, ids, queries = data
    index = FaissIndex(DIM, kind="flat", metric="l2")
    index.add(ids, vectors)
    found, scores = index.search(queries[:2], k=3)
    for row, row_scores, query in zip(found, scores, queries[:2]):
        expected = [-np.sum((vectors[ids.index(i)] - query) ** 2) for i in row]
        assert np.allclose(row_scores, expected, atol=1e-4)


def test_short_results_and_k_above_size():
    index = FaissIndex(DIM)
    index.add(["a", "b"], unit_vectors(2))
    found, scores = index.search(unit_vectors(3, seed=5), k=10)
    assert scores.shape == (3, 2) and all(sorted(row) == ["a", "b"] for row in found)
    empty = FaissIndex(DIM)
    found, scores = empty.search(unit_vectors(2), k=5)
    assert found == [[], []] and scores.shape == (2, 0)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(data, kind, tmp_path):
    vectors, ids, queries = data
    index = FaissIndex(DIM, kind=kind, model_name="dense-test")
    index.add(ids, vectors, metadata=[{"title": f"t{i}"} for i in range(len(ids))])
    index.delete(ids[:10])
    index.save(tmp_path / "idx")
    loaded = FaissIndex.load(tmp_path / "idx", expected_model="dense-test")
    assert loaded.ids == index.ids and loaded.metadata("doc-42") == {"title": "t42"}
    before, after = index.search(queries, k=10), loaded.search(queries, k=10)
    assert before[0] == after[0] and np.allclose(before[1], after[1])
    loaded.add(["extra"], queries[:1])  # a loaded index keeps working
    assert loaded.search(queries[:1], k=1)[0] == [["extra"]]


def test_memory_mapped_load(data, tmp_path):
    vectors, ids, queries = data
    index = FaissIndex(DIM)
    index.add(ids, vectors)
    index.save(tmp_path / "idx")
    mapped = FaissIndex.load(tmp_path / "idx", mmap=True)
    assert mapped.search(queries, k=5)[0] == index.search(queries, k=5)[0]


def test_bad_input_gets_clear_errors(data):
    vectors, ids, _ = data
    index = FaissIndex(DIM)
    with pytest.raises(ValueError, match=r"shape \[n, 32\]"):
        index.add(["a"], np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="2 ids for 1 vectors"):
        index.add(["a", "b"], vectors[:1])
    with pytest.raises(ValueError, match="unique"):
        index.add(["a", "a"], vectors[:2])
    with pytest.raises(ValueError, match="NaN"):
        index.add(["a"], np.full((1, DIM), np.nan, dtype=np.float32))
    with pytest.raises(TypeError, match="strings"):
        index.add([1], vectors[:1])
    index.add(["a"], vectors[:1])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(["a"], vectors[:1])
    with pytest.raises(KeyError, match="not in the index"):
        index.delete(["zzz"])
    with pytest.raises(ValueError, match="metric"):
        FaissIndex(DIM, metric="cosine")
    with pytest.raises(ValueError, match="faiss cannot build"):
        FaissIndex(DIM, kind="NotAnIndex")
