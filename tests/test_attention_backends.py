"""The fast attention paths against the per-sequence SDPA reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.attention import (
    FLEX_BLOCK,
    packed_attention,
    packed_block_mask,
    reference_attention,
    window_mask,
)

LENGTHS = [300, 5, 129, 64, 200, 1, 130]


def cu_seqlens_of(lengths):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def token_mask(lengths, window_half):
    """The dense [N, N] rule: same sequence, and within the window on local layers."""
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        block = (
            torch.ones(n, n, dtype=torch.bool) if window_half is None else window_mask(n, window_half, "cpu")
        )
        mask[start : start + n, start : start + n] = block
        start += n
    return mask


@pytest.mark.parametrize("window_half", [None, 8, 64])
def test_block_mask_covers_every_attended_pair(window_half):
    total = sum(LENGTHS)
    block_mask = packed_block_mask(cu_seqlens_of(LENGTHS), total, window_half)
    needed = token_mask(LENGTHS, window_half)
    n_blocks = -(-total // FLEX_BLOCK)
    padded = F.pad(needed, (0, n_blocks * FLEX_BLOCK - total, 0, n_blocks * FLEX_BLOCK - total))
    needed_blocks = padded.view(n_blocks, FLEX_BLOCK, n_blocks, FLEX_BLOCK).any(dim=3).any(dim=1)
    listed = block_mask.to_dense()[0, 0].bool()
    assert torch.all(listed[needed_blocks]), "a block with attended pairs is missing from the block mask"
    if window_half is not None:  # local layers must skip most blocks of a long packed batch
        assert listed.sum() < listed.numel()


@pytest.mark.parametrize("window_half", [None, 8])
def test_flex_matches_reference(window_half):
    torch.manual_seed(0)
    cu = cu_seqlens_of(LENGTHS)
    q, k, v = (torch.randn(sum(LENGTHS), 4, 16) for _ in range(3))
    block_mask = packed_block_mask(cu, sum(LENGTHS), window_half)
    out = packed_attention(q, k, v, cu, max(LENGTHS), window_half, "flex", block_mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, cu, window_half), rtol=1e-5, atol=1e-5)


def test_model_with_flex_backend_matches_reference(hf_encoder_dir):
    reference = ModernBert.from_pretrained(hf_encoder_dir, attn_backend="reference")
    flex = ModernBert.from_pretrained(hf_encoder_dir, attn_backend="flex")
    ids = torch.randint(3, 1000, (3, 150))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.no_grad():
        torch.testing.assert_close(flex(ids, mask), reference(ids, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen and flex kernels need a CUDA GPU")
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_cuda_backends_match_reference(backend):
    torch.manual_seed(0)
    cu = cu_seqlens_of(LENGTHS).cuda()
    q, k, v = (torch.randn(sum(LENGTHS), 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for window_half in (None, 64):
        block_mask = packed_block_mask(cu, sum(LENGTHS), window_half) if backend == "flex" else None
        out = packed_attention(q, k, v, cu, max(LENGTHS), window_half, backend, block_mask)
        expected = reference_attention(q.float(), k.float(), v.float(), cu, window_half)
        assert ((out.float() - expected).norm() / expected.norm()) < 1e-2
