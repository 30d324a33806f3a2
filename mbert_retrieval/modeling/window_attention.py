"""Sliding-window attention over packed sequences, as Triton kernels (forward and backward).

q, k, v are [N, heads, head_dim] (any token and head strides, unit stride along head_dim) and
`cu_seqlens` [B+1] marks where each sequence starts. Query i attends to key j when both are in the
same sequence and |i - j| <= window. Within one sequence, packed distance is position distance, so
a block of queries [m, m + block_m) needs only the keys [m - window, m + block_m + window), cut to
the block's sequences: the kernels visit those key blocks alone and mask only inside them, where
FlashAttention's windowed varlen kernel was measured slower on ~250-token documents than its
global one (benchmarks/NOTES.md). Each program finds its tokens' sequences by a binary search over
`cu_seqlens`, so no per-token tables are built.

`window_attention` is a `torch.library` custom op with its own backward, so `torch.compile`
keeps it as one opaque call. Triton is imported here; callers check `available()` first.
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


FORWARD = Tiles()
BACKWARD_DKDV = Tiles()
BACKWARD_DQ = Tiles()


@triton.jit
def _sequence_bounds(CU, tokens, n_tokens, n_seqs, SEARCH_STEPS: tl.constexpr):
    """Start and end (packed indices) of each token's sequence: cu[s] <= token < cu[s + 1]."""
    token = tl.minimum(tokens, n_tokens - 1)
    lo = tl.zeros_like(token)
    hi = tl.zeros_like(token) + n_seqs
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(CU + mid) <= token
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return tl.load(CU + lo), tl.load(CU + lo + 1)


@triton.jit
def _visible_range(CU, first, count, n_tokens, n_seqs, window, SEARCH_STEPS: tl.constexpr):
    """[lo, hi): the tokens that tokens [first, first + count) can see. Both a token's sequence start
    and its window start grow with the token, so the first token sets lo and the last sets hi."""
    last = tl.minimum(first + count, n_tokens) - 1
    first_start, _ = _sequence_bounds(CU, first, n_tokens, n_seqs, SEARCH_STEPS)
    _, last_end = _sequence_bounds(CU, last, n_tokens, n_seqs, SEARCH_STEPS)
    return tl.maximum(first - window, first_start), tl.minimum(last + window + 1, last_end)


