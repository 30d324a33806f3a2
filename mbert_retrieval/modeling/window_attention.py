"""Sliding-window attention over packed sequences, as Triton kernels (forward and backward).

q, k, v are [N, heads, head_dim] (any token and head strides, unit stride along head_dim) and
`cu_seqlens` [B+1] marks where each sequence starts. Query i attends to key j when both are in the
same sequence and |i - j| <= window. Within one sequence, packed distance is position distance, so
a block of queries [m, m + block_m) needs only the keys [m - window, m + block_m + window), cut to
the block's sequences: the kernels visit those key blocks alone and mask only inside them, where
FlashAttention's windowed varlen kernel was measured slower on ~250-token documents than its
global one (benchmarks/NOTES.md). Tokens' sequence indices (`sequence_ids`, made once per forward)
give the masks and, with `cu_seqlens`, each block's range of keys.

`window_attention_rotary` takes the projection qkv [N, 3, heads, dim] instead, with the rotary
embedding's cos and sin: the kernels rotate q and k as they load them and rotate dq and dk back as
they store them into qkv's gradient, so the model's local layers run no rotary pass of their own.

Under `torch.compile`, `window_attention` is a `torch.library.triton_op` with its own backward:
inductor launches its kernels from its generated code; run eagerly, it calls the kernels without the
operator.
On a CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before import): that
is how the tests check them without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mbert_retrieval.modeling.attention import check_kernel_inputs, records_gradients
from mbert_retrieval.modeling.fused_elementwise import launcher, unit_stride
from mbert_retrieval.modeling.packing import sequence_ids

LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class Tiles:
    """A kernel's launch shape: queries per block, keys per block, warps, pipeline stages."""

    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    stages: int = 2


# Launch shapes chosen by benchmarks/window_kernel_sweep.py on an H200 (results/window_kernel_sweep.json,
# ..._h200_run46.json): the forward takes 32 keys per step (69.2 against 72.3 us for 16 k tokens),
# the backward's dk/dv kernel 32 queries per step, its dq kernel 32 keys per step.
FORWARD = Tiles(block_n=32)
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
def _load_rotated(X, COS, SIN, rows, ok, s_t, s_h, sc_t, head, HEAD_DIM: tl.constexpr):
    """Rows of X [N, heads, dim] rotated by their positions' cos and sin [N, dim / 2] (rotate-half,
    float32 arithmetic rounded to X's dtype, as `encoder.apply_rotary`), with the two halves
    interleaved along dim: q and k are both held so, and their dot products are the same."""
    half: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, half)
    at = X + rows[:, None] * s_t + head * s_h + dims[None, :]
    x1 = tl.load(at, mask=ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(at + half, mask=ok[:, None], other=0.0).to(tl.float32)
    cos = tl.load(COS + rows[:, None] * sc_t + dims[None, :], mask=ok[:, None], other=0.0)
    sin = tl.load(SIN + rows[:, None] * sc_t + dims[None, :], mask=ok[:, None], other=0.0)
    rotated = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)  # [rows, half, 2]
    return tl.reshape(rotated, (rows.shape[0], HEAD_DIM)).to(X.dtype.element_ty)


