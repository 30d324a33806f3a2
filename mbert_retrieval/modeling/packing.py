"""Where each token of a packed batch belongs: `cu_seqlens` [B+1] marks where each sequence starts."""

from __future__ import annotations

import torch


def sequence_of(cu_seqlens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The sequence that token `index` belongs to: the number of starts at or before it, minus one.

    Searches all of `cu_seqlens`, never a slice of it: inductor's CUDA searchsorted ignores a view's
    storage offset (torch 2.11), so `searchsorted(cu_seqlens[1:], ...)` came out one too high under
    torch.compile of the whole forward (benchmarks/NOTES.md)."""
    return torch.searchsorted(cu_seqlens, index, right=True, out_int32=True) - 1


def sequence_ids(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each of the `tokens` packed tokens' sequence index [N] int32, on the device without a host sync."""
    return sequence_of(cu_seqlens, torch.arange(tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype))
