"""Encoding with one process per device gives what one process gives, in input order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import stdlib_texts

from mbert_retrieval.models.colbert import ColBERT
from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.models.processes import (
    PROCESS_MIN_TEXTS,
    EncodingPool,
    deal_by_length,
    encode_in_processes,
    uses_processes,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    sources = stdlib_texts(12)
    return [
        source[start : start + 40 + 37 * (start % 11)] for source in sources for start in range(0, 2400, 400)
    ]


def test_dense_embeddings_from_two_processes_equal_one_process(hf_mlm_dir, texts):
    model = DenseRetriever.from_pretrained(hf_mlm_dir, device="cpu")
    single = model.encode_documents(texts)
    with EncodingPool(model, ["cpu", "cpu"]) as pool:
        spread = pool.run("encode_documents", texts)
        again = pool.run("encode_queries", texts[:5], convert_to_tensor=True)  # the same processes
        assert pool.seconds > 0
    assert isinstance(spread, np.ndarray) and spread.shape == single.shape
    np.testing.assert_allclose(spread, single, atol=1e-5)
    assert isinstance(again, torch.Tensor)
    np.testing.assert_allclose(again.numpy(), model.encode_queries(texts[:5]), atol=1e-5)


def test_colbert_outputs_from_two_processes_keep_input_order(hf_mlm_dir, texts):
    model = ColBERT.from_pretrained(hf_mlm_dir, device="cpu")
    single = model.encode_documents(texts)
    spread = encode_in_processes(model, "encode_documents", texts, ["cpu", "cpu"])
    assert [len(m) for m in spread] == [len(m) for m in single]
    for ours, reference in zip(spread, single):
        np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_a_failing_process_is_an_error_naming_it(hf_mlm_dir):
    model = DenseRetriever.from_pretrained(hf_mlm_dir, device="cpu")
    with pytest.raises(RuntimeError, match="encoding process .* failed"):
        encode_in_processes(model, "encode_documents", ["a", "b"], ["cpu", "cpu"], dim=10_000)


def test_shares_have_the_same_mix_of_lengths_and_cover_every_text():
    lengths = [5, 100, 7, 60, 3, 90, 1]
    shares = deal_by_length(lengths, 2)
    assert sorted(np.concatenate(shares).tolist()) == list(range(len(lengths)))
    assert 1 in shares[0] and 5 in shares[1]  # the two longest texts go to different shares
    assert abs(len(shares[0]) - len(shares[1])) <= 1


def test_only_several_cuda_devices_and_many_texts_hand_over_to_processes():
    many = PROCESS_MIN_TEXTS
    assert uses_processes(["cuda:0", "cuda:1"], many)
    assert not uses_processes(["cuda:0", "cuda:1"], many - 1)
    assert not uses_processes(["cuda:0"], many)
    assert not uses_processes(["cpu", "cpu"], many)
    assert not uses_processes(None, many)
    assert not uses_processes([torch.device("cuda:0"), "cuda:0"], many)
