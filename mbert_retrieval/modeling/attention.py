"""Attention over packed sequences: q, k, v are [total_tokens, heads, head_dim] plus `cu_seqlens`.

Backends:
- "varlen": `torch.nn.attention.varlen.varlen_attn` (FlashAttention inside PyTorch, CUDA, fp16/bf16);
- "flash_attn": `flash_attn.flash_attn_varlen_func` from the flash-attn package;
- "reference": scaled_dot_product_attention on the batch re-padded to [B, L] (one sequence at a
  time for very uneven batches), any device and dtype.
"auto" picks the first that can run on the given tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "varlen", "flash_attn", "reference")
_HALF = (torch.float16, torch.bfloat16)
PADDED_SCORES_LIMIT = 2**26  # B x L x L mask entries the re-padded reference path may build


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; choose one of {', '.join(BACKENDS)}")


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `name` can run on tensors of this device and dtype, else the reason it can't."""
    if name == "reference":
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
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence; `window_half` tokens each side if set.

    `key_mask` [N] (reference backend only) keeps tokens others may attend to; every token still
    computes its own output. A token left with nothing to attend to gets zeros.
    """
    window = (window_half, window_half) if window_half is not None else (-1, -1)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=window)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=window
        )
    return reference_attention(q, k, v, cu_seqlens, window_half, key_mask)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window_half: int | None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA on the batch re-padded to [B, heads, L, dim]; one sequence at a time when that is too big."""
    lengths = cu_seqlens.diff()
    batch, longest = lengths.numel(), int(lengths.max())
    if batch == 1 or batch * longest * longest > PADDED_SCORES_LIMIT:
        return per_sequence_attention(q, k, v, cu_seqlens, window_half, key_mask)
    sequence = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths)
    position = torch.arange(q.shape[0], device=q.device) - cu_seqlens[sequence]

    def padded(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(batch, longest, *t.shape[1:])
        out[sequence, position] = t
        return out.transpose(1, 2)

    slots = torch.arange(longest, device=q.device)
    is_real = slots[None, :] < lengths[:, None]  # [B, L]
    keys = is_real if key_mask is None else padded(key_mask[:, None]).squeeze(1).bool()
    mask = keys[:, None, :]  # [B, query, key]
    if window_half is not None:
        mask = mask & window_mask(longest, window_half, q.device)[None]
    out = masked_sdpa(padded(q), padded(k), padded(v), mask[:, None])
    return out.transpose(1, 2)[sequence, position]


def per_sequence_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window_half: int | None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [len, heads, dim] -> [heads, len, dim] for SDPA
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        mask = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device)
        if window_half is not None:
            mask = window_mask(end - start, window_half, q.device)
        if key_mask is not None:
            mask = mask & key_mask[start:end][None, :]
        out[start:end] = masked_sdpa(qs, ks, vs, mask).transpose(0, 1)
    return out


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA where a query row with no allowed key gets zeros instead of NaN (and no NaN gradients)."""
    has_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key)
    return out.masked_fill(~has_key, 0.0)


def window_mask(length: int, window_half: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(length, device=device)
    return (positions[:, None] - positions[None, :]).abs() <= window_half
