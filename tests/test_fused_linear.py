"""The fused inference projections (Wqkv + rotary, Wi + GeGLU) against cuBLAS / PyTorch and the
model's plain code. They run on a CUDA GPU, or on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_fused_linear.py
Without either (or without Triton) the tests are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from mbert_retrieval.modeling.encoder import Rotary, apply_rotary

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the fused kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from mbert_retrieval.modeling import fused_linear  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def rope_for(lengths: list[int], head_dim: int):
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    cos, sin = Rotary(head_dim, 10000.0, max(lengths)).to(DEVICE)(positions)
    return cos.reshape(len(positions), -1), sin.reshape(len(positions), -1)


def plain_rotary_projection(x, weight, cos, sin, heads):
    """The model's path in float32: the projection, then `apply_rotary` on q and k."""
    qkv = F.linear(x.float(), weight.float()).view(x.shape[0], 3, heads, -1)
    q, k = apply_rotary(qkv[:, :2], cos[:, None, None, :], sin[:, None, None, :]).unbind(dim=1)
    return torch.stack((q, k, qkv[:, 2]), dim=1).reshape(x.shape[0], -1)


def plain_geglu_projection(x, weight):
    inputs, gate = F.linear(x.float(), weight.float()).chunk(2, dim=-1)
    return F.gelu(inputs) * gate


