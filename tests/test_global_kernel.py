"""The Triton global-attention forward kernel against the reference attention, and in the model.

It runs on a CUDA GPU, or on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_global_kernel.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from triton_kernels import DEVICE, ON_GPU, relative_error, skip_unless_kernels_run

from mbert_retrieval.modeling.attention import reference_attention

skip_unless_kernels_run("the global kernel")

from test_window_kernel import cu_of, packed_qkv, triton_and_reference_models  # noqa: E402

from mbert_retrieval.modeling import global_attention as kernels  # noqa: E402
from mbert_retrieval.modeling.window_attention import Tiles  # noqa: E402

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEADS, DIM = (12, 64) if ON_GPU else (2, 16)
TOLERANCE = 1e-2 if ON_GPU else 1e-5
LENGTHS = [300, 5, 129, 64, 200, 1, 130]


@pytest.mark.parametrize("blocks", [(64, 64), (16, 32), (32, 16), (128, 64)])
@pytest.mark.parametrize("lengths", [LENGTHS, [1], [7, 7, 7, 300, 1, 1, 40], [64, 128]])
def test_forward_matches_reference(monkeypatch, blocks, lengths):
    """Sequences shorter than a block, exactly a block, and with a partial last block of keys."""
    tiles = Tiles(block_m=blocks[0], block_n=blocks[1])
    monkeypatch.setattr(kernels, "tiles_for", lambda max_seqlen: tiles)
    generator = torch.Generator().manual_seed(sum(blocks) + len(lengths))
    cu = cu_of(lengths)
    q, k, v = packed_qkv(lengths, generator, layout="qkv")
    with torch.inference_mode():
        out = kernels.global_attention(q, k, v, cu, max(lengths))
    expected = reference_attention(q.float(), k.float(), v.float(), cu, None)
    assert torch.isfinite(out.float()).all()
    assert relative_error(out, expected) < TOLERANCE


def test_launch_shapes_follow_the_longest_sequence():
    assert kernels.tiles_for(512) == kernels.FORWARD_SHORT
    assert kernels.tiles_for(kernels.LONG_FROM + 1) == kernels.FORWARD_LONG


def test_a_one_token_sequence_gets_its_own_value():
    generator = torch.Generator().manual_seed(2)
    lengths = [33, 1, 70]
    q, k, v = packed_qkv(lengths, generator)
    out = kernels.global_attention(q, k, v, cu_of(lengths), 70)
    torch.testing.assert_close(out[33].float(), v[33].float(), rtol=1e-2, atol=1e-2)


def test_a_larger_max_seqlen_than_needed_changes_nothing():
    """Replayed CUDA graphs pass a max_seqlen rounded up: the extra blocks must write nothing."""
    generator = torch.Generator().manual_seed(3)
    cu = cu_of(LENGTHS)
    q, k, v = packed_qkv(LENGTHS, generator)
    exact = kernels.global_attention(q, k, v, cu, max(LENGTHS))
    rounded = kernels.global_attention(q, k, v, cu, 1024)
    torch.testing.assert_close(exact, rounded, rtol=0, atol=0)


def test_gradients_are_refused_with_a_clear_error():
    generator = torch.Generator().manual_seed(4)
    q, k, v = (t.requires_grad_() for t in packed_qkv([10], generator))
    with pytest.raises(RuntimeError, match="no backward"):
        kernels.global_attention(q, k, v, cu_of([10]), 10)


def test_bad_head_dim_is_a_clear_error():
    x = torch.randn(10, 2, 24, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        kernels.global_attention(x, x, x, cu_of([10]), 10)


@pytest.mark.skipif(not ON_GPU, reason="the triton backend's model runs on CUDA")
def test_model_with_the_global_kernel_matches_reference_eager_and_compiled(hf_encoder_dir, monkeypatch):
    """By default every global layer calls the kernel in inference (eagerly and compiled), and the
    outputs match the fp32 reference path as closely as the FlashAttention path does; training
    calls keep FlashAttention."""
    calls = []
    original = kernels.global_attention
    monkeypatch.setattr(kernels, "global_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    with_kernel, exact, ids, cu, max_len = triton_and_reference_models(hf_encoder_dir)
    flash = copy.deepcopy(with_kernel)
    for layer in flash.layers:
        layer.attn.global_kernel_in_inference = False
    with torch.inference_mode():
        expected = exact.forward_packed(ids, cu, max_len)
        assert calls == []
        flash_out = flash.forward_packed(ids, cu, max_len)
        assert calls == []
        eager = with_kernel.forward_packed(ids, cu, max_len)  # on by default
        assert len(calls) == sum(layer.is_global for layer in with_kernel.layers)
        compiled = copy.deepcopy(with_kernel).compile_forward().forward_packed(ids, cu, max_len)
    for got in (eager, compiled):
        assert relative_error(got, expected) < max(2e-2, 1.5 * relative_error(flash_out, expected))
    calls.clear()
    with_kernel.train().forward_packed(ids, cu, max_len).float().sum().backward()
    assert calls == []
