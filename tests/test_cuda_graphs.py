"""CUDA-graph replay of the packed inference forward: the padding on any device, the replays on a GPU."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.cuda_graphs import (
    GraphedForward,
    GraphShapes,
    ModelGraphs,
    fill_padded,
    pad_batch,
    split_point,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def packed_batch(lengths: list[int], vocab: int = 1000, device: str = "cpu"):
    ids = torch.randint(3, vocab, (sum(lengths),), device=device)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    return ids, cu, max(lengths)


def test_shapes_round_tokens_sequences_and_longest_up():
    shapes = GraphShapes(tokens=256, sequences=16, pad_length=128, token_offset=0)
    # 204 padding tokens make two padding sequences: 66 sequences, rounded to 80.
    assert shapes.padded(15_924, 64, 407) == (16_128, 80, 512)
    assert shapes.padded(512, 16, 128) == (512, 16, 128)  # already a padded shape
    assert shapes.padded(1, 1, 1) == (256, 16, 128)
    with pytest.raises(ValueError, match="positive"):
        GraphShapes(tokens=0)
    with pytest.raises(ValueError, match="not negative"):
        GraphShapes(token_offset=-1)


def test_token_counts_are_rounded_to_the_offset_past_a_multiple():
    shapes = GraphShapes()  # 128 tokens, offset 32: never a multiple of 64
    assert shapes.padded(15_924, 64, 407)[0] == 16_032
    assert shapes.padded(16_032, 64, 407)[0] == 16_032
    assert shapes.padded(16_033, 64, 407)[0] == 16_160
    assert shapes.padded(1, 1, 1)[0] == 32
    assert all(shapes.padded(n, 1, 1)[0] % 64 == 32 for n in range(1, 1000))
    assert all(0 <= shapes.padded(n, 1, 1)[0] - n < 128 for n in range(1, 1000))


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


def test_split_point_is_the_boundary_nearest_the_middle():
    assert split_point([0, 10, 20, 30, 40]) == 2
    assert split_point([0, 100, 101, 102]) == 1  # one long sequence, then two short ones
    assert split_point([0, 1, 2, 100]) == 2  # never the last boundary, even when nearer
    assert split_point([0, 5, 6]) == 1
    with pytest.raises(ValueError, match="cannot be cut"):
        split_point([0, 7])
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):  # against the nearest boundary found by looking at every one
        lengths = torch.randint(
            1, 50, (int(torch.randint(2, 40, (1,), generator=generator)),), generator=generator
        )
        ends = [0, *lengths.cumsum(0).tolist()]
        nearest = min(range(1, len(ends) - 1), key=lambda i: abs(ends[i] - ends[-1] / 2))
        assert split_point(ends) == nearest


def test_a_later_half_is_padded_as_a_batch_of_its_own():
    """The second half's cu_seqlens is read from the whole batch's, its first entry subtracted."""
    shapes = GraphShapes(tokens=32, sequences=4, pad_length=8)
    ids, cu, _ = packed_batch([5, 9, 3, 12, 7])
    ends = cu.tolist()
    cut = split_point(ends)
    half_ids, half_cu = ids[ends[cut] :], cu[cut:] - ends[cut]
    expected = pad_batch(half_ids, half_cu, 12, shapes, pad_id=2)
    total, sequences, _ = shapes.padded(half_ids.numel(), half_cu.numel() - 1, 12)
    got_ids, got_cu = torch.zeros(total, dtype=torch.long), torch.zeros(sequences + 1, dtype=torch.int32)
    fill_padded(got_ids, got_cu, half_ids, cu[cut:], shapes.pad_length, 2, cu_offset=ends[cut])
    assert torch.equal(got_ids, expected[0]) and torch.equal(got_cu, expected[1])


def test_streams_are_one_or_two():
    with pytest.raises(ValueError, match="streams must be 1 or 2"):
        GraphedForward(torch.nn.Linear(2, 2), streams=3)
    with pytest.raises(ValueError, match="streams must be 1 or 2"):
        ModelGraphs(streams=0)


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


def assert_replays_equal_plain_calls(graphed, plain, batches: list[list[int]]) -> None:
    """Each batch replayed equals the plain forward, and later replays overwrite no earlier output."""
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
    for got, copy_then in outputs:
        assert torch.equal(got, copy_then)


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_replays_equal_the_plain_forward_and_earlier_outputs_stay(hf_encoder_dir, compiled):
    model = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", dtype=torch.bfloat16)
    plain = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", dtype=torch.bfloat16)
    if compiled:
        model.compile_forward()
    graphed = GraphedForward(model, GraphShapes(tokens=128, sequences=8, pad_length=32))
    batches = [[5, 40, 1, 33], [7, 7, 7], [200, 3], [6, 41, 2, 30], [300]]  # 1 and 4 share a shape
    assert_replays_equal_plain_calls(graphed, plain, batches)
    assert len(graphed.recordings) == 4


@needs_cuda
def test_two_stream_replays_equal_the_plain_forward(hf_encoder_dir):
    """Each batch's halves recorded on two streams; a batch of one sequence runs whole."""
    model = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", dtype=torch.bfloat16)
    graphed = GraphedForward(model, GraphShapes(tokens=64, sequences=4, pad_length=32), streams=2)
    batches = [[5, 40, 1, 33], [300], [7, 7, 7], [200, 3, 90, 64, 1], [6, 39, 2, 33]]
    assert_replays_equal_plain_calls(graphed, model, batches)
    assert [len(key) for key in graphed.recordings] == [2, 1, 2, 2]  # the last batch reuses the first's