# hidden 64 / 4 heads: even tiles; 40 / 5 heads of 8: q|k|v boundaries inside a tile; K = 40 and 72 are
# not multiples of the kernel's 64-wide K step (masked loads); 768 / 12 heads: the base model's shape.
SHAPES = [(64, 4), (40, 5), (72, 3)] + ([(768, 12)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, heads", SHAPES)
@pytest.mark.parametrize("lengths", [[1], [17, 1, 40], [130, 3]])
def test_rotary_projection_matches_projection_then_rotary(dtype, hidden, heads, lengths):
    generator = torch.Generator().manual_seed(hidden + len(lengths))
    tokens = sum(lengths)
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(3 * hidden, hidden, generator=generator) / hidden**0.5).to(DEVICE, dtype)
    cos, sin = rope_for(lengths, hidden // heads)
    got = fused_linear.rotary_projection(x, weight, cos, sin)
    expected = plain_rotary_projection(x, weight, cos, sin, heads)
    assert got.dtype == dtype and got.shape == (tokens, 3 * hidden)
    assert relative_error(got, expected) < tolerance(dtype)
    for part in range(3):  # q, k and v each right, not only their sum
        columns = slice(part * hidden, (part + 1) * hidden)
        assert relative_error(got[:, columns], expected[:, columns]) < tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hidden, width", [(1, 64, 32), (37, 40, 48), (130, 72, 100)])
def test_geglu_projection_matches_projection_then_geglu(dtype, tokens, hidden, width):
    generator = torch.Generator().manual_seed(tokens + width)
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE, dtype)
    weight = (2 * torch.randn(2 * width, hidden, generator=generator) / hidden**0.5).to(DEVICE, dtype)
    got = fused_linear.geglu_projection(x, weight)
    assert got.dtype == dtype and got.shape == (tokens, width)
    assert relative_error(got, plain_geglu_projection(x, weight)) < tolerance(dtype)


def test_projections_read_a_strided_input():
    """x as a view with a wider row stride (a slice of a larger buffer)."""
    wide = torch.randn(21, 80, device=DEVICE, dtype=DTYPES[0])
    x = wide[:, 16:]
    weight = torch.randn(3 * 64, 64, device=DEVICE, dtype=DTYPES[0]) / 8
    cos, sin = rope_for([21], 16)
    expected = plain_rotary_projection(x, weight, cos, sin, heads=4)
    assert relative_error(fused_linear.rotary_projection(x, weight, cos, sin), expected) < tolerance(x.dtype)
    gate_weight = torch.randn(96, 64, device=DEVICE, dtype=DTYPES[0]) / 8
    got = fused_linear.geglu_projection(x, gate_weight)
    assert relative_error(got, plain_geglu_projection(x, gate_weight)) < tolerance(x.dtype)


def test_projections_reject_bad_shapes():
    x = torch.zeros(4, 64, device=DEVICE, dtype=DTYPES[0])
    cos, sin = rope_for([4], 16)
    with pytest.raises(ValueError, match="must agree"):
        fused_linear.rotary_projection(x, torch.zeros(192, 32, device=DEVICE, dtype=x.dtype), cos, sin)
    with pytest.raises(ValueError, match="do not fit"):
        fused_linear.rotary_projection(x, torch.zeros(190, 64, device=DEVICE, dtype=x.dtype), cos, sin)
    with pytest.raises(ValueError, match="even number of rows"):
        fused_linear.geglu_projection(x, torch.zeros(95, 64, device=DEVICE, dtype=x.dtype))


def test_can_fuse_only_without_gradients_bias_or_autocast():
    linear = torch.nn.Linear(64, 192, bias=False).to(DEVICE, torch.bfloat16)
    x = torch.zeros(3, 64, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        assert fused_linear.can_fuse(x, linear)
    assert not fused_linear.can_fuse(x, linear)  # the weight needs a gradient
    with torch.no_grad():
        assert not fused_linear.can_fuse(x.float(), linear.float())
        assert not fused_linear.can_fuse(x, torch.nn.Linear(64, 192).to(DEVICE, torch.bfloat16))


def packed_batch(lengths: list[int]):
    ids = torch.randint(3, 1000, (sum(lengths),), device=DEVICE)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    return ids, cu, max(lengths)


@pytest.mark.skipif(not ON_GPU, reason="the triton backend's global layers run varlen_attn (CUDA)")
@pytest.mark.parametrize("compiled", [False, True])
def test_model_inference_runs_the_fused_projections_and_matches_the_plain_path(
    hf_encoder_dir, monkeypatch, compiled
):
    """bf16 inference on the triton backend: with the fused projections (each layer calls both) the
    hidden states equal those of the same model running GEMM and rotary / GeGLU apart, eager or
    compiled, and those of the fp32 reference backend within bf16 rounding."""
    from mbert_retrieval import ModernBert

    calls = {"rotary_projection": 0, "geglu_projection": 0}
    for name in calls:
        original = getattr(fused_linear, name)

        def counted(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(fused_linear, name, counted)
    model = ModernBert.from_pretrained(
        hf_encoder_dir, dtype=torch.bfloat16, device="cuda", attn_backend="triton"
    )
    reference = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", attn_backend="reference")
    if compiled:
        model.compile_layers()
    ids, cu, longest = packed_batch([300, 5, 40, 129, 1])
    with torch.inference_mode():
        fused_out = model.forward_packed(ids, cu, longest)
        model.use_fused_projections(False)
        plain_out = model.forward_packed(ids, cu, longest)
        expected = reference.forward_packed(ids, cu, longest)
    if not compiled:  # a compiled graph runs the operator without going through the module attribute
        assert calls == {name: model.config.num_hidden_layers for name in calls}
    assert relative_error(fused_out, plain_out) < 1e-2
    assert relative_error(fused_out, expected) < 2e-2


@pytest.mark.skipif(not ON_GPU, reason="the triton backend needs CUDA")
def test_training_keeps_the_plain_projections(hf_encoder_dir, monkeypatch):
    """With gradients on, the model must not call the forward-only kernels."""
    from mbert_retrieval import ModernBert

    def refuse(*args):
        raise AssertionError("a forward-only projection ran while training")

    monkeypatch.setattr(fused_linear, "rotary_projection", refuse)
    monkeypatch.setattr(fused_linear, "geglu_projection", refuse)
    model = ModernBert.from_pretrained(
        hf_encoder_dir, dtype=torch.bfloat16, device="cuda", attn_backend="triton"
    )
    ids, cu, longest = packed_batch([70, 9])
    model.train().forward_packed(ids, cu, longest).float().square().mean().backward()
    assert model.layers[0].attn.Wqkv.weight.grad is not None
