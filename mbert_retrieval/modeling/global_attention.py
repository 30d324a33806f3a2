"""Global attention over packed sequences, as a Triton forward kernel for inference.

q, k, v are [N, heads, dim] (any token and head strides, unit stride along head_dim) and
`cu_seqlens` [B+1] marks where each sequence starts. Every query attends to every key of its own
sequence. As in FlashAttention's varlen kernel, each program takes one block of queries of one
sequence and one head (the grid runs over `max_seqlen`'s blocks; blocks past a sequence's end
return at once), so no block mixes sequences: only the last, partial block of keys is masked.

q and k come rotated: unlike the window kernel, rotating them as they load was slower than a rotary
pass first (every block of queries loads all its sequence's keys and would rotate each again:
1.5-1.9 ms against 0.99 ms per long batch on an H200, benchmarks/NOTES.md, run 48).

There is no backward: the model calls it only without gradients (`Attention.global_kernel_in_inference`)
and trains with FlashAttention. Under `torch.compile` it is a `torch.library.triton_op`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mbert_retrieval.modeling.attention import check_kernel_inputs
from mbert_retrieval.modeling.fused_elementwise import launcher, unit_stride
from mbert_retrieval.modeling.window_attention import Tiles, _scales

# Launch shapes from benchmarks/window_kernel_sweep.py on an H200 (`global_fwd_*` rows): narrower
# query blocks waste less on short sequences' partial blocks, wider ones reuse keys more on long ones.
FORWARD_SHORT = Tiles(block_m=64, block_n=64, warps=4, stages=3)
FORWARD_LONG = Tiles(block_m=128, block_n=64, warps=8, stages=3)
LONG_FROM = 1024  # max_seqlen above which FORWARD_LONG is used


def tiles_for(max_seqlen: int) -> Tiles:
    return FORWARD_LONG if max_seqlen > LONG_FROM else FORWARD_SHORT


@triton.jit
def _attend_block(q, acc, m_i, l_i, K, V, cols, end, sk_t, sk_h, sv_t, sv_h, head,
                  scale_log2: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """One block of keys into the running softmax (log2 domain). MASKED: some of `cols` lie past the
    sequence's end; otherwise every score is finite and no row can be left without a key."""
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < end
    k = tl.load(K + cols[:, None] * sk_t + head * sk_h + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + cols[:, None] * sv_t + head * sv_h + dims[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale_log2
    if MASKED:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _global_fwd(
    Q, K, V, OUT, CU, heads, scale_log2: tl.constexpr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Queries [start + pid0 * BLOCK_M, ...) of sequence pid1 // heads, for head pid1 % heads."""
    sequence, head = tl.program_id(1) // heads, tl.program_id(1) % heads
    start, end = tl.load(CU + sequence), tl.load(CU + sequence + 1)
    first = start + tl.program_id(0) * BLOCK_M
    if first >= end:
        return
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * sq_t + head * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    whole_end = start + (end - start) // BLOCK_N * BLOCK_N  # whole blocks of keys need no mask
    for block in range(start, whole_end, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, K, V, cols, end, sk_t, sk_h, sv_t, sv_h, head, scale_log2, HEAD_DIM, False
        )
    if whole_end < end:
        cols = whole_end + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, K, V, cols, end, sk_t, sk_h, sv_t, sv_h, head, scale_log2, HEAD_DIM, True
        )
    out = acc / l_i[:, None]
    tl.store(
        OUT + rows[:, None] * so_t + head * so_h + dims[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None],
    )


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    traced: bool = False,
) -> torch.Tensor:
    q, k, v = (unit_stride(t) for t in (q, k, v))
    check_kernel_inputs(q, k, v, cu_seqlens, "global kernel")
    tokens, heads, dim = q.shape
    out = q.new_empty(q.shape)
    tiles = tiles_for(max_seqlen)
    sequences = cu_seqlens.shape[0] - 1
    launcher(_global_fwd, traced)[(triton.cdiv(max_seqlen, tiles.block_m), sequences * heads)](
        q, k, v, out, cu_seqlens, heads, _scales(dim)[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=dim,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out


@torch.library.triton_op("mbert_retrieval::global_attention_fwd", mutates_args=())
def global_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    return _forward(q, k, v, cu_seqlens, max_seqlen, traced=True)


def _no_gradients(*inputs: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise RuntimeError("the global attention kernel has no backward: call it without gradients")


def global_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Each query attends to every key of its own sequence: [N, heads, dim]. Inference only."""
    _no_gradients(q, k, v)
    if torch.compiler.is_compiling():
        return global_attention_fwd(q, k, v, cu_seqlens, max_seqlen)
    return _forward(q, k, v, cu_seqlens, max_seqlen)
