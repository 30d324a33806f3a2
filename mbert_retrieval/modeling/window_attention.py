"""Sliding-window attention over packed sequences, as Triton kernels (forward and backward).

q, k, v are [N, heads, head_dim] (any token and head strides, unit stride along head_dim) and
`cu_seqlens` [B+1] marks where each sequence starts. Query i attends to key j when both are in the
same sequence and |i - j| <= window. Within one sequence, packed distance is position distance, so
a block of queries [m, m + block_m) needs only the keys [m - window, m + block_m + window), cut to
the block's sequences: the kernels visit those key blocks alone and mask only inside them, where
FlashAttention's windowed varlen kernel was measured slower on ~250-token documents than its
global one (benchmarks/NOTES.md). Tokens' sequence indices (`sequence_ids`, made once per forward)
give the masks and, with `cu_seqlens`, each block's range of keys.

`window_attention` is a `torch.library` custom op with its own backward, so `torch.compile`
keeps it as one opaque call.
On a CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before import): that
is how the tests check them without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class Tiles:
    """A kernel's launch shape: queries per block, keys per block, warps, pipeline stages."""

    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    stages: int = 2

    def launch(self, kernel, blocks: int, heads: int, head_dim: int, *args) -> None:
        """`kernel(*args)` on a grid of (`blocks`, `heads`) programs with this launch shape."""
        kernel[(blocks, heads)](
            *args,
            BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            HEAD_DIM=head_dim,
            num_warps=self.warps,
            num_stages=self.stages,
        )


# Launch shapes chosen by benchmarks/window_kernel_sweep.py on an H200 (results/window_kernel_sweep.json):
# the backward's dk/dv kernel takes 32 queries per step, its dq kernel 32 keys per step.
FORWARD = Tiles()
BACKWARD_DKDV = Tiles(block_m=32, block_n=64)
BACKWARD_DQ = Tiles(block_m=64, block_n=32)


@triton.jit
def _visible_range(CU, SEQ, first, count, n_tokens, window):
    """[lo, hi): the tokens that tokens [first, first + count) can see. Both a token's sequence start
    and its window start grow with the token, so the first token sets lo and the last sets hi."""
    last = tl.minimum(first + count, n_tokens) - 1
    first_start = tl.load(CU + tl.load(SEQ + first))
    last_end = tl.load(CU + tl.load(SEQ + last) + 1)
    return tl.maximum(first - window, first_start), tl.minimum(last + window + 1, last_end)


@triton.jit
def _block(SEQ, first, end, BLOCK: tl.constexpr, outside):
    """Tokens [first, first + BLOCK), which of them are before `end`, and their sequence indices
    (`outside` for those past it: -2 for queries and -1 for keys, so that they match nothing)."""
    index = first + tl.arange(0, BLOCK)
    ok = index < end
    return index, ok, tl.load(SEQ + index, mask=ok, other=outside)


@triton.jit
def _own_block(CU, SEQ, n_tokens, window, BLOCK: tl.constexpr, outside):
    """This program's head, its block of tokens (as `_block` gives them) and the range [lo, hi) of
    tokens they can see: the grid is (blocks, heads)."""
    first = tl.program_id(0) * BLOCK
    index, ok, seq = _block(SEQ, first, n_tokens, BLOCK, outside)
    lo, hi = _visible_range(CU, SEQ, first, BLOCK, n_tokens, window)
    return tl.program_id(1), index, ok, seq, lo, hi


@triton.jit
def _load(PTR, index, ok, stride_t, stride_h, head, dims):
    """The rows `index` of one head of a [tokens, heads, dim] tensor, zeros where not `ok`."""
    return tl.load(
        PTR + index[:, None] * stride_t + head * stride_h + dims[None, :], mask=ok[:, None], other=0.0
    )


