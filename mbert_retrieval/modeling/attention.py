"""Attention over packed sequences: q, k, v are [total_tokens, heads, head_dim] plus `cu_seqlens`.

Backends:
- "varlen": `torch.nn.attention.varlen.varlen_attn` (FlashAttention inside PyTorch, CUDA, fp16/bf16);
- "flash_attn": `flash_attn.flash_attn_varlen_func` from the flash-attn package;
- "flex": `torch.nn.attention.flex_attention` with a block mask built from `cu_seqlens`, compiled
  to Triton on CUDA; whole blocks outside a sequence or outside the local window are skipped;
- "reference": scaled_dot_product_attention one sequence at a time, any device and dtype.
"auto" picks the first of varlen, flash_attn, reference that can run on the given tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "varlen", "flash_attn", "flex", "reference")
FLEX_BLOCK = 128
_HALF = (torch.float16, torch.bfloat16)


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; choose one of {', '.join(BACKENDS)}")


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `name` can run on tensors of this device and dtype, else the reason it can't."""
    if name == "reference":
        return None
    if name == "flex":
        try:
            from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        return None
    if device.type != "cuda":
        return f"attn_backend={name!r} needs a CUDA device, but the model is on {device.type}"
    if dtype not in _HALF:
        return f"attn_backend={name!r} needs float16 or bfloat16 weights, not {dtype}"
    if name == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (PyTorch >= 2.10 has it)"
        return None
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "the flash-attn package is not installed (pip install flash-attn)"
        return None
    raise ValueError(f"unknown attn_backend {name!r}")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    check_backend_name(name)
    if name != "auto":
        reason = why_unavailable(name, device, dtype)
        if reason:
            raise RuntimeError(reason)
        return name
    for candidate in ("varlen", "flash_attn"):
        if why_unavailable(candidate, device, dtype) is None:
            return candidate
    return "reference"


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window_half: int | None,
    backend: str,
    block_mask=None,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence; `window_half` tokens each side if set.

    The flex backend needs the `block_mask` that `packed_block_mask` built for this layer type.
    """
    window = (window_half, window_half) if window_half is not None else (-1, -1)
    if backend == "flex":
        return flex_packed(q, k, v, block_mask)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=window)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=window
        )
    return reference_attention(q, k, v, cu_seqlens, window_half)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, window_half: int | None
) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [len, heads, dim] -> [heads, len, dim] for SDPA
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        mask = None if window_half is None else window_mask(end - start, window_half, q.device)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1)
    return out


def window_mask(length: int, window_half: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(length, device=device)
    return (positions[:, None] - positions[None, :]).abs() <= window_half


# -- flex_attention ------------------------------------------------------------------------------


def packed_block_mask(cu_seqlens: torch.Tensor, total: int, window_half: int | None):
    """A flex BlockMask for packed sequences, computed on the device from `cu_seqlens`.

    Each block of FLEX_BLOCK queries needs the contiguous run of key blocks from the start of its
    first sequence to the end of its last one, narrowed to the window on local layers; the mask
    function then applies the exact per-token rule inside those blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    token = torch.arange(total, device=device, dtype=torch.int32)
    sequence = torch.searchsorted(cu_seqlens[1:], token, right=True)
    n_blocks = -(-total // FLEX_BLOCK)
    first_query = torch.arange(n_blocks, device=device, dtype=torch.int32) * FLEX_BLOCK
    last_query = (first_query + FLEX_BLOCK).clamp(max=total) - 1
    first_key = cu_seqlens[sequence[first_query]]
    last_key = cu_seqlens[sequence[last_query] + 1] - 1
    if window_half is not None:
        first_key = torch.maximum(first_key, first_query - window_half)
        last_key = torch.minimum(last_key, last_query + window_half)
    first_block, last_block = first_key // FLEX_BLOCK, last_key // FLEX_BLOCK
    counts = (last_block - first_block + 1).to(torch.int32)
    offsets = torch.arange(n_blocks, device=device, dtype=torch.int32)
    indices = (first_block[:, None] + offsets[None, :]).clamp(max=n_blocks - 1).to(torch.int32)

    def same_sequence(b, h, q_idx, kv_idx):
        return sequence[q_idx] == sequence[kv_idx]

    def same_sequence_in_window(b, h, q_idx, kv_idx):
        return (sequence[q_idx] == sequence[kv_idx]) & ((q_idx - kv_idx).abs() <= window_half)

    return BlockMask.from_kv_blocks(
        counts[None, None],
        indices[None, None],
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=same_sequence if window_half is None else same_sequence_in_window,
        seq_lengths=(total, total),
    )


_compiled_flex = None


def flex_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """flex_attention on [N, heads, dim] views, seen as one batch row of N tokens: no copies.

    On CUDA it runs compiled (Triton); elsewhere the eager version, which materialises the
    N x N scores and is only fit for checking the block masks on small inputs.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    attend = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        attend = _compiled_flex
    out = attend(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)
    return out[0].transpose(0, 1)
