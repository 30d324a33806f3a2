"""CUDA-graph replay of the packed inference forward: the padding on any device, the replays on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.cuda_graphs import GraphedForward, GraphShapes, pad_batch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def packed_batch(lengths: list[int], vocab: int = 1000, device: str = "cpu"):
    ids = torch.randint(3, vocab, (sum(lengths),), device=device)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    return ids, cu, max(lengths)


def test_shapes_round_tokens_sequences_and_longest_up():
    shapes = GraphShapes(tokens=256, sequences=16, pad_length=128)
    # 204 padding tokens make two padding sequences: 66 sequences, rounded to 80.
    assert shapes.padded(15_924, 64, 407) == (16_128, 80, 512)
    assert shapes.padded(512, 16, 128) == (512, 16, 128)  # already a padded shape
    assert shapes.padded(1, 1, 1) == (256, 16, 128)
    with pytest.raises(ValueError, match="positive"):
        GraphShapes(tokens=0)


@pytest.mark.parametrize("lengths", [[5, 300, 1, 64], [128, 128], [7]])
def test_padding_keeps_the_batch_and_appends_short_sequences(lengths):
    shapes = GraphShapes(tokens=64, sequences=4, pad_length=16)
    ids, cu, longest = packed_batch(lengths)
    padded_ids, padded_cu, padded_longest = pad_batch(ids, cu, max(lengths), shapes, pad_id=2)
    total, sequences, expected_longest = shapes.padded(ids.numel(), len(lengths), max(lengths))
    assert padded_ids.shape == (total,) and padded_cu.shape == (sequences + 1,)
    assert padded_longest == expected_longest >= max(lengths)
    assert torch.equal(padded_ids[: ids.numel()], ids) and (padded_ids[ids.numel() :] == 2).all()
    assert torch.equal(padded_cu[: len(lengths) + 1], cu) and padded_cu.dtype == torch.int32
    added = padded_cu[len(lengths) :].diff()
    assert int(padded_cu[-1]) == total and (added >= 0).all() and (added <= 16).all()


def test_padded_forward_gives_the_batch_its_own_outputs(hf_encoder_dir):
    """Padding sequences, empty ones included, change nothing for the real tokens."""
    model = ModernBert.from_pretrained(hf_encoder_dir)
    ids, cu, longest = packed_batch([5, 40, 1, 33])
    padded = pad_batch(ids, cu, longest, GraphShapes(tokens=64, sequences=8, pad_length=16), pad_id=2)
    with torch.inference_mode():
        expected = model.forward_packed(ids, cu, longest)
        got = model.forward_packed(*padded)[: ids.numel()]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_graphs_need_a_cuda_model_in_eval_mode(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedForward(model)


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_replays_equal_the_plain_forward_and_earlier_outputs_stay(hf_encoder_dir, compiled):
    model = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", dtype=torch.bfloat16)
    plain = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", dtype=torch.bfloat16)
    if compiled:
        model.compile_forward()
    graphed = GraphedForward(model, GraphShapes(tokens=128, sequences=8, pad_length=32))
    batches = [[5, 40, 1, 33], [7, 7, 7], [200, 3], [6, 41, 2, 30], [300]]  # 1 and 4 share a shape
    with torch.inference_mode():
        outputs = []
        for lengths in batches:
            ids, cu, longest = packed_batch(lengths, device="cuda")
            expected = plain.forward_packed(ids, cu, longest).float()
            got = graphed(ids, cu, longest)
            assert got.shape == expected.shape and torch.isfinite(got).all()
            # bf16: as the compiled forward against the eager one (tests/test_attention_backends.py)
            assert (got.float() - expected).norm() / expected.norm() < 2e-2
            outputs.append((got, got.clone()))
    for got, copy_then in outputs:  # later replays overwrote none of the returned outputs
        assert torch.equal(got, copy_then)
    assert len(graphed.recordings) == 4


@needs_cuda
def test_replays_refuse_a_batch_on_another_device(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir, device="cuda")
    ids, cu, longest = packed_batch([5, 6])
    with pytest.raises(ValueError, match="model's device"):
        GraphedForward(model)(ids, cu, longest)