@triton.jit
def _window_fwd(
    Q, K, V, OUT, LSE, CU,
    n_tokens, n_seqs, window, scale_log2,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    SEARCH_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_tokens
    start, end = _sequence_bounds(CU, rows, n_tokens, n_seqs, SEARCH_STEPS)
    key_lo, key_hi = _visible_range(
        CU, tl.program_id(0) * BLOCK_M, BLOCK_M, n_tokens, n_seqs, window, SEARCH_STEPS
    )

    q = tl.load(Q + rows[:, None] * sq_t + head * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for block in range(key_lo, key_hi, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_ok = cols < key_hi
        k = tl.load(K + cols[:, None] * sk_t + head * sk_h + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * sv_t + head * sv_h + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        distance = rows[:, None] - cols[None, :]
        allowed = (
            (cols[None, :] >= start[:, None])
            & (cols[None, :] < end[:, None])
            & (distance <= window)
            & (distance >= -window)
        )
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        OUT + rows[:, None] * so_t + head * so_h + dims[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None],
    )
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
    o = tl.load(OUT + rows[:, None] * so_t + head * so_h + dims[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * sdo_t + head * sdo_h + dims[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + head * n_tokens + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _window_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU,
    n_tokens, n_seqs, window, scale_log2, scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
    SEARCH_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One block of keys: loop over the queries that can see them (the same window, mirrored)."""
    head = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < n_tokens
    start, end = _sequence_bounds(CU, cols, n_tokens, n_seqs, SEARCH_STEPS)
    query_lo, query_hi = _visible_range(
        CU, tl.program_id(0) * BLOCK_N, BLOCK_N, n_tokens, n_seqs, window, SEARCH_STEPS
    )

    k = tl.load(K + cols[:, None] * sk_t + head * sk_h + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + cols[:, None] * sv_t + head * sv_h + dims[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for block in range(query_lo, query_hi, BLOCK_M):
        rows = block + tl.arange(0, BLOCK_M)
        row_ok = rows < query_hi
        q = tl.load(Q + rows[:, None] * sq_t + head * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(
            DO + rows[:, None] * sdo_t + head * sdo_h + dims[None, :], mask=row_ok[:, None], other=0.0
        )
        lse = tl.load(LSE + head * n_tokens + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + head * n_tokens + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * scale_log2  # [keys, queries]
        distance = rows[None, :] - cols[:, None]
        allowed = (
            (rows[None, :] >= start[:, None])
            & (rows[None, :] < end[:, None])
            & (distance <= window)
            & (distance >= -window)
            & row_ok[None, :]
        )
        p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * scale
    tl.store(
        DK + cols[:, None] * sdk_t + head * sdk_h + dims[None, :],
        dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None],
    )
    tl.store(
        DV + cols[:, None] * sdv_t + head * sdv_h + dims[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None],
    )


@triton.jit
def _window_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU,
    n_tokens, n_seqs, window, scale_log2, scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
    SEARCH_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_tokens
    start, end = _sequence_bounds(CU, rows, n_tokens, n_seqs, SEARCH_STEPS)
    key_lo, key_hi = _visible_range(
        CU, tl.program_id(0) * BLOCK_M, BLOCK_M, n_tokens, n_seqs, window, SEARCH_STEPS
    )

    q = tl.load(Q + rows[:, None] * sq_t + head * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * sdo_t + head * sdo_h + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + head * n_tokens + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * n_tokens + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for block in range(key_lo, key_hi, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_ok = cols < key_hi
        k = tl.load(K + cols[:, None] * sk_t + head * sk_h + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * sv_t + head * sv_h + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        distance = rows[:, None] - cols[None, :]
        allowed = (
            (cols[None, :] >= start[:, None])
            & (cols[None, :] < end[:, None])
            & (distance <= window)
            & (distance >= -window)
            & row_ok[:, None]
        )
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    tl.store(
        DQ + rows[:, None] * sdq_t + head * sdq_h + dims[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


def available() -> bool:
    """Whether the kernels can run here: a CUDA GPU, or Triton's CPU interpreter."""
    import os

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _search_steps(cu_seqlens: torch.Tensor) -> int:
    """Halvings that take the interval [0, B] down to one sequence; at least 10 (1024 sequences),
    so that batches of different sizes share one compiled kernel (extra halvings change nothing)."""
    return max(10, math.ceil(math.log2(max(cu_seqlens.numel() - 1, 1))) + 1)


def _scales(head_dim: int) -> tuple[float, float]:
    scale = 1.0 / math.sqrt(head_dim)
    return scale, scale * LOG2_E


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one [tokens, heads, dim] shape, got {q.shape}, {k.shape}, {v.shape}"
        )
    dim = q.shape[-1]
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the window kernel, got {dim}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be int32")


@torch.library.custom_op("mbert_retrieval::window_attention_fwd", mutates_args=())
def window_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [N, heads, dim] and the log2-sum-exp of each query's scores [heads, N] (float32)."""
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    _check(q, k, v, cu_seqlens)
    tokens, heads, dim = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((heads, tokens), dtype=torch.float32)
    _, scale_log2 = _scales(dim)
    tiles = FORWARD
    _window_fwd[(triton.cdiv(tokens, tiles.block_m), heads)](
        q, k, v, out, lse, cu_seqlens,
        tokens, cu_seqlens.numel() - 1, window, scale_log2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        SEARCH_STEPS=_search_steps(cu_seqlens), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=dim,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out, lse


@window_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, window):
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
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, each [N, heads, dim]."""
    grad_out, q, k, v, out = (_unit_stride(t) for t in (grad_out, q, k, v, out))
    tokens, heads, dim = q.shape
    scale, scale_log2 = _scales(dim)
    steps, n_seqs = _search_steps(cu_seqlens), cu_seqlens.numel() - 1
    delta = torch.empty_like(lse)
    _window_bwd_delta[(triton.cdiv(tokens, 64), heads)](
        out, grad_out, delta, tokens, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        BLOCK_M=64, HEAD_DIM=dim, num_warps=4,
    )  # fmt: skip
    dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    strides += (grad_out.stride(0), grad_out.stride(1))
    tiles = BACKWARD_DKDV
    _window_bwd_dkdv[(triton.cdiv(tokens, tiles.block_n), heads)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens,
        tokens, n_seqs, window, scale_log2, scale,
        *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        SEARCH_STEPS=steps, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=dim,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    tiles = BACKWARD_DQ
    _window_bwd_dq[(triton.cdiv(tokens, tiles.block_m), heads)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens,
        tokens, n_seqs, window, scale_log2, scale,
        *strides, dq.stride(0), dq.stride(1),
        SEARCH_STEPS=steps, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=dim,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return dq, dk, dv


@window_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, window):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.window = window
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = window_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens, ctx.window)
    return dq, dk, dv, None, None


window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, window: int
) -> torch.Tensor:
    """Each query attends to the keys of its own sequence at most `window` tokens away: [N, heads, dim]."""
    return window_attention_fwd(q, k, v, cu_seqlens, window)[0]
