"""The Triton sliding-window kernels against the reference attention, forward and backward.

They run on a CUDA GPU, or on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_window_kernel.py
Without either (or without Triton) the tests are skipped.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.attention import reference_attention

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the window kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from mbert_retrieval.modeling import window_attention as kernels  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEADS, DIM = (12, 64) if ON_GPU else (2, 16)
LENGTHS = [300, 5, 129, 64, 200, 1, 130]


def packed_qkv(lengths, generator, layout="separate"):
    """q, k, v [N, heads, dim]; `qkv` layout: views into one [N, 3, heads, dim] buffer like the model's."""
    tokens = sum(lengths)
    if layout == "qkv":
        buffer = torch.randn(tokens, 3, HEADS, DIM, generator=generator).to(DEVICE, DTYPE)
        return buffer.unbind(1)
    return [torch.randn(tokens, HEADS, DIM, generator=generator).to(DEVICE, DTYPE) for _ in range(3)]


def cu_of(lengths):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)


def relative_error(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


TOLERANCE = 1e-2 if ON_GPU else 1e-5  # bf16 operands on the GPU; float32 in the interpreter


@pytest.mark.parametrize("window", [0, 3, 16, 64])
@pytest.mark.parametrize("blocks", [(64, 64), (16, 32), (32, 16)])
@pytest.mark.parametrize("lengths", [LENGTHS, [1], [7, 7, 7, 300, 1, 1, 40]])
def test_forward_and_backward_match_reference(monkeypatch, window, blocks, lengths):
    tiles = kernels.Tiles(block_m=blocks[0], block_n=blocks[1])
    for name in ("FORWARD", "BACKWARD_DKDV", "BACKWARD_DQ"):
        monkeypatch.setattr(kernels, name, tiles)
    generator = torch.Generator().manual_seed(window * 7 + sum(blocks) + len(lengths))
    cu = cu_of(lengths)
    q, k, v = (t.requires_grad_() for t in packed_qkv(lengths, generator))
    out = kernels.window_attention(q, k, v, cu, window)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = reference_attention(q32, k32, v32, cu, window)
    assert relative_error(out, expected) < TOLERANCE

    weights = torch.randn(out.shape, generator=generator).to(DEVICE, DTYPE)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights.float()).sum(), (q32, k32, v32))
    # with window 0 a query sees itself alone and dq, dk are exactly zero: measure against dv's size
    scale = expected_grads[2].norm()
    for name, got, want in zip("qkv", grads, expected_grads):
        assert torch.isfinite(got).all(), name
        error = (got.float() - want).norm() / max(want.norm(), 0.1 * scale)
        assert error < 2 * TOLERANCE, name


@pytest.mark.parametrize("window", [0, 16, 64])
@pytest.mark.parametrize("lengths", [LENGTHS, [1], [7, 7, 7, 300, 1, 1, 40]])
def test_rotation_inside_the_kernels_matches_rotating_first(window, lengths):
    """q and k rotated as the kernels load them from qkv (dq and dk rotated back into qkv's gradient),
    against `apply_rotary` and then the reference attention, with gradients."""
    from mbert_retrieval.modeling.encoder import Rotary, apply_rotary

    generator = torch.Generator().manual_seed(window + len(lengths))
    cu = cu_of(lengths)
    qkv = torch.randn(sum(lengths), 3, HEADS, DIM, generator=generator).to(DEVICE, DTYPE).requires_grad_()
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    cos, sin = Rotary(DIM, 10000.0, max(lengths)).to(DEVICE)(positions)
    out = kernels.window_attention_rotary(qkv, cos, sin, cu, window)

    qkv32 = qkv.detach().float().requires_grad_()
    q, k = apply_rotary(qkv32[:, :2], cos, sin).unbind(1)
    expected = reference_attention(q, k, qkv32[:, 2], cu, window)
    assert relative_error(out, expected) < TOLERANCE

    weights = torch.randn(out.shape, generator=generator).to(DEVICE, DTYPE)
    (grad,) = torch.autograd.grad((out * weights).sum(), qkv)
    (expected_grad,) = torch.autograd.grad((expected * weights.float()).sum(), qkv32)
    scale = expected_grad[:, 2].norm()  # window 0: dq and dk are exactly zero, as in the test above
    for part, name in enumerate("qkv"):
        error = (grad[:, part].float() - expected_grad[:, part]).norm() / max(
            expected_grad[:, part].norm(), 0.1 * scale
        )
        assert error < 2 * TOLERANCE, name


def test_views_of_one_qkv_buffer_match_contiguous_copies():
    generator = torch.Generator().manual_seed(3)
    cu = cu_of(LENGTHS)
    q, k, v = packed_qkv(LENGTHS, generator, layout="qkv")
    strided = kernels.window_attention(q, k, v, cu, 16)
    copied = kernels.window_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, 16)
    torch.testing.assert_close(strided, copied, rtol=0, atol=0)


