"""ColBERT: token vectors against padded references (ours and `transformers`'), query
augmentation, the skiplist and MaxSim."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from transformers import ModernBertModel as HFModel

from mbert_retrieval import ColBERT
from mbert_retrieval.models import Chunking, PackedEmbeddings
from mbert_retrieval.models.colbert import maxsim
from mbert_retrieval.models.encoding import pad_sequences

QUERIES = ["how to sort a list?", "open a file", "", "x" * 3, "what does os.path.join(a, b) return?" * 3]
DOCUMENTS = [
    "sorted(xs) returns a new, sorted list; xs.sort() sorts in place.",
    "with open(path) as f:\n    data = f.read()",
    "",
    "!!! ... ???",
    "def join(a, *p):\n    sep = '/'\n    path = a\n    for b in p:\n        path += sep + b\n    return path",
]


@pytest.fixture(scope="module")
def model(hf_mlm_dir) -> ColBERT:
    torch.manual_seed(0)
    return ColBERT.from_pretrained(hf_mlm_dir, query_length=16, document_length=48, device="cpu")


@pytest.fixture(scope="module")
def hf_copy(model, tmp_path_factory):
    """`transformers`' ModernBertModel on the same (grown-vocabulary) weights."""
    directory = tmp_path_factory.mktemp("colbert")
    model.save_pretrained(directory)
    return HFModel.from_pretrained(directory, attn_implementation="sdpa").eval()


def hf_token_vectors(model, hf, input_ids, attention_mask):
    with torch.no_grad():
        hidden = hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.nn.functional.normalize(model.projection(hidden), dim=-1)


def test_marker_tokens_added_and_embeddings_grown(model):
    assert model.tokenizer.convert_tokens_to_ids("[Q] ") == model.query_marker == 1000
    assert model.tokenizer.convert_tokens_to_ids("[D] ") == model.document_marker == 1001
    assert model.encoder.config.vocab_size == len(model.tokenizer) == 1002
    ids = model.tokenize_documents(["hello"])[0]
    assert ids[0] == model.tokenizer.cls_token_id and ids[1] == model.document_marker


def test_query_augmentation_layout(model):
    ids, keys, truncated = model.tokenize_queries(["open a file", "word " * 40])
    assert truncated == 1
    for seq, key in zip(ids, keys):
        assert len(seq) == 16 and seq[0] == model.tokenizer.cls_token_id and seq[1] == model.query_marker
        real = int(key.sum())
        assert seq[real - 1] == model.tokenizer.sep_token_id
        assert (seq[real:] == model.tokenizer.mask_token_id).all()
    assert keys[1].all()  # a full-length query has no expansion tokens


def test_queries_match_transformers_with_masked_expansion(model, hf_copy):
    """Expansion [MASK] tokens compute states but nobody attends to them: in `transformers` that is
    a padded batch whose attention_mask is 0 at those positions (what PyLate does)."""
    got = model.encode_queries(QUERIES, max_tokens_per_batch=40)
    ids, keys, _ = model.tokenize_queries(QUERIES)
    expected = hf_token_vectors(
        model, hf_copy, torch.tensor(np.stack(ids)), torch.tensor(np.stack(keys)).long()
    )
    assert got.shape == (len(QUERIES), 16, model.dim)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    # the padded reference path of our own gives the same
    with torch.no_grad():
        ours_padded = model(
            torch.tensor(np.stack(ids)), torch.ones(len(ids), 16), torch.tensor(np.stack(keys))
        )
    np.testing.assert_allclose(ours_padded.numpy(), got, atol=1e-5)


