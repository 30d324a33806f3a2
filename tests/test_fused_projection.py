"""The fused projections (GEMM + GeGLU, GEMM + rotary) against the model's plain code.

They run on a Hopper GPU, or on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_fused_projection.py
Without either (or without Triton) the tests are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.config import ModernBertConfig
from mbert_retrieval.modeling.encoder import Attention, GeGLU, Rotary, apply_rotary

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the fused projections need a Hopper GPU or TRITON_INTERPRET=1", allow_module_level=True)

import triton.language as tl  # noqa: E402

from mbert_retrieval.modeling import fused_projection as fp  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter runs float32 exactly
TOLERANCE = 1e-2 if ON_GPU else 1e-5


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def config(hidden: int = 128, heads: int = 2, intermediate: int = 96) -> ModernBertConfig:
    return ModernBertConfig(
        hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
        num_hidden_layers=2, local_attention=16,
    )  # fmt: skip


def rope_for(lengths: list[int], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    return Rotary(head_dim, 10000.0, max(lengths)).to(DEVICE)(positions)


@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_plain_tiles_equal_a_matmul(tokens):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=generator).to(DEVICE, DTYPE)
    weight = torch.randn(192, 64, generator=generator).to(DEVICE, DTYPE) / 8
    out = fp.launch(x, weight, x.new_empty(tokens, 192))
    assert relative_error(out, x.float() @ weight.float().T) < TOLERANCE


@pytest.mark.parametrize("tokens", [1, 37, 300])
@pytest.mark.parametrize("gelu_erf", [0, 1])
def test_geglu_projection_equals_gemm_then_gelu_times_gate(tokens, gelu_erf):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=generator).to(DEVICE, DTYPE)
    weight = torch.randn(2 * 96, 64, generator=generator).to(DEVICE, DTYPE) / 4
    inputs, gate = (x.float() @ weight.float().T).chunk(2, dim=-1)
    out = fp.launch(x, weight, x.new_empty(tokens, 96), fp.GEGLU, gelu_erf=gelu_erf)
    assert relative_error(out, F.gelu(inputs) * gate) < TOLERANCE


@triton.jit
def erf_kernel(X, OUT, n, BLOCK: tl.constexpr):
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + at, fp._erf(tl.load(X + at, mask=at < n)), mask=at < n)


def test_erf_of_the_epilogue_is_within_bfloat16_rounding():
    x = torch.linspace(-6, 6, 20001, device=DEVICE)
    out = torch.empty_like(x)
    erf_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), 1024)
    assert (out.double() - torch.erf(x.double())).abs().max().item() < 1e-6


@pytest.mark.parametrize("lengths", [[5], [17, 1, 40], [130, 3]])
def test_rotary_projection_is_the_rotation_in_interleaved_order(lengths):
    heads, head_dim, tokens = 4, 32, sum(lengths)
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=generator).to(DEVICE, DTYPE)
    weight = torch.randn(3 * heads * head_dim, 64, generator=generator).to(DEVICE, DTYPE) / 8
    cos, sin = rope_for(lengths, head_dim)
    out = fp.rotary_projection(x, weight, cos.reshape(tokens, -1), sin.reshape(tokens, -1))

    qkv = (x.float() @ weight.float().T).view(tokens, 3, heads, head_dim)
    q, k = apply_rotary(qkv[:, :2], cos, sin).unbind(dim=1)
    width = heads * head_dim
    expected_q, expected_k = (fp.interleave_rotary_columns(t.reshape(tokens, -1), head_dim) for t in (q, k))
    assert relative_error(out[:, :width], expected_q) < TOLERANCE
    assert relative_error(out[:, width : 2 * width], expected_k) < TOLERANCE
    assert relative_error(out[:, 2 * width :], qkv[:, 2].reshape(tokens, -1)) < TOLERANCE
    # What attention sees: q . k per head, unchanged by the interleaving.
    got_q, got_k = (out[:, i * width : (i + 1) * width].float().view(tokens, heads, -1) for i in (0, 1))
    scores = torch.einsum("mhd,nhd->hmn", got_q, got_k)
    assert relative_error(scores, torch.einsum("mhd,nhd->hmn", q, k)) < TOLERANCE


@pytest.mark.parametrize("is_global", [True, False])
def test_attention_layer_with_the_fused_projection_equals_the_plain_one(is_global):
    cfg = config()
    torch.manual_seed(0)
    attention = Attention(cfg, layer=0 if is_global else 1).to(DEVICE, DTYPE)
    lengths = [40, 7, 90]
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    x = torch.randn(sum(lengths), cfg.hidden_size, device=DEVICE, dtype=DTYPE)
    rope = rope_for(lengths, cfg.head_dim)
    backend = "triton" if ON_GPU else "packed_sdpa"
    sequence_ids = None
    if ON_GPU:
        from mbert_retrieval.modeling.packing import sequence_ids as make_sequence_ids

        sequence_ids = make_sequence_ids(cu_seqlens, x.shape[0])
    with torch.no_grad():
        outputs = [
            attention(x, rope, cu_seqlens, max(lengths), backend, None, sequence_ids, fuse)
            for fuse in (True, False)
        ]
    assert relative_error(*outputs) < TOLERANCE


def test_geglu_layer_with_the_fused_projection_equals_the_plain_one():
    cfg = config()
    torch.manual_seed(0)
    mlp = GeGLU(cfg).to(DEVICE, DTYPE)
    x = torch.randn(77, cfg.hidden_size, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        assert relative_error(mlp(x, fuse_projection=True), mlp(x)) < TOLERANCE


def test_operators_compile():
    """Inside a torch.compile'd graph (their fake implementations give the shapes)."""
    tokens, heads, head_dim = 50, 2, 64
    x = torch.randn(tokens, 128, device=DEVICE, dtype=DTYPE)
    wqkv = torch.randn(3 * heads * head_dim, 128, device=DEVICE, dtype=DTYPE) / 8
    wi = torch.randn(2 * 96, 128, device=DEVICE, dtype=DTYPE) / 8
    cos, sin = (t.reshape(tokens, -1) for t in rope_for([tokens], head_dim))

    def both(x, wqkv, wi, cos, sin):
        return fp.rotary_projection(x, wqkv, cos, sin).sum() + fp.geglu_projection(x, wi).sum()

    expected = both(x, wqkv, wi, cos, sin)
    got = torch.compile(both, dynamic=True)(x, wqkv, wi, cos, sin)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.skipif(not ON_GPU, reason="the model takes the fused path on a Hopper GPU only")
def test_model_inference_with_fused_projections_equals_without(hf_encoder_dir):
    lengths = [300, 5, 40, 129, 1, 257]
    ids = torch.randint(3, 1000, (sum(lengths),), device="cuda")
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).cuda()
    outputs = []
    for fuse in (True, False):
        model = ModernBert.from_pretrained(hf_encoder_dir, dtype=torch.bfloat16, device="cuda").eval()
        model.fuse_projections = fuse
        assert model._can_fuse_projections() is False  # gradients are on here
        with torch.inference_mode():
            assert model._can_fuse_projections() is fuse
            eager = model.forward_packed(ids, cu, max(lengths))
            compiled = model.compile_forward().forward_packed(ids, cu, max(lengths))
        assert relative_error(compiled, eager) < 1e-2
        outputs.append(eager)
    assert relative_error(*outputs) < 1e-2


def test_not_fused_for_training_on_a_cpu_or_with_biases(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir)
    with torch.no_grad():
        assert not model._can_fuse_projections()  # a CPU: no TMA
    model.config.mlp_bias = True
    with torch.no_grad():
        assert not model._can_fuse_projections()