def test_operator_and_eager_path_agree_with_gradients():
    """torch.compile sees the custom operator, eager runs call the kernels directly: same numbers."""
    generator = torch.Generator().manual_seed(5)
    lengths = [40, 3, 150]
    cu = cu_of(lengths)
    seq_ids = kernels.sequence_ids(cu, sum(lengths))
    base = packed_qkv(lengths, generator)
    upstream = torch.randn(sum(lengths), HEADS, DIM, generator=generator).to(DEVICE, DTYPE)
    results = []
    for run in (
        lambda q, k, v: kernels.window_attention(q, k, v, cu, 16, seq_ids),
        lambda q, k, v: kernels.window_attention_fwd(q, k, v, cu, seq_ids, 16)[0],
    ):
        inputs = [t.clone().requires_grad_() for t in base]
        out = run(*inputs)
        out.backward(upstream)
        results.append([out, *(t.grad for t in inputs)])
    for eager, operator in zip(*results):
        torch.testing.assert_close(eager, operator, rtol=0, atol=0)


def test_calls_without_gradients_launch_the_kernels_directly(monkeypatch):
    """Inference, or inputs that need no gradient: the same outputs as through the autograd
    Functions, which are not called; with and without the rotation inside the kernels."""
    from mbert_retrieval.modeling.encoder import Rotary

    generator = torch.Generator().manual_seed(6)
    lengths = [40, 3, 150]
    cu = cu_of(lengths)
    qkv = torch.randn(sum(lengths), 3, HEADS, DIM, generator=generator).to(DEVICE, DTYPE)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    cos, sin = Rotary(DIM, 10000.0, max(lengths)).to(DEVICE)(positions)

    def both(tensor):
        return (
            kernels.window_attention(*tensor.unbind(1), cu, 16),
            kernels.window_attention_rotary(tensor, cos, sin, cu, 16),
        )

    expected = [out.detach() for out in both(qkv.clone().requires_grad_())]

    def refuse(*args, **kwargs):
        raise AssertionError("an autograd Function was called without gradients to record")

    monkeypatch.setattr(kernels._EagerWindowAttention, "apply", refuse)
    monkeypatch.setattr(kernels._EagerRotaryWindowAttention, "apply", refuse)
    with torch.inference_mode():
        inference = both(qkv)
    frozen = both(qkv)  # gradients on, none needed
    for got in (*inference, *frozen):
        assert not got.requires_grad
    for outputs in (inference, frozen):
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_every_output_row_is_written():
    generator = torch.Generator().manual_seed(4)
    lengths = [33, 1, 70]
    cu = cu_of(lengths)
    q, k, v = packed_qkv(lengths, generator)
    out, lse = kernels.window_attention_fwd(q, k, v, cu, kernels.sequence_ids(cu, sum(lengths)), 8)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    # a one-token sequence attends only to itself: its output is its own value
    torch.testing.assert_close(out[33].float(), v[33].float(), rtol=1e-2, atol=1e-2)


def test_sequence_ids():
    cu = cu_of([3, 1, 2])
    assert kernels.sequence_ids(cu, 6).tolist() == [0, 0, 0, 1, 2, 2]


def triton_and_reference_models(hf_encoder_dir):
    """The encoder on the triton backend (bf16) and on the reference path (fp32), and a packed batch."""
    fast = ModernBert.from_pretrained(
        hf_encoder_dir, dtype=torch.bfloat16, device="cuda", attn_backend="triton"
    )
    exact = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", attn_backend="reference")
    lengths = [300, 5, 40, 129]
    ids = torch.randint(3, 1000, (sum(lengths),), device="cuda")
    return fast, exact, ids, cu_of(lengths), max(lengths)


@pytest.mark.skipif(not ON_GPU, reason="the triton backend's global layers run varlen_attn (CUDA)")
def test_triton_backend_model_gradients_match_reference_model(hf_encoder_dir):
    """The whole encoder (local layers on the window kernels, rotating q and k inside them) against
    the fp32 reference path."""
    fast, exact, ids, cu, max_len = triton_and_reference_models(hf_encoder_dir)
    got = fast.train().forward_packed(ids, cu, max_len)
    expected = exact.train().forward_packed(ids, cu, max_len)
    assert relative_error(got, expected) < 2e-2
    got.float().square().mean().backward()
    expected.square().mean().backward()
    for name, param in exact.named_parameters():
        fast_grad = dict(fast.named_parameters())[name].grad
        assert relative_error(fast_grad, param.grad) < 5e-2, name


@pytest.mark.skipif(not ON_GPU, reason="the triton backend's global layers run varlen_attn (CUDA)")
def test_triton_backend_inference_rotates_inside_the_window_kernel(hf_encoder_dir, monkeypatch):
    """Inference: eagerly the local layers take qkv whole (rotation inside the kernel), compiled they
    run a rotary pass first unless told otherwise; each output as the fp32 reference path's."""
    calls = []
    original = kernels.window_attention_rotary
    monkeypatch.setattr(
        kernels, "window_attention_rotary", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    fast, exact, ids, cu, max_len = triton_and_reference_models(hf_encoder_dir)
    inside = copy.deepcopy(fast)
    for layer in inside.layers:
        layer.attn.rotation_in_window_kernel = True
    with torch.inference_mode():
        expected = exact.forward_packed(ids, cu, max_len)
        eager = fast.forward_packed(ids, cu, max_len)
        local_layers = sum(not layer.is_global for layer in fast.layers)
        assert len(calls) == local_layers
        compiled = fast.compile_forward().forward_packed(ids, cu, max_len)
        compiled_inside = inside.compile_forward().forward_packed(ids, cu, max_len)
    for got in (eager, compiled, compiled_inside):
        assert relative_error(got, expected) < 2e-2


def test_bad_head_dim_is_a_clear_error():
    x = torch.randn(10, 2, 24, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        kernels.window_attention(x, x, x, cu_of([10]), 4)
