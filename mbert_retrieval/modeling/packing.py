"""Where each token of a packed batch belongs: `cu_seqlens` [B+1] marks where each sequence starts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sequence_of(cu_seqlens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The sequence that token `index` belongs to: the number of starts at or before it, minus one.

    Searches all of `cu_seqlens`, never a slice of it: inductor's CUDA searchsorted ignores a view's
    storage offset (torch 2.11), so `searchsorted(cu_seqlens[1:], ...)` came out one too high under
    torch.compile of the whole forward (benchmarks/NOTES.md)."""
    return torch.searchsorted(cu_seqlens, index, right=True, out_int32=True) - 1


def sequence_ids(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each of the `tokens` packed tokens' sequence index [N] int32, on the device without a host sync."""
    return sequence_of(cu_seqlens, torch.arange(tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype))


@dataclass(frozen=True)
class GraphShapes:
    """How a packed batch is rounded up so that CUDA graphs recorded for one batch replay for others.

    A graph is recorded per distinct (tokens, sequences, longest sequence); rounding all three keeps
    their number small: token counts to a multiple of `tokens` (padding tokens form extra sequences
    of at most `pad_length`), sequence counts to a multiple of `sequences` (empty sequences), and the
    longest sequence to a power of two (it only sizes the attention kernels' launch grids).
    """

    tokens: int = 256
    sequences: int = 16
    pad_length: int = 128

    def __post_init__(self) -> None:
        if min(self.tokens, self.sequences, self.pad_length) < 1:
            raise ValueError(f"GraphShapes fields must be positive, got {self}")


def pad_to_graph_shape(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, shapes: GraphShapes, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batch with padding sequences appended: (ids, cu_seqlens, max_seqlen) of a rounded shape.

    The real tokens keep their places, so the first `input_ids.numel()` outputs are theirs; padding
    sequences attend only to themselves. Built from shapes alone: no host sync.
    """
    tokens = input_ids.shape[0]
    total = -(-tokens // shapes.tokens) * shapes.tokens
    pad_sequences = -(-(total - tokens) // shapes.pad_length)
    sequences = cu_seqlens.shape[0] - 1 + pad_sequences
    appended = -(-sequences // shapes.sequences) * shapes.sequences - sequences + pad_sequences
    # Ends of the padding sequences, then of the empty ones: made on the device (a list copied from
    # the host would wait for the GPU to finish its queue).
    steps = torch.arange(1, appended + 1, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    ends = (steps * shapes.pad_length + tokens).clamp_max(total)
    padded_ids = F.pad(input_ids, (0, total - tokens), value=pad_id)
    padded_cu = torch.cat((cu_seqlens, ends))
    longest = 1 << (max(max_seqlen, shapes.pad_length) - 1).bit_length()
    return padded_ids, padded_cu, longest
