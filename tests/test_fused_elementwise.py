"""The fused rotary and GeGLU kernels against the model's plain PyTorch code, forward and backward.

They run on a CUDA GPU, or on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_fused_elementwise.py
Without either (or without Triton) the tests are skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_kernels import (
    DEVICE,
    ON_GPU,
    assert_autocast_training_matches_the_plain_path,
    needs_gpu_compile,
    relative_error,
    skip_unless_kernels_run,
)

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.encoder import Rotary, apply_rotary

skip_unless_kernels_run("the fused kernels")

from mbert_retrieval.modeling import fused_elementwise as fused  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def rope_for(lengths: list[int], head_dim: int, theta: float = 10000.0):
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    return Rotary(head_dim, theta, max(lengths)).to(DEVICE)(positions)


def plain_rotary(qkv, cos, sin):
    q, k = apply_rotary(qkv[:, :2], cos, sin).unbind(dim=1)
    return q, k, qkv[:, 2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, head_dim", [(2, 16), (3, 8), (12, 64)])
@pytest.mark.parametrize("lengths", [[5], [17, 1, 40], [300, 3]])
def test_rotary_matches_plain_code_with_gradients(dtype, heads, head_dim, lengths):
    generator = torch.Generator().manual_seed(len(lengths) * 100 + heads * 10 + head_dim)
    tokens = sum(lengths)
    base = torch.randn(tokens, 3, heads, head_dim, generator=generator).to(DEVICE, dtype)
    upstream = [torch.randn(tokens, heads, head_dim, generator=generator).to(DEVICE, dtype) for _ in range(3)]
    cos, sin = rope_for(lengths, head_dim)

    results = []
    for rotate in (fused.rotary_qkv, plain_rotary):
        qkv = base.clone().requires_grad_()
        outputs = rotate(qkv, cos, sin)
        sum((out.float() * grad.float()).sum() for out, grad in zip(outputs, upstream)).backward()
        results.append((outputs, qkv.grad))
    (got, got_grad), (expected, expected_grad) = results
    for got_part, expected_part in zip(got, expected):
        assert got_part.dtype == dtype and got_part.shape == expected_part.shape
        assert relative_error(got_part, expected_part) < tolerance(dtype)
    assert relative_error(got_grad, expected_grad) < tolerance(dtype)


@needs_gpu_compile
@pytest.mark.parametrize("used", [3, 1])
def test_rotary_operator_under_torch_compile_matches_plain_code_with_gradients(used):
    """What a compiled training step runs: the kernels as operators with their own backward (with all
    three outputs used, and with only q, so k's and v's gradients are missing)."""
    generator = torch.Generator().manual_seed(used)
    base = torch.randn(40, 3, 2, 16, generator=generator).to(DEVICE)
    upstream = [torch.randn(40, 2, 16, generator=generator).to(DEVICE) for _ in range(used)]
    cos, sin = rope_for([30, 10], 16)
    results = []
    for rotate in (torch.compile(fused.rotary_qkv, dynamic=True), plain_rotary):
        qkv = base.clone().requires_grad_()
        outputs = rotate(qkv, cos, sin)
        sum((out * grad).sum() for out, grad in zip(outputs, upstream)).backward()
        results.append((outputs, qkv.grad))
    (got, got_grad), (expected, expected_grad) = results
    for got_part, expected_part in zip(got, expected):
        assert relative_error(got_part, expected_part) < 1e-5
    assert relative_error(got_grad, expected_grad) < 1e-5


def test_rotary_backward_with_an_unused_output():
    """Attention that never reads v (or k) leaves its gradient None: it counts as zeros."""
    qkv = torch.randn(9, 3, 2, 16, device=DEVICE).requires_grad_()
    cos, sin = rope_for([9], 16)
    q, _, _ = fused.rotary_qkv(qkv, cos, sin)
    q.sum().backward()
    reference = qkv.detach().clone().requires_grad_()
    plain_rotary(reference, cos, sin)[0].sum().backward()
    assert relative_error(qkv.grad, reference.grad) < 1e-5
    assert qkv.grad[:, 1:].abs().max() == 0


def test_rotary_reads_a_strided_projection():
    """qkv as a view with a wider token stride (e.g. a slice of a larger buffer)."""
    wide = torch.randn(11, 4, 2, 16, device=DEVICE)
    qkv = wide[:, 1:]
    cos, sin = rope_for([11], 16)
    for got, expected in zip(fused.rotary_qkv(qkv, cos, sin), plain_rotary(qkv, cos, sin)):
        assert relative_error(got, expected) < 1e-5


@needs_gpu_compile
def test_compiled_rotary_backward_writes_the_gradient_without_copies():
    """In a compiled graph the backward kernel writes qkv's gradient as one tensor. A kernel that
    writes three views of one tensor makes inductor scatter each view back into it: three copies of
    the gradient per layer (run 24's profile: 35 us each at 16k tokens on an H200)."""
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor.decomposition import select_decomp_table

    graphs = []

    def keep(graph_module, _inputs):
        graphs.append(graph_module)
        return graph_module

    grads = [torch.randn(40, 2, 16, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    cos, sin = rope_for([40], 16)
    traced = aot_function(fused.rotary_backward_op, fw_compiler=keep, decompositions=select_decomp_table())
    got = traced(*grads, cos.reshape(40, 8), sin.reshape(40, 8))
    operators = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert any("triton_kernel_wrapper" in name for name in operators)
    assert not [name for name in operators if "scatter" in name or "copy" in name]
    expected = fused.rotary_backward_op(*grads, cos.reshape(40, 8), sin.reshape(40, 8))
    assert relative_error(got, expected) == 0


def refuse(*args, **kwargs):
    raise AssertionError("an autograd Function was called without gradients to record")


def test_calls_without_gradients_launch_the_kernels_directly(monkeypatch):
    """Inference, or inputs that need no gradient: the same outputs as through the autograd
    Functions, which are not called."""
    lengths, heads, head_dim, width = [17, 1, 40], 3, 16, 48
    generator = torch.Generator().manual_seed(11)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=generator).to(DEVICE)
    hidden = torch.randn(sum(lengths), 2 * width, generator=generator).to(DEVICE)
    cos, sin = rope_for(lengths, head_dim)
    expected_rotary = [t.detach() for t in fused.rotary_qkv(qkv.clone().requires_grad_(), cos, sin)]
    expected_geglu = fused.geglu(hidden.clone().requires_grad_()).detach()
    monkeypatch.setattr(fused._RotaryQKV, "apply", refuse)
    monkeypatch.setattr(fused._GeGLU, "apply", refuse)
    with torch.inference_mode():
        inference = (fused.rotary_qkv(qkv, cos, sin), fused.geglu(hidden))
    frozen = (fused.rotary_qkv(qkv, cos, sin), fused.geglu(hidden))  # gradients on, none needed
    for rotary, geglu in (inference, frozen):
        assert rotary[2].data_ptr() == qkv[:, 2].data_ptr()  # v is not copied without gradients
        for got, expected in zip(rotary, expected_rotary, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(geglu, expected_geglu, rtol=0, atol=0)


def test_rotary_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="qkv must be"):
        fused.rotary_qkv(torch.zeros(4, 2, 2, 16, device=DEVICE), *rope_for([4], 16))


def plain_geglu(hidden):
    inputs, gate = hidden.chunk(2, dim=-1)
    return F.gelu(inputs) * gate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, width", [(1, 3), (37, 96), (130, 1152), (5, 2500)])
def test_geglu_matches_plain_code_with_gradients(dtype, tokens, width):
    generator = torch.Generator().manual_seed(tokens + width)
    base = (3 * torch.randn(tokens, 2 * width, generator=generator)).to(DEVICE, dtype)
    upstream = torch.randn(tokens, width, generator=generator).to(DEVICE, dtype)
    results = []
    for run in (fused.geglu, plain_geglu):
        hidden = base.clone().requires_grad_()
        out = run(hidden)
        out.backward(upstream)
        results.append((out, hidden.grad))
    (got, got_grad), (expected, expected_grad) = results
    assert got.dtype == dtype and got.shape == (tokens, width)
    assert relative_error(got, expected) < tolerance(dtype)
    assert relative_error(got_grad, expected_grad) < tolerance(dtype)


@needs_gpu_compile
@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_operator_under_torch_compile_matches_plain_code_with_gradients(dtype):
    """What a compiled training step runs: the kernels as operators with their own backward."""
    generator = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(70, 2 * 96, generator=generator)).to(DEVICE, dtype)
    upstream = torch.randn(70, 96, generator=generator).to(DEVICE, dtype)
    results = []
    for run in (torch.compile(fused.geglu, dynamic=True), plain_geglu):
        hidden = base.clone().requires_grad_()
        out = run(hidden)
        out.backward(upstream)
        results.append((out, hidden.grad))
    (got, got_grad), (expected, expected_grad) = results
    assert relative_error(got, expected) < tolerance(dtype)
    assert relative_error(got_grad, expected_grad) < tolerance(dtype)


def test_geglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match="geglu needs"):
        fused.geglu(torch.zeros(3, 5, device=DEVICE))


@pytest.mark.skipif(not ON_GPU, reason="the triton backend's global layers run varlen_attn (CUDA)")
def test_model_uses_the_fused_kernels_eagerly_and_matches_the_plain_path(hf_encoder_dir, monkeypatch):
    """Training setup (float32 weights under bf16 autocast): the triton backend's fused path against
    the varlen backend, which runs the plain code; both take the same attention kernels' numerics
    within bf16 rounding."""
    calls = {"rotary": 0, "geglu": 0}
    for name in calls:
        original = getattr(fused, {"rotary": "rotary_qkv", "geglu": "geglu"}[name])

        def counted(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(fused, {"rotary": "rotary_qkv", "geglu": "geglu"}[name], counted)
    models = {
        backend: ModernBert.from_pretrained(hf_encoder_dir, device="cuda", attn_backend=backend).train()
        for backend in ("triton", "varlen")
    }
    assert_autocast_training_matches_the_plain_path(models, lengths=[300, 5, 40, 129])
    layers = models["triton"].layers
    global_layers = sum(layer.is_global for layer in layers)  # local ones rotate inside the window kernel
    assert calls == {"rotary": global_layers, "geglu": len(layers)}
