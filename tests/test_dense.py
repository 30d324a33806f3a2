"""DenseRetriever: the packed encoding path against the padded reference, and its options."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mbert_retrieval import DenseRetriever
from mbert_retrieval.modeling.io import CheckpointError
from mbert_retrieval.models import Chunking
from mbert_retrieval.models.encoding import (
    CPU_MAX_TOKENS_PER_BATCH,
    DEFAULT_MAX_TOKENS_PER_BATCH,
    default_max_tokens,
    pack,
    pad_sequences,
)

TEXTS = [
    "def add(a, b):\n    return a + b",
    "",
    "import os",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)",
    "Return the number of items in the container.",
    "ünïcödé text — with dashes",
    "x = [i * i for i in range(10) if i % 2]\n" * 4,
    "for line in open(path):\n    print(line.rstrip())",
    "a",
]


def reference(model: DenseRetriever, texts: list[str], prefix: str = "") -> np.ndarray:
    """The padded path: plain `encoder(input_ids, attention_mask)` and masked pooling."""
    input_ids, mask = pad_sequences(model.tokenize(texts, prefix), model.tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids, mask).numpy()


@pytest.fixture(scope="module")
def model(hf_mlm_dir) -> DenseRetriever:
    torch.manual_seed(0)
    return DenseRetriever.from_pretrained(
        hf_mlm_dir, projection_dim=48, query_prefix="query: ", document_prefix="passage: ", device="cpu"
    )


@pytest.fixture(scope="module")
def short_model(hf_mlm_dir) -> DenseRetriever:
    """Inputs limited to 32 tokens, to exercise truncation and chunking."""
    torch.manual_seed(0)
    return DenseRetriever.from_pretrained(hf_mlm_dir, projection_dim=48, max_length=32, device="cpu")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_equals_padded_reference(hf_mlm_dir, pooling):
    torch.manual_seed(0)
    model = DenseRetriever.from_pretrained(hf_mlm_dir, pooling=pooling, projection_dim=48, device="cpu")
    got = model.encode(TEXTS, max_tokens_per_batch=64)
    np.testing.assert_allclose(got, reference(model, TEXTS), atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 48)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_unnormalised_without_projection(hf_mlm_dir):
    model = DenseRetriever.from_pretrained(hf_mlm_dir, normalize=False, device="cpu")
    got = model.encode(TEXTS)
    assert got.shape == (len(TEXTS), 64)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)
    np.testing.assert_allclose(got, reference(model, TEXTS), atol=1e-5)


def test_independent_of_batch_composition_and_order(model):
    whole = model.encode(TEXTS, max_tokens_per_batch=100_000)
    tiny_batches = model.encode(TEXTS, max_tokens_per_batch=8)
    order = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = model.encode([TEXTS[i] for i in order], max_tokens_per_batch=40)
    one_by_one = np.stack([model.encode(text) for text in TEXTS])
    np.testing.assert_allclose(tiny_batches, whole, atol=1e-5)
    np.testing.assert_allclose(shuffled, whole[order], atol=1e-5)
    np.testing.assert_allclose(one_by_one, whole, atol=1e-5)


def test_cpu_attention_equals_repadded_reference(model):
    texts = TEXTS + ["\n".join(TEXTS) * 3, TEXTS[3] * 2, TEXTS[3] * 2]  # long and equal-length ones
    assert model.encoder.attn_backend == "auto"  # packed_sdpa on the CPU
    fast = model.encode(texts)
    model.encoder.attn_backend = "reference"
    try:
        slow = model.encode(texts)
    finally:
        model.encoder.attn_backend = "auto"
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_default_batch_budget_depends_on_the_devices():
    assert default_max_tokens([torch.device("cpu")]) == CPU_MAX_TOKENS_PER_BATCH
    assert default_max_tokens([torch.device("cpu"), torch.device("cuda", 0)]) == DEFAULT_MAX_TOKENS_PER_BATCH


def test_several_devices_give_the_same_result(model):
    np.testing.assert_allclose(
        model.encode(TEXTS, devices=["cpu", "cpu"], max_tokens_per_batch=16),
        model.encode(TEXTS),
        atol=1e-6,
    )


def test_prefixes(model):
    queries = model.encode_queries(TEXTS)
    documents = model.encode_documents(TEXTS)
    np.testing.assert_allclose(queries, reference(model, TEXTS, "query: "), atol=1e-5)
    np.testing.assert_allclose(documents, model.encode(["passage: " + t for t in TEXTS]), atol=1e-6)
    assert np.abs(queries - documents).max() > 1e-3


def test_matryoshka_dim(model):
    full = model.encode(TEXTS)
    short = model.encode(TEXTS, dim=16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert short.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(short, expected, atol=1e-5)


def test_output_types(model):
    tensor = model.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), model.encode(TEXTS), atol=1e-6)
    one = model.encode(TEXTS[0])
    assert one.shape == (48,)
    np.testing.assert_allclose(one, model.encode(TEXTS[:1])[0], atol=1e-6)


def test_similarity(model):
    q, d = model.encode_queries(TEXTS[:3]), model.encode_documents(TEXTS)
    scores = model.similarity(q, d)
    assert isinstance(scores, np.ndarray) and scores.shape == (3, len(TEXTS))
    np.testing.assert_allclose(scores, q @ d.T, atol=1e-5)
    as_tensor = model.similarity(torch.from_numpy(q), torch.from_numpy(d))
    assert isinstance(as_tensor, torch.Tensor)
    with pytest.raises(ValueError, match="different sizes"):
        model.similarity(q, d[:, :10])


def test_truncation_is_logged_and_matches_the_tokenizer(short_model, caplog):
    long_text = " ".join(f"word{i}" for i in range(200))
    with caplog.at_level(logging.WARNING, logger="mbert_retrieval"):
        got = short_model.encode([long_text, "short"])
    assert "1 of 2 texts are longer than 32 tokens and were truncated" in caplog.text
    expected_ids = short_model.tokenizer(long_text, truncation=True, max_length=32)["input_ids"]
    assert short_model.tokenize([long_text])[0].tolist() == expected_ids
    np.testing.assert_allclose(got, reference(short_model, [long_text, "short"]), atol=1e-5)


def test_chunk_windows_cover_the_text():
    chunking = Chunking(size=32, stride=20)
    spans = chunking.content_windows(100, room=30)
    assert spans[0][0] == 0 and spans[-1][1] == 100
    assert all(b - a <= 30 for a, b in spans)
    assert all(nxt[0] <= cur[1] for cur, nxt in zip(spans, spans[1:]))  # no gaps
    assert chunking.content_windows(10, room=30) == [(0, 10)]
    with pytest.raises(ValueError, match="skipped"):
        Chunking(size=32, stride=40).content_windows(100, room=30)


def test_chunking_averages_window_vectors(short_model):
    long_text = " ".join(f"word{i}" for i in range(120))
    texts = ["fits in one window", long_text]
    chunking = {"size": 32, "stride": 24}
    chunks = short_model.encode_document_chunks(texts, chunking=chunking)
    assert chunks.document.tolist().count(0) == 1 and chunks.document.tolist().count(1) > 2
    assert chunks.window[chunks.document == 1].tolist() == list(range((chunks.document == 1).sum()))

    # each window vector is the plain encoding of that window's tokens
    windows = short_model.text_tokenizer.windows([long_text], Chunking(32, 24))[0]
    assert len(windows) == (chunks.document == 1).sum() and all(len(w) <= 32 for w in windows)
    input_ids, mask = pad_sequences(windows, short_model.tokenizer.pad_token_id)
    with torch.no_grad():
        expected_windows = short_model(input_ids, mask).numpy()
    np.testing.assert_allclose(chunks.embeddings[chunks.document == 1], expected_windows, atol=1e-5)

    documents = short_model.encode_documents(texts, chunking=chunking)
    mean = expected_windows.mean(axis=0)
    np.testing.assert_allclose(documents[1], mean / np.linalg.norm(mean), atol=1e-5)
    np.testing.assert_allclose(documents[0], short_model.encode_documents(texts[:1])[0], atol=1e-6)


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    for name in (
        "modules.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "2_Dense/model.safetensors",
    ):
        assert (tmp_path / name).exists(), name
    loaded = DenseRetriever.from_pretrained(tmp_path, device="cpu")
    assert (loaded.pooling, loaded.dim, loaded.normalize) == ("mean", 48, True)
    assert (loaded.query_prefix, loaded.document_prefix) == ("query: ", "passage: ")
    np.testing.assert_allclose(loaded.encode_queries(TEXTS), model.encode_queries(TEXTS), atol=1e-6)


def test_bare_encoder_with_separate_tokenizer(hf_encoder_dir, hf_mlm_dir, tokenizer_dir):
    with pytest.raises(CheckpointError, match="tokenizer="):
        DenseRetriever.from_pretrained(hf_encoder_dir, device="cpu")
    from_encoder = DenseRetriever.from_pretrained(hf_encoder_dir, tokenizer=tokenizer_dir, device="cpu")
    from_mlm = DenseRetriever.from_pretrained(hf_mlm_dir, device="cpu")
    np.testing.assert_allclose(from_encoder.encode(TEXTS), from_mlm.encode(TEXTS), atol=1e-6)


def test_bad_inputs(model, tmp_path):
    assert model.encode([]).shape == (0, 48)
    assert model.encode([], dim=8).shape == (0, 8)
    empty = model.encode([""])
    assert np.isfinite(empty).all() and abs(np.linalg.norm(empty) - 1) < 1e-5
    with pytest.raises(TypeError, match="got None"):
        model.encode(None)
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        model.encode(["a", None])
    with pytest.raises(TypeError, match=r"texts\[0\] is int"):
        model.encode_documents([3])
    with pytest.raises(ValueError, match="dim must be"):
        model.encode(["a"], dim=0)
    with pytest.raises(ValueError, match="dim must be"):
        model.encode(["a"], dim=49)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        model.encode(["a"], max_tokens_per_batch=0)
    with pytest.raises(ValueError, match="'size' and 'stride'"):
        model.encode(["a"], chunking={"size": 16})
    with pytest.raises(ValueError, match="larger than the model's limit"):
        model.encode(["a"], chunking={"size": 5000, "stride": 100})
    with pytest.raises(CheckpointError, match="does not exist"):
        DenseRetriever.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        pack([np.array([0, 5000, 1])], [0], vocab_size=1000, max_positions=1024)
    with pytest.raises(ValueError, match="pooling must be"):
        DenseRetriever(model.encoder, model.tokenizer, pooling="max")


def test_progress_bar_runs(model, capsys):
    got = model.encode(TEXTS * 3, show_progress_bar=True, max_tokens_per_batch=32)
    assert "27/27" in capsys.readouterr().err
    np.testing.assert_allclose(got[: len(TEXTS)], model.encode(TEXTS), atol=1e-6)


def test_no_default_model_gives_a_clear_error(monkeypatch, tmp_path):
    from mbert_retrieval.models import dense

    monkeypatch.setattr(dense, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no default model is shipped"):
        DenseRetriever.from_pretrained()