def test_queries_attending_to_expansion(hf_mlm_dir, hf_copy):
    torch.manual_seed(0)
    model = ColBERT.from_pretrained(
        hf_mlm_dir, query_length=16, attend_to_expansion_tokens=True, device="cpu"
    )
    ids, keys, _ = model.tokenize_queries(QUERIES)
    assert all(k.all() for k in keys)
    got = model.encode_queries(QUERIES)
    expected = hf_token_vectors(model, hf_copy, torch.tensor(np.stack(ids)), torch.ones(len(ids), 16).long())
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_queries_without_expansion_are_zero_padded(hf_mlm_dir):
    torch.manual_seed(0)
    model = ColBERT.from_pretrained(hf_mlm_dir, query_length=16, do_query_expansion=False, device="cpu")
    got = model.encode_queries(QUERIES)
    ids = model.tokenize_queries(QUERIES)[0]
    for row, seq in zip(got, ids):
        assert np.abs(row[len(seq) :]).max(initial=0) == 0
        with torch.no_grad():
            alone = model.forward_packed(
                torch.from_numpy(seq), torch.tensor([0, len(seq)], dtype=torch.int32), len(seq)
            )
        np.testing.assert_allclose(row[: len(seq)], alone.numpy(), atol=1e-5)


def test_documents_packed_equal_padded_reference_with_skiplist(model):
    got = model.encode_documents(DOCUMENTS, max_tokens_per_batch=30)
    ids = model.tokenize_documents(DOCUMENTS)
    input_ids, mask = pad_sequences(ids, model.tokenizer.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids, mask).numpy()
    skip = {model.tokenizer.convert_tokens_to_ids(p) for p in string.punctuation}
    for vectors, seq, row in zip(got, ids, padded):
        keep = np.array([t not in skip for t in seq])
        assert vectors.shape == (keep.sum(), model.dim)
        np.testing.assert_allclose(vectors, row[: len(seq)][keep], atol=1e-5)
    assert len(got[3]) < len(ids[3])  # "!!! ... ???" loses its punctuation
    assert len(got[3]) >= 3  # [CLS] [D] ... [SEP] stay


def test_skiplist_only_drops_vectors(hf_mlm_dir, model):
    """The skiplist is applied after encoding: punctuation still shapes the other tokens' vectors."""
    torch.manual_seed(0)
    unfiltered = ColBERT.from_pretrained(
        hf_mlm_dir, query_length=16, document_length=48, skiplist_words=[], device="cpu"
    )
    unfiltered.projection.load_state_dict(model.projection.state_dict())
    unfiltered.encoder.load_state_dict(model.encoder.state_dict())
    full = unfiltered.encode_documents(DOCUMENTS[:1])[0]
    filtered = model.encode_documents(DOCUMENTS[:1])[0]
    keep = model.kept(model.tokenize_documents(DOCUMENTS[:1])[0])
    assert len(full) == len(keep) > len(filtered)
    np.testing.assert_allclose(filtered, full[keep], atol=1e-6)


def test_documents_do_not_depend_on_batching(model):
    whole = model.encode_documents(DOCUMENTS)
    order = [4, 2, 0, 3, 1]
    shuffled = model.encode_documents([DOCUMENTS[i] for i in order], max_tokens_per_batch=8)
    for position, i in enumerate(order):
        np.testing.assert_allclose(shuffled[position], whole[i], atol=1e-5)
    packed = model.encode_documents(DOCUMENTS, packed=True)
    assert isinstance(packed, PackedEmbeddings) and len(packed) == len(DOCUMENTS)
    assert packed.offsets[-1] == len(packed.embeddings) == sum(len(d) for d in whole)
    for i, vectors in enumerate(whole):
        np.testing.assert_array_equal(packed[i], vectors)


def brute_force_maxsim(q: np.ndarray, d: np.ndarray) -> float:
    return sum(max(float(qi @ dj) for dj in d) for qi in q)


def test_maxsim_equals_brute_force(model):
    q = model.encode_queries(QUERIES)
    d = model.encode_documents(DOCUMENTS)
    scores = model.score(q, d)
    expected = np.array([[brute_force_maxsim(qi, dj) for dj in d] for qi in q])
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    einsum = np.stack([[np.einsum("id,jd->ij", qi, dj).max(axis=1).sum() for dj in d] for qi in q])
    np.testing.assert_allclose(scores, einsum, rtol=1e-5)
    np.testing.assert_allclose(
        model.score(q, model.encode_documents(DOCUMENTS, packed=True)), scores, rtol=1e-6
    )
    np.testing.assert_allclose(model.score(q[1], d), scores[1], rtol=1e-6)
    torch_scores = model.score(torch.from_numpy(q), [torch.from_numpy(x) for x in d])
    assert isinstance(torch_scores, torch.Tensor)