@triton.jit
def _store_unrotated(DST, grad, COS, SIN, rows, ok, s_t, s_h, sc_t, head, HEAD_DIM: tl.constexpr):
    """Store `grad` (float32, with respect to rotated rows held as `_load_rotated` holds them) as the
    gradient with respect to the rows before their rotation, halves in place."""
    half: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, half)
    g1, g2 = tl.split(tl.reshape(grad, (rows.shape[0], half, 2)))
    cos = tl.load(COS + rows[:, None] * sc_t + dims[None, :], mask=ok[:, None], other=0.0)
    sin = tl.load(SIN + rows[:, None] * sc_t + dims[None, :], mask=ok[:, None], other=0.0)
    at = DST + rows[:, None] * s_t + head * s_h + dims[None, :]
    tl.store(at, (g1 * cos + g2 * sin).to(DST.dtype.element_ty), mask=ok[:, None])
    tl.store(at + half, (g2 * cos - g1 * sin).to(DST.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _load_rows(X, COS, SIN, rows, ok, s_t, s_h, sc_t, head, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr):
    """Rows of X [N, heads, dim] for one head: rotated as `_load_rotated` holds them, or as they are."""
    if ROTARY:
        x = _load_rotated(X, COS, SIN, rows, ok, s_t, s_h, sc_t, head, HEAD_DIM)
    else:
        dims = tl.arange(0, HEAD_DIM)
        x = tl.load(X + rows[:, None] * s_t + head * s_h + dims[None, :], mask=ok[:, None], other=0.0)
    return x


@triton.jit
def _store_rows(
    DST, grad, COS, SIN, rows, ok, s_t, s_h, sc_t, head, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr
):
    """The gradient of rows `_load_rows` loaded (float32), stored in DST's dtype: rotated back or as it is."""
    if ROTARY:
        _store_unrotated(DST, grad, COS, SIN, rows, ok, s_t, s_h, sc_t, head, HEAD_DIM)
    else:
        dims = tl.arange(0, HEAD_DIM)
        tl.store(
            DST + rows[:, None] * s_t + head * s_h + dims[None, :],
            grad.to(DST.dtype.element_ty),
            mask=ok[:, None],
        )


# The scales are constexpr: inductor passes a float argument of a triton_op's kernel as fp64, which would
# turn the softmax's running statistics into fp64.
@triton.jit
def _window_fwd(
    Q, K, V, OUT, LSE, CU, SEQ, COS, SIN,
    n_tokens, window, scale_log2: tl.constexpr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sc_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr,
):  # fmt: skip
    """One block of queries. With ROTARY, q and k are rotated as they load (COS, SIN per token)."""
    head = tl.program_id(1)
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_tokens
    row_seq = tl.load(SEQ + rows, mask=row_ok, other=-2)
    key_lo, key_hi = _visible_range(CU, SEQ, first, BLOCK_M, n_tokens, window)

    q = _load_rows(Q, COS, SIN, rows, row_ok, sq_t, sq_h, sc_t, head, HEAD_DIM, ROTARY)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for block in range(key_lo, key_hi, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_ok = cols < key_hi
        col_seq = tl.load(SEQ + cols, mask=col_ok, other=-1)
        k = _load_rows(K, COS, SIN, cols, col_ok, sk_t, sk_h, sc_t, head, HEAD_DIM, ROTARY)
        v = tl.load(V + cols[:, None] * sv_t + head * sv_h + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        distance = rows[:, None] - cols[None, :]
        allowed = (row_seq[:, None] == col_seq[None, :]) & (distance <= window) & (distance >= -window)
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
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, SEQ, COS, SIN, dk_offset, dv_offset,
    n_tokens, window, scale_log2: tl.constexpr, scale: tl.constexpr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h, sc_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr,
):  # fmt: skip
    """One block of keys: loop over the queries that can see them (the same window, mirrored). With
    ROTARY, q and k are rotated as they load and dk is rotated back as it is stored."""
    head = tl.program_id(1)
    first = tl.program_id(0) * BLOCK_N
    cols = first + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < n_tokens
    col_seq = tl.load(SEQ + cols, mask=col_ok, other=-1)
    query_lo, query_hi = _visible_range(CU, SEQ, first, BLOCK_N, n_tokens, window)

    k = _load_rows(K, COS, SIN, cols, col_ok, sk_t, sk_h, sc_t, head, HEAD_DIM, ROTARY)
    v = tl.load(V + cols[:, None] * sv_t + head * sv_h + dims[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for block in range(query_lo, query_hi, BLOCK_M):
        rows = block + tl.arange(0, BLOCK_M)
        row_ok = rows < query_hi
        q = _load_rows(Q, COS, SIN, rows, row_ok, sq_t, sq_h, sc_t, head, HEAD_DIM, ROTARY)
        do = tl.load(
            DO + rows[:, None] * sdo_t + head * sdo_h + dims[None, :], mask=row_ok[:, None], other=0.0
        )
        lse = tl.load(LSE + head * n_tokens + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + head * n_tokens + rows, mask=row_ok, other=0.0)
        row_seq = tl.load(SEQ + rows, mask=row_ok, other=-2)
        s_t = tl.dot(k, tl.trans(q)) * scale_log2  # [keys, queries]
        distance = rows[None, :] - cols[:, None]
        allowed = (col_seq[:, None] == row_seq[None, :]) & (distance <= window) & (distance >= -window)
        p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * scale
    _store_rows(DK + dk_offset, dk, COS, SIN, cols, col_ok, sdk_t, sdk_h, sc_t, head, HEAD_DIM, ROTARY)
    # With ROTARY, dk and dv go into one tensor (qkv's gradient), DK, at their offsets.
    if ROTARY:
        dv_at = DK + dv_offset
    else:
        dv_at = DV + dv_offset
    tl.store(
        dv_at + cols[:, None] * sdv_t + head * sdv_h + dims[None, :],
        dv.to(dv_at.dtype.element_ty),
        mask=col_ok[:, None],
    )


@triton.jit
def _window_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU, SEQ, COS, SIN, dq_offset,
    n_tokens, window, scale_log2: tl.constexpr, scale: tl.constexpr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h, sc_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1)
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_tokens
    row_seq = tl.load(SEQ + rows, mask=row_ok, other=-2)
    key_lo, key_hi = _visible_range(CU, SEQ, first, BLOCK_M, n_tokens, window)

    q = _load_rows(Q, COS, SIN, rows, row_ok, sq_t, sq_h, sc_t, head, HEAD_DIM, ROTARY)
    do = tl.load(DO + rows[:, None] * sdo_t + head * sdo_h + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + head * n_tokens + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * n_tokens + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for block in range(key_lo, key_hi, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_ok = cols < key_hi
        k = _load_rows(K, COS, SIN, cols, col_ok, sk_t, sk_h, sc_t, head, HEAD_DIM, ROTARY)
        v = tl.load(V + cols[:, None] * sv_t + head * sv_h + dims[None, :], mask=col_ok[:, None], other=0.0)
        col_seq = tl.load(SEQ + cols, mask=col_ok, other=-1)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        distance = rows[:, None] - cols[None, :]
        allowed = (row_seq[:, None] == col_seq[None, :]) & (distance <= window) & (distance >= -window)
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    _store_rows(DQ + dq_offset, dq, COS, SIN, rows, row_ok, sdq_t, sdq_h, sc_t, head, HEAD_DIM, ROTARY)


def _scales(head_dim: int) -> tuple[float, float]:
    scale = 1.0 / math.sqrt(head_dim)
    return scale, scale * LOG2_E


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_ids: torch.Tensor,
    window: int,
    traced: bool = False,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [N, heads, dim] and the log2-sum-exp of each query's scores [heads, N] (float32).
    `rotation`: cos and sin [N, dim / 2] (float32) to rotate q and k by as the kernel loads them."""
    q, k, v = (unit_stride(t) for t in (q, k, v))
    check_kernel_inputs(q, k, v, cu_seqlens, "window kernel")
    tokens, heads, dim = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((heads, tokens), dtype=torch.float32)
    cos, sin = rotation if rotation is not None else (seq_ids, seq_ids)  # not read without a rotation
    tiles = FORWARD
    launcher(_window_fwd, traced)[(triton.cdiv(tokens, tiles.block_m), heads)](
        q, k, v, out, lse, cu_seqlens, seq_ids, cos, sin,
        tokens, window, _scales(dim)[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        cos.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=dim, ROTARY=rotation is not None,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out, lse


# `_forward` as an operator for torch.compile; inductor launches its kernel from its generated code.
@torch.library.triton_op("mbert_retrieval::window_attention_fwd", mutates_args=())
def window_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_ids: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens, seq_ids, window, traced=True)


def _backward_kernels(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_ids: torch.Tensor,
    window: int,
    traced: bool = False,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """dq, dk, dv, each [N, heads, dim]; with `rotation` (q and k rotated inside the kernels), the
    gradient of the projection [N, 3, heads, dim] they came from, as one tensor."""
    grad_out, q, k, v, out = (unit_stride(t) for t in (grad_out, q, k, v, out))
    tokens, heads, dim = q.shape
    scale, scale_log2 = _scales(dim)
    delta = torch.empty_like(lse)
    launcher(_window_bwd_delta, traced)[(triton.cdiv(tokens, 64), heads)](
        out, grad_out, delta, tokens, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        BLOCK_M=64, HEAD_DIM=dim, num_warps=4,
    )  # fmt: skip
    if rotation is None:
        dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
        offsets, cos, sin = (0, 0, 0), seq_ids, seq_ids  # the tables are not read without a rotation
    else:
        # One tensor written at three offsets, not three views of it: inside a compiled graph a
        # kernel that writes views makes inductor copy each back (benchmarks/NOTES.md, run 24).
        grad_qkv = q.new_empty(tokens, 3, heads, dim)
        dq = dk = grad_qkv
        dv = seq_ids  # not written: the kernel stores dv into DK (one tensor passed once)
        offsets, (cos, sin) = tuple(part * grad_qkv.stride(1) for part in range(3)), rotation
    out_strides = (dq.stride(0), dq.stride(-2))  # [N, heads, dim] or [N, 3, heads, dim]: token, head
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    strides += (grad_out.stride(0), grad_out.stride(1))
    tiles = BACKWARD_DKDV
    launcher(_window_bwd_dkdv, traced)[(triton.cdiv(tokens, tiles.block_n), heads)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, seq_ids, cos, sin, offsets[1], offsets[2],
        tokens, window, scale_log2, scale,
        *strides, *out_strides, *out_strides, cos.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=dim, ROTARY=rotation is not None,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    tiles = BACKWARD_DQ
    launcher(_window_bwd_dq, traced)[(triton.cdiv(tokens, tiles.block_m), heads)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens, seq_ids, cos, sin, offsets[0],
        tokens, window, scale_log2, scale,
        *strides, *out_strides, cos.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=dim, ROTARY=rotation is not None,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return [grad_qkv] if rotation is not None else [dq, dk, dv]


@torch.library.triton_op("mbert_retrieval::window_attention_bwd", mutates_args=())
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
    return tuple(_backward_kernels(grad_out, q, k, v, out, lse, cu_seqlens, seq_ids, window, traced=True))


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


class _EagerWindowAttention(torch.autograd.Function):
    """The same kernels without the operator around them. Run eagerly with gradients, the operator
    takes 111 us of host time per forward call against 59 us for this Function (one H200,
    benchmarks/results/launch_overhead.json): its autograd wrapper costs more than the launch."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, seq_ids, window):
        out, lse = _forward(q, k, v, cu_seqlens, seq_ids, window)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seq_ids)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, seq_ids = ctx.saved_tensors
        dq, dk, dv = _backward_kernels(grad_out, q, k, v, out, lse, cu_seqlens, seq_ids, ctx.window)
        return dq, dk, dv, None, None, None


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
    if torch.compiler.is_compiling():
        return window_attention_fwd(q, k, v, cu_seqlens, seq_ids, window)[0]
    if not records_gradients(q, k, v):
        return _forward(q, k, v, cu_seqlens, seq_ids, window)[0]
    return _EagerWindowAttention.apply(q, k, v, cu_seqlens, seq_ids, window)


# The same with q and k rotated inside the kernels, taking the projection qkv [N, 3, heads, dim] whole
# and giving back its gradient whole.
@torch.library.triton_op("mbert_retrieval::window_attention_rotary_fwd", mutates_args=())
def window_attention_rotary_fwd(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_ids: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = qkv.unbind(1)
    return _forward(q, k, v, cu_seqlens, seq_ids, window, traced=True, rotation=(cos, sin))


@torch.library.triton_op("mbert_retrieval::window_attention_rotary_bwd", mutates_args=())
def window_attention_rotary_bwd(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_ids: torch.Tensor,
    window: int,
) -> torch.Tensor:
    q, k, v = qkv.unbind(1)
    rotation = (cos, sin)
    return _backward_kernels(grad_out, q, k, v, out, lse, cu_seqlens, seq_ids, window, True, rotation)[0]


def _setup_rotary_context(ctx, inputs, output):
    qkv, cos, sin, cu_seqlens, seq_ids, window = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cos, sin, cu_seqlens, seq_ids)
    ctx.window = window
    ctx.mark_non_differentiable(lse)


def _rotary_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse, cos, sin, cu_seqlens, seq_ids = ctx.saved_tensors
    grad_qkv = window_attention_rotary_bwd(grad_out, qkv, out, lse, cos, sin, cu_seqlens, seq_ids, ctx.window)
    return grad_qkv, None, None, None, None, None


window_attention_rotary_fwd.register_autograd(_rotary_backward, setup_context=_setup_rotary_context)


class _EagerRotaryWindowAttention(torch.autograd.Function):
    """`window_attention_rotary` run eagerly: the kernels without the operator (less host time)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, cu_seqlens, seq_ids, window):
        q, k, v = qkv.unbind(1)
        out, lse = _forward(q, k, v, cu_seqlens, seq_ids, window, rotation=(cos, sin))
        ctx.save_for_backward(qkv, out, lse, cos, sin, cu_seqlens, seq_ids)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse, cos, sin, cu_seqlens, seq_ids = ctx.saved_tensors
        q, k, v = qkv.unbind(1)
        grad_qkv = _backward_kernels(
            grad_out, q, k, v, out, lse, cu_seqlens, seq_ids, ctx.window, rotation=(cos, sin)
        )[0]
        return grad_qkv, None, None, None, None, None


def window_attention_rotary(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window: int,
    seq_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`window_attention` of q and k rotated by cos and sin (rotate-half) and v, all read from the
    projection qkv [N, 3, heads, dim]: the kernels rotate q and k as they load them (and the
    backward's dq and dk back as they store them into qkv's gradient), so no rotary pass runs
    either way. cos, sin: [N, ..., dim / 2] float32 per token."""
    tokens, parts, _, head_dim = qkv.shape
    if parts != 3 or head_dim % 2 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [tokens, 3, heads, even head_dim] with unit stride, got {qkv.shape}")
    cos, sin = cos.reshape(tokens, head_dim // 2), sin.reshape(tokens, head_dim // 2)
    if seq_ids is None:
        seq_ids = sequence_ids(cu_seqlens, tokens)
    if torch.compiler.is_compiling():
        return window_attention_rotary_fwd(qkv, cos, sin, cu_seqlens, seq_ids, window)[0]
    if not records_gradients(qkv, cos, sin):
        return _forward(*qkv.unbind(1), cu_seqlens, seq_ids, window, rotation=(cos, sin))[0]
    return _EagerRotaryWindowAttention.apply(qkv, cos, sin, cu_seqlens, seq_ids, window)
