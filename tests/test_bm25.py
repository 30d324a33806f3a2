"""BM25 (bm25s underneath) and reciprocal rank fusion, against bm25s itself and hand-written references."""

from __future__ import annotations

import math
import sysconfig
from collections import Counter
from pathlib import Path

import bm25s
import numpy as np
import pytest
from mbert_retrieval.evaluation.code_dataset import build_code_dataset
from mbert_retrieval.evaluation.data import load_beir

from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.search.bm25 import BM25Index
from mbert_retrieval.search.fusion import reciprocal_rank_fusion

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def code_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("json_email")
    build_code_dataset(STDLIB / "email", folder, show_progress=False)
    return load_beir(folder, "test")


def test_reproduces_bm25s_own_pipeline(code_set):
    ids = code_set.doc_ids
    texts = code_set.document_texts()
    ours = BM25Index.build(ids, texts)
    theirs = bm25s.BM25()
    theirs.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    queries = list(code_set.queries.values())
    # Whole rankings (k = every document), so that ties at a cut-off cannot differ.
    their_docs, their_scores = theirs.retrieve(
        bm25s.tokenize(queries, stopwords="en", show_progress=False), k=len(ids), show_progress=False
    )
    our_ids, our_scores = ours.search(queries, k=len(ids))
    compared = 0
    assert our_scores.shape == (len(queries), len(ids)) and our_scores.dtype == np.float32
    for query_ids, padded_scores, docs, scores in zip(our_ids, our_scores, their_docs, their_scores):
        query_scores = padded_scores[: len(query_ids)]
        assert np.isneginf(padded_scores[len(query_ids) :]).all()  # documents without a query term
        positive = scores > 0
        np.testing.assert_allclose(query_scores, scores[positive], rtol=1e-6)
        # Equal scores may come in either order; the documents at each score must agree.
        assert Counter(zip(np.round(query_scores, 5), query_ids)) == Counter(
            zip(np.round(scores[positive], 5), [ids[d] for d in docs[positive]])
        )
        compared += int(positive.sum())
    assert compared > 5 * len(queries)


def test_scores_equal_the_lucene_formula(code_set):
    """Lucene BM25 written out: idf = ln(1 + (N - df + .5) / (df + .5)); tf / (tf + k1 (1 - b + b dl / avgdl))."""
    texts = code_set.document_texts()
    k1, b = 1.2, 0.6
    index = BM25Index.build(code_set.doc_ids, texts, k1=k1, b=b)
    tokens = index.tokenize(texts)
    n_docs, avgdl = len(tokens), sum(map(len, tokens)) / len(tokens)
    df = Counter(t for doc in tokens for t in set(doc))
    counts = [Counter(doc) for doc in tokens]
    for query in list(code_set.queries.values())[:8]:
        expected = np.zeros(n_docs)
        for term in index.tokenize([query])[0]:
            if term not in df:
                continue
            idf = math.log(1 + (n_docs - df[term] + 0.5) / (df[term] + 0.5))
            for d, tf in enumerate(counts):
                if tf[term]:
                    expected[d] += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(tokens[d]) / avgdl))
        np.testing.assert_allclose(index.scores(query), expected, rtol=1e-5, atol=1e-6)


def test_search_details(tmp_path):
    texts = ["the cat sat on the mat", "a dog barks", "cats and dogs", "parseHeaderValue splits a header"]
    index = BM25Index.build(["a", "b", "c", "d"], texts)
    ids, scores = index.search(["cat", "zebra"], k=10)
    assert ids[0] == ["a"] and ids[1] == []  # non-matching documents are left out
    assert list(scores[0]) == sorted(scores[0], reverse=True)
    assert index.search("parse value", k=1)[0] == [[]]  # camelCase is one word by default
    split = BM25Index.build(["a", "b", "c", "d"], texts, split_identifiers=True)
    assert split.search("parse value", k=2)[0] == [["d"]]

    split.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    assert loaded.settings == split.settings
    for query in ("parse value", "dog", "cats mat"):
        assert loaded.search(query, 3)[0] == split.search(query, 3)[0]
        np.testing.assert_allclose(loaded.scores(query), split.scores(query))
    data_file = next(p for p in (tmp_path / "bm25").glob("data-*/*") if p.suffix == ".npy")
    data_file.write_bytes(data_file.read_bytes()[:-8])
    with pytest.raises(IndexFormatError, match="truncated"):
        BM25Index.load(tmp_path / "bm25")


@pytest.mark.parametrize("split_identifiers", [False, True])
def test_queries_without_terms_match_nothing(split_identifiers):
    """Stopwords, one-letter words, punctuation, emoji, NUL: nothing is left to score, so nothing
    matches (bm25s itself fails on an empty term list)."""
    texts = ["the cat sat on a mat", "x = a_b or the_thing", "def parse_header(value): ..."]
    index = BM25Index.build(["a", "b", "c"], texts, split_identifiers=split_identifiers)
    termless = ["the", "a", "x", "_", "?!", "()", "\U0001f600", "\x00", "", "   ", "the a of"]
    assert index.tokenize(termless) == [[] for _ in termless]
    for query in termless:
        scores = index.scores(query)
        assert scores.shape == (3,) and scores.dtype == np.float32 and not scores.any()
    ids, scores = index.search(termless, k=3)
    assert ids == [[] for _ in termless] and scores.shape == (len(termless), 3) and np.isneginf(scores).all()
    ids, _ = index.search(["the", "cat", "?!"], k=3)  # mixed with a query that has a term
    assert ids == [[], ["a"], []]


def test_bad_input():
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index.build([], [])
    with pytest.raises(ValueError, match="unique"):
        BM25Index.build(["a", "a"], ["x y", "y z"])
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        BM25Index.build(["a", "b"], ["x"])


def test_reciprocal_rank_fusion():
    dense = ["a", "b", "c"]
    lexical = ["c", "d", "a"]
    fused = dict(reciprocal_rank_fusion([dense, lexical], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["b"] == pytest.approx(1 / 62)
    assert fused["d"] == pytest.approx(1 / 62)
    order = [d for d, _ in reciprocal_rank_fusion([dense, lexical], k=60)]
    assert order[:2] == ["a", "c"] and set(order[2:]) == {"b", "d"}
    weighted = dict(reciprocal_rank_fusion([dense, lexical], k=0, weights=[2.0, 1.0]))
    assert weighted["b"] == pytest.approx(2 / 2) and weighted["d"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="weights"):
        reciprocal_rank_fusion([dense], weights=[1, 2])