@triton.jit
def _store(PTR, index, ok, stride_t, stride_h, head, dims, value):
    offsets = index[:, None] * stride_t + head * stride_h + dims[None, :]
    tl.store(PTR + offsets, value.to(PTR.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _query_grads(DO, LSE, DELTA, rows, ok, sdo_t, sdo_h, head, dims, n_tokens):
    """What the backward needs of each query row besides q: dO, its log2-sum-exp and delta."""
    do = _load(DO, rows, ok, sdo_t, sdo_h, head, dims)
    lse = tl.load(LSE + head * n_tokens + rows, mask=ok, other=0.0)
    delta = tl.load(DELTA + head * n_tokens + rows, mask=ok, other=0.0)
    return do, lse, delta


@triton.jit
def _in_window(index_a, index_b, seq_a, seq_b, window):
    """[a, b] mask: the two tokens are in the same sequence and at most `window` tokens apart."""
    distance = index_a[:, None] - index_b[None, :]
    return (seq_a[:, None] == seq_b[None, :]) & (distance <= window) & (distance >= -window)


@triton.jit
def _key_block(
    q, rows, row_seq, K, V, SEQ, block, key_hi, window, scale_log2,
    sk_t, sk_h, sv_t, sv_h, head, dims, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The keys [block, block + BLOCK_N) cut at key_hi: k, v, the queries' scores against them (log2
    scaled) and which of those scores are in the window."""
    cols, col_ok, col_seq = _block(SEQ, block, key_hi, BLOCK_N, -1)
    k = _load(K, cols, col_ok, sk_t, sk_h, head, dims)
    v = _load(V, cols, col_ok, sv_t, sv_h, head, dims)
    s = tl.dot(q, tl.trans(k)) * scale_log2
    return k, v, s, _in_window(rows, cols, row_seq, col_seq, window)


@triton.jit
def _window_fwd(
    Q, K, V, OUT, LSE, CU, SEQ,
    n_tokens, window, scale_log2,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    dims = tl.arange(0, HEAD_DIM)
    head, rows, row_ok, row_seq, key_lo, key_hi = _own_block(CU, SEQ, n_tokens, window, BLOCK_M, -2)

    q = _load(Q, rows, row_ok, sq_t, sq_h, head, dims)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for block in range(key_lo, key_hi, BLOCK_N):
        k, v, s, allowed = _key_block(
            q, rows, row_seq, K, V, SEQ, block, key_hi, window, scale_log2,
            sk_t, sk_h, sv_t, sv_h, head, dims, BLOCK_N,
        )  # fmt: skip
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    _store(OUT, rows, row_ok, so_t, so_h, head, dims, acc / l_i[:, None])
    tl.store(LSE + head * n_tokens + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _window_bwd_delta(
    OUT, DO, DELTA, n_tokens, so_t, so_h, sdo_t, sdo_h, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """delta[head, i] = <dO_i, O_i>, the softmax backward's row term."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    ok = rows < n_tokens
    o = _load(OUT, rows, ok, so_t, so_h, head, dims)
    do = _load(DO, rows, ok, sdo_t, sdo_h, head, dims)
    tl.store(DELTA + head * n_tokens + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _window_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, SEQ,
    n_tokens, window, scale_log2, scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One block of keys: loop over the queries that can see them (the same window, mirrored)."""
    dims = tl.arange(0, HEAD_DIM)
    head, cols, col_ok, col_seq, query_lo, query_hi = _own_block(CU, SEQ, n_tokens, window, BLOCK_N, -1)

    k = _load(K, cols, col_ok, sk_t, sk_h, head, dims)
    v = _load(V, cols, col_ok, sv_t, sv_h, head, dims)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for block in range(query_lo, query_hi, BLOCK_M):
        rows, row_ok, row_seq = _block(SEQ, block, query_hi, BLOCK_M, -2)
        q = _load(Q, rows, row_ok, sq_t, sq_h, head, dims)
        do, lse, delta = _query_grads(DO, LSE, DELTA, rows, row_ok, sdo_t, sdo_h, head, dims, n_tokens)
        s_t = tl.dot(k, tl.trans(q)) * scale_log2  # [keys, queries]
        allowed = _in_window(cols, rows, col_seq, row_seq, window)
        p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    _store(DK, cols, col_ok, sdk_t, sdk_h, head, dims, dk * scale)
    _store(DV, cols, col_ok, sdv_t, sdv_h, head, dims, dv)


@triton.jit
def _window_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU, SEQ,
    n_tokens, window, scale_log2, scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    dims = tl.arange(0, HEAD_DIM)
    head, rows, row_ok, row_seq, key_lo, key_hi = _own_block(CU, SEQ, n_tokens, window, BLOCK_M, -2)

    q = _load(Q, rows, row_ok, sq_t, sq_h, head, dims)
    do, lse, delta = _query_grads(DO, LSE, DELTA, rows, row_ok, sdo_t, sdo_h, head, dims, n_tokens)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for block in range(key_lo, key_hi, BLOCK_N):
        k, v, s, allowed = _key_block(
            q, rows, row_seq, K, V, SEQ, block, key_hi, window, scale_log2,
            sk_t, sk_h, sv_t, sv_h, head, dims, BLOCK_N,
        )  # fmt: skip
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    _store(DQ, rows, row_ok, sdq_t, sdq_h, head, dims, dq * scale)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sequence_ids(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each packed token's sequence index [N] int32, on the device without a host sync."""
    index = torch.arange(tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], index, right=True, out_int32=True)


def _scales(head_dim: int) -> tuple[float, float]:
    scale = 1.0 / math.sqrt(head_dim)
    return scale, scale * LOG2_E


def supports_head_dim(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one [tokens, heads, dim] shape, got {q.shape}, {k.shape}, {v.shape}"
        )
    if not supports_head_dim(q.shape[-1]):
        raise ValueError(f"head_dim must be a power of two >= 16 for the window kernel, got {q.shape[-1]}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be int32")


@torch.library.custom_op("mbert_retrieval::window_attention_fwd", mutates_args=())
def window_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_ids: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [N, heads, dim] and the log2-sum-exp of each query's scores [heads, N] (float32)."""
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    _check(q, k, v, cu_seqlens)
    tokens, heads, dim = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((heads, tokens), dtype=torch.float32)
    FORWARD.launch(
        _window_fwd, triton.cdiv(tokens, FORWARD.block_m), heads, dim,
        q, k, v, out, lse, cu_seqlens, seq_ids,
        tokens, window, _scales(dim)[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    return out, lse


@window_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, seq_ids, window):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mbert_retrieval::window_attention_bwd", mutates_args=())
def window_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_ids: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, each [N, heads, dim]."""
    grad_out, q, k, v, out = (_unit_stride(t) for t in (grad_out, q, k, v, out))
    tokens, heads, dim = q.shape
    scale, scale_log2 = _scales(dim)
    delta = torch.empty_like(lse)
    _window_bwd_delta[(triton.cdiv(tokens, 64), heads)](
        out, grad_out, delta, tokens, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        BLOCK_M=64, HEAD_DIM=dim, num_warps=4,
    )  # fmt: skip
    dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    strides += (grad_out.stride(0), grad_out.stride(1))
    BACKWARD_DKDV.launch(
        _window_bwd_dkdv, triton.cdiv(tokens, BACKWARD_DKDV.block_n), heads, dim,
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, seq_ids,
        tokens, window, scale_log2, scale,
        *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
    )  # fmt: skip
    BACKWARD_DQ.launch(
        _window_bwd_dq, triton.cdiv(tokens, BACKWARD_DQ.block_m), heads, dim,
        q, k, v, grad_out, lse, delta, dq, cu_seqlens, seq_ids,
        tokens, window, scale_log2, scale,
        *strides, dq.stride(0), dq.stride(1),
    )  # fmt: skip
    return dq, dk, dv


@window_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, seq_ids, window):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, seq_ids, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seq_ids)
    ctx.window = window
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, seq_ids = ctx.saved_tensors
    dq, dk, dv = window_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens, seq_ids, ctx.window)
    return dq, dk, dv, None, None, None


window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window: int,
    seq_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query attends to the keys of its own sequence at most `window` tokens away: [N, heads, dim].

    `seq_ids` [N] int32 (`sequence_ids`), when the caller has it, saves computing it per call."""
    if seq_ids is None:
        seq_ids = sequence_ids(cu_seqlens, q.shape[0])
    return window_attention_fwd(q, k, v, cu_seqlens, seq_ids, window)[0]
