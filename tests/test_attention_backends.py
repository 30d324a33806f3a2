"""The fast attention paths against the per-sequence SDPA reference (CUDA only; skipped on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.attention import packed_attention, per_sequence_attention, reference_attention

LENGTHS = [300, 5, 129, 64, 200, 1, 130]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernels need a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("window_half", [None, 64])
def test_varlen_matches_reference(window_half):
    torch.manual_seed(0)
    cu = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32).cuda()
    q, k, v = (torch.randn(sum(LENGTHS), 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = packed_attention(q, k, v, cu, max(LENGTHS), window_half, "varlen")
    expected = reference_attention(q.float(), k.float(), v.float(), cu, window_half)
    assert ((out.float() - expected).norm() / expected.norm()) < 1e-2


@needs_cuda
def test_bf16_model_on_cuda_matches_fp32_reference(hf_encoder_dir):
    fast = ModernBert.from_pretrained(hf_encoder_dir, dtype=torch.bfloat16, device="cuda").compile_layers()
    exact = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", attn_backend="reference")
    ids = torch.randint(3, 1000, (3, 600), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0
    with torch.no_grad():
        out, ref = fast(ids, mask).float(), exact(ids, mask)
    assert ((out - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.parametrize("window_half", [None, 8])
def test_repadded_reference_equals_per_sequence_loop(window_half):
    torch.manual_seed(0)
    cu = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32)
    q, k, v = (torch.randn(sum(LENGTHS), 4, 16, requires_grad=True) for _ in range(3))
    batched = reference_attention(q, k, v, cu, window_half)
    looped = per_sequence_attention(q, k, v, cu, window_half)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(batched.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