def test_maxsim_in_chunks(monkeypatch, model):
    q, d = model.encode_queries(QUERIES), model.encode_documents(DOCUMENTS)
    expected = maxsim(q, d)
    monkeypatch.setattr("mbert_retrieval.index.maxsim.MAXSIM_CHUNK_ELEMENTS", 1)
    np.testing.assert_allclose(maxsim(q, d), expected, rtol=1e-6)


def test_chunking_concatenates_windows(hf_mlm_dir):
    torch.manual_seed(0)
    model = ColBERT.from_pretrained(hf_mlm_dir, document_length=24, skiplist_words=[], device="cpu")
    long_text = " ".join(f"name{i}" for i in range(60))
    got = model.encode_documents([long_text], chunking={"size": 24, "stride": 16})[0]
    windows = model.text_tokenizer.windows([long_text], Chunking(24, 16), [model.document_marker])[0]
    assert len(windows) > 2
    expected = []
    for seq in windows:
        assert seq[1] == model.document_marker and len(seq) <= 24
        with torch.no_grad():
            expected.append(
                model.forward_packed(
                    torch.from_numpy(seq), torch.tensor([0, len(seq)], dtype=torch.int32), len(seq)
                )
            )
    np.testing.assert_allclose(got, torch.cat(expected).numpy(), atol=1e-5)


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = ColBERT.from_pretrained(tmp_path, device="cpu")
    assert (loaded.query_length, loaded.document_length) == (16, 48)
    assert loaded.encoder.config.vocab_size == 1002 and len(loaded.tokenizer) == 1002
    np.testing.assert_allclose(loaded.encode_queries(QUERIES), model.encode_queries(QUERIES), atol=1e-6)
    for a, b in zip(loaded.encode_documents(DOCUMENTS), model.encode_documents(DOCUMENTS)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_starts_from_a_dense_retriever_folder(hf_mlm_dir, tmp_path):
    """A sentence-transformers dense folder gives its Transformer (pooling and normalization dropped)
    and a fresh projection, as PyLate starts a ColBERT from one."""
    from mbert_retrieval import DenseRetriever

    dense = DenseRetriever.from_pretrained(hf_mlm_dir, device="cpu")
    dense.save_pretrained(tmp_path)
    colbert = ColBERT.from_pretrained(tmp_path, embedding_size=32, device="cpu")
    assert colbert.dim == 32 and colbert.encoder.config.vocab_size == len(colbert.tokenizer) == 1002
    for name, weight in dense.encoder.state_dict().items():
        if not name.endswith("tok_embeddings.weight"):  # grown by the two marker tokens
            assert torch.equal(colbert.encoder.state_dict()[name], weight), name
    assert colbert.encode_documents(["def f(): pass"])[0].shape[1] == 32


def test_bad_inputs(model):
    assert model.encode_queries([]).shape == (0, 16, model.dim)
    assert model.encode_documents([]) == []
    assert len(model.encode_documents([], packed=True)) == 0
    assert model.encode_queries("one query").shape == (16, model.dim)
    assert model.encode_documents("one document").shape[1] == model.dim
    with pytest.raises(TypeError, match=r"queries\[1\] is NoneType"):
        model.encode_queries(["a", None])
    with pytest.raises(TypeError, match=r"documents\[0\] is bytes"):
        model.encode_documents([b"bytes"])
    with pytest.raises(TypeError, match="got None"):
        model.encode_documents(None)
    q = model.encode_queries(["a"])
    with pytest.raises(ValueError, match=r"documents\[0\] has shape"):
        model.score(q, [np.zeros((3, 7), dtype=np.float32)])
    with pytest.raises(ValueError, match="queries must be"):
        model.score(q[0, 0], model.encode_documents(["a"]))
    assert model.score(q, []).shape == (1, 0)
    with pytest.raises(TypeError, match="unknown ColBERT settings"):
        ColBERT.from_pretrained("/nonexistent", query_len=3)