@needs_cuda
def test_replays_refuse_a_batch_on_another_device(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir, device="cuda")
    ids, cu, longest = packed_batch([5, 6])
    with pytest.raises(ValueError, match="model's device"):
        GraphedForward(model)(ids, cu, longest)


def test_model_switch_replays_only_plain_inference_calls_on_cuda(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir).use_cuda_graphs(GraphShapes(tokens=64))
    on_cuda = types.SimpleNamespace(is_cuda=True)
    with torch.no_grad():
        assert model._graphs.serves(model, on_cuda, plain_call=True)
        assert not model._graphs.serves(model, on_cuda, plain_call=False)  # positions or a key mask
        assert not model._graphs.serves(model, torch.zeros(3), plain_call=True)  # the CPU
        model.train()
        assert not model._graphs.serves(model, on_cuda, plain_call=True)  # training mode
        model.eval()
    assert not model._graphs.serves(model, on_cuda, plain_call=True)  # gradients on


def test_model_switch_leaves_cpu_calls_as_they_were_and_copies_start_empty(hf_encoder_dir):
    plain = ModernBert.from_pretrained(hf_encoder_dir)
    model = ModernBert.from_pretrained(hf_encoder_dir).use_cuda_graphs(GraphShapes(tokens=64))
    ids, cu, longest = packed_batch([5, 40, 1])
    with torch.inference_mode():
        torch.testing.assert_close(
            model.forward_packed(ids, cu, longest), plain.forward_packed(ids, cu, longest)
        )
    replica = copy.deepcopy(model)
    assert isinstance(replica._graphs, ModelGraphs) and replica._graphs is not model._graphs
    assert copy.deepcopy(ModelGraphs(streams=2)).streams == 2
    assert replica._graphs.shapes == GraphShapes(tokens=64) and replica._graphs._graphed is None
    model._graphs._graphed = "recordings"  # stands in for recordings made on a GPU
    model.to(torch.float64)  # a cast: new weight storage, so the recordings are forgotten
    assert model._graphs._graphed is None and model._graphs.shapes == GraphShapes(tokens=64)
    assert model.use_cuda_graphs(enabled=False)._graphs is None


@needs_cuda
def test_model_switch_replays_and_records_again_after_a_move(hf_encoder_dir):
    plain = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", dtype=torch.bfloat16)
    model = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", dtype=torch.bfloat16)
    model.use_cuda_graphs(GraphShapes(tokens=128, sequences=8, pad_length=32))
    ids, cu, longest = packed_batch([5, 40, 1, 33], device="cuda")
    with torch.inference_mode():
        expected = plain.forward_packed(ids, cu, longest).float()
        got = model.forward_packed(ids, cu, longest).float()
        assert (got - expected).norm() / expected.norm() < 2e-2
        first = model._graphs._graphed
        assert first is not None and len(first.recordings) == 1
    old_weights = [weight.data for weight in model.parameters()]  # kept: new storage can't reuse it
    model.to("cpu").to("cuda")  # new weight storage: the recordings would read the old one
    assert all(new.data_ptr() != old.data_ptr() for new, old in zip(model.parameters(), old_weights))
    with torch.inference_mode():
        again = model.forward_packed(ids, cu, longest).float()
        assert model._graphs._graphed is not first and len(model._graphs._graphed.recordings) == 1
        assert (again - expected).norm() / expected.norm() < 2e-2
    with torch.enable_grad():  # gradients: the plain path
        assert model.forward_packed(ids, cu, longest).requires_grad
