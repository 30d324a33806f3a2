"""CrossEncoder: scores against `transformers`' ModernBertForSequenceClassification, reranking,
and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, ModernBertForSequenceClassification

from mbert_retrieval import CrossEncoder
from mbert_retrieval.models.encoding import pad_sequences

QUERY = "how do I read a file?"
DOCUMENTS = [
    "with open(path) as f:\n    data = f.read()",
    "sorted(xs) returns a new list",
    "",
    "import os\nos.listdir('.')",
    "f = open(path); text = f.read(); f.close()  # read the whole file " * 6,
]
PAIRS = [(QUERY, d) for d in DOCUMENTS] + [("", "an empty query"), ("q", "d")]
ATOL = 1e-4  # the classifier's large random weights (std 10) magnify float32 rounding ~10x


def make_reranker(directory, hf_mlm_dir, pooling: str, num_labels: int = 1):
    """A random `transformers` reranker with a head large enough for scores to differ clearly."""
    torch.manual_seed(1)
    hf = ModernBertForSequenceClassification.from_pretrained(
        hf_mlm_dir, num_labels=num_labels, classifier_pooling=pooling
    ).eval()
    with torch.no_grad():
        hf.head.dense.weight.normal_(0, 1.0)
        hf.head.norm.weight.normal_(0, 1.0)
        hf.classifier.weight.normal_(0, 10.0)
        hf.classifier.bias.zero_()
        # centre the scores so the sigmoid is not saturated
        hf.classifier.bias.sub_(hf_logits(hf, AutoTokenizer.from_pretrained(hf_mlm_dir), PAIRS).mean(dim=0))
    hf.save_pretrained(directory)
    AutoTokenizer.from_pretrained(hf_mlm_dir).save_pretrained(directory)
    return hf


def hf_logits(hf, tokenizer, pairs, max_length=None):
    batch = tokenizer(
        [q for q, _ in pairs],
        [d for _, d in pairs],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def reranker(hf_mlm_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reranker")
    hf = make_reranker(directory, hf_mlm_dir, "cls")
    return hf, CrossEncoder.from_pretrained(directory, device="cpu")


def test_logits_match_transformers(reranker):
    check_against_transformers(*reranker)


def test_mean_pooling_matches_transformers(hf_mlm_dir, tmp_path):
    hf = make_reranker(tmp_path, hf_mlm_dir, "mean")
    model = CrossEncoder.from_pretrained(tmp_path, device="cpu")
    assert model.pooling == "mean"
    check_against_transformers(hf, model)


def check_against_transformers(hf, model):
    got = model.predict(PAIRS, apply_activation=False, max_tokens_per_batch=40)
    expected = hf_logits(hf, model.tokenizer, PAIRS)[:, 0].numpy()
    assert got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    assert np.ptp(got) > 0.1  # 5 seeds x 3 attention paths: 0.47-1.23
    np.testing.assert_allclose(model.predict(PAIRS), 1 / (1 + np.exp(-expected)), atol=ATOL)


def test_packed_equals_padded_reference(reranker):
    _, model = reranker
    ids = model.tokenize_pairs([q for q, _ in PAIRS], [d for _, d in PAIRS])
    input_ids, mask = pad_sequences(ids, model.tokenizer.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids, mask)[:, 0].numpy()
    np.testing.assert_allclose(model.predict(PAIRS, apply_activation=False), padded, atol=ATOL)


def test_long_pairs_truncated_like_transformers(hf_mlm_dir, tmp_path, caplog):
    hf = make_reranker(tmp_path, hf_mlm_dir, "cls")
    model = CrossEncoder.from_pretrained(tmp_path, max_length=24, device="cpu")
    pairs = [(QUERY * 3, DOCUMENTS[4]), ("short", "pair")]
    ids = model.tokenize_pairs([q for q, _ in pairs], [d for _, d in pairs])
    expected_ids = model.tokenizer(
        [q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=24
    )
    assert [s.tolist() for s in ids] == expected_ids["input_ids"]
    with caplog.at_level("WARNING", logger="mbert_retrieval"):
        got = model.predict(pairs, apply_activation=False)
    assert "1 of 2 pairs are longer than 24 tokens" in caplog.text
    np.testing.assert_allclose(got, hf_logits(hf, model.tokenizer, pairs, 24)[:, 0].numpy(), atol=ATOL)


def test_rerank(reranker):
    _, model = reranker
    scores = model.predict([(QUERY, d) for d in DOCUMENTS])
    ranked = model.rerank(QUERY, DOCUMENTS)
    assert [hit["corpus_id"] for hit in ranked] == np.argsort(-scores, kind="stable").tolist()
    assert [hit["score"] for hit in ranked] == sorted(scores.tolist(), reverse=True)
    top = model.rerank(QUERY, DOCUMENTS, top_k=2, return_documents=True)
    assert len(top) == 2 and top[0]["text"] == DOCUMENTS[top[0]["corpus_id"]]
    assert model.rerank(QUERY, []) == []


def test_independent_of_batching(reranker):
    _, model = reranker
    whole = model.predict(PAIRS)
    reversed_order = model.predict(PAIRS[::-1], max_tokens_per_batch=10)
    np.testing.assert_allclose(reversed_order[::-1], whole, atol=ATOL)
    np.testing.assert_allclose(model.predict(PAIRS, devices=["cpu", "cpu"]), whole, atol=1e-6)


def test_fresh_head_keeps_the_masked_lm_head(hf_mlm_dir):
    torch.manual_seed(0)
    model = CrossEncoder.from_pretrained(hf_mlm_dir, device="cpu")
    hf = ModernBertForSequenceClassification.from_pretrained(hf_mlm_dir, num_labels=1)
    torch.testing.assert_close(model.head.dense.weight, hf.head.dense.weight)
    torch.testing.assert_close(model.head.norm.weight, hf.head.norm.weight)
    assert model.num_labels == 1 and model.pooling == hf.config.classifier_pooling
    assert model.predict(PAIRS).shape == (len(PAIRS),)


def test_several_labels(hf_mlm_dir, tmp_path):
    hf = make_reranker(tmp_path, hf_mlm_dir, "cls", num_labels=3)
    model = CrossEncoder.from_pretrained(tmp_path, device="cpu")
    got = model.predict(PAIRS)
    assert got.shape == (len(PAIRS), 3)
    np.testing.assert_allclose(got, hf_logits(hf, model.tokenizer, PAIRS).numpy(), atol=ATOL)  # identity
    with pytest.raises(ValueError, match="one score per pair"):
        model.rerank(QUERY, DOCUMENTS)


def test_save_and_load_round_trip(reranker, tmp_path):
    _, model = reranker
    model.save_pretrained(tmp_path)
    loaded = CrossEncoder.from_pretrained(tmp_path, device="cpu")
    assert loaded.pooling == model.pooling and loaded.activation == model.activation
    np.testing.assert_allclose(loaded.predict(PAIRS), model.predict(PAIRS), atol=1e-6)
    hf = ModernBertForSequenceClassification.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(
        hf_logits(hf, model.tokenizer, PAIRS)[:, 0].numpy(),
        model.predict(PAIRS, apply_activation=False),
        atol=ATOL,
    )


def test_bad_inputs(reranker):
    _, model = reranker
    assert model.predict([]).shape == (0,)
    with pytest.raises(ValueError, match=r"pairs\[1\] must be a \(query, document\) pair"):
        model.predict([("a", "b"), ("only one",)])
    with pytest.raises(ValueError, match=r"pairs\[0\] must be"):
        model.predict([("a", "b", "c")])
    with pytest.raises(TypeError, match=r"pairs\[0\]\[1\] is NoneType"):
        model.predict([("a", None)])
    with pytest.raises(TypeError, match="list of"):
        model.predict("a string")
    with pytest.raises(TypeError, match="got None"):
        model.predict(None)
    with pytest.raises(TypeError, match="query must be a string"):
        model.rerank(None, ["a"])
    with pytest.raises(TypeError, match=r"documents\[1\] is int"):
        model.rerank("q", ["a", 1])
    with pytest.raises(ValueError, match="top_k must be positive"):
        model.rerank("q", ["a"], top_k=0)
