"""`cuda_graphs.fill_padded` as one Triton kernel: a replayed call's batch written into the recorded
buffers with one launch instead of five (copy, fill, copy, arange, clamp), each of which the GPU
runs in turn before the graph's first kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _fill_padded(
    IDS, CU, SRC_IDS, SRC_CU, tokens, batch, total, cu_entries, cu_offset, pad_length, pad_id,
    BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(SRC_IDS + i, mask=i < tokens, other=pad_id)
    tl.store(IDS + i, ids, mask=i < total)
    own_end = tl.load(SRC_CU + i, mask=i < batch, other=0) - cu_offset
    padding_end = tl.minimum(tokens + (i - batch + 1) * pad_length, total)  # then empty sequences
    tl.store(CU + i, tl.where(i < batch, own_end, padding_end), mask=i < cu_entries)


def fill_padded(
    ids: torch.Tensor,
    cu: torch.Tensor,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pad_length: int,
    pad_id: int,
    cu_offset: int = 0,
) -> None:
    """What `cuda_graphs.fill_padded` writes, in one launch."""
    total, entries = ids.shape[0], cu.shape[0]
    grid = (triton.cdiv(max(total, entries), BLOCK),)
    _fill_padded[grid](
        ids, cu, input_ids, cu_seqlens, input_ids.shape[0], cu_seqlens.shape[0], total, entries,
        cu_offset, pad_length, pad_id, BLOCK=BLOCK,
    )  # fmt: skip
