"""The rotary embedding of q and k, and GeGLU, as one Triton kernel each way (forward, backward).

Eager PyTorch runs `apply_rotary` on the Wqkv projection as about ten kernels forward and twenty
backward (float casts, halves, products, the concatenation, and the gradients of the slices taken
out of the projection), and GeGLU as two forward and four backward. On a GPU whose step is bound by
the host's kernel launches (two GPUs sharing a global batch: benchmarks/NOTES.md), every launch
saved is time saved. The arithmetic is the reference's: float32 inside, rounded where it rounds.

Used by the model's eager CUDA path (the "triton" attention backend), and as operators inside
torch.compile'd training graphs, where they beat inductor's fusion of the plain code in the backward;
compiled inference runs inductor's fusion. On a CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1, set before import), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mbert_retrieval.modeling.attention import records_gradients

# Launch shapes. The forwards': the fastest in benchmarks/elementwise_kernel_sweep.py on an H200
# (run 46: rotary 39.1 against 44.5 us, GeGLU 30.9 against 33.7 us for 16 k tokens); the backwards'
# were not swept and keep the shapes training was measured with.
ROTARY_TOKENS = 4  # tokens per program; each program covers all heads of q, k and v
ROTARY_BACKWARD_TOKENS = 16
ROTARY_WARPS = 4
GEGLU_ELEMENTS = 2048  # per program
GEGLU_BACKWARD_ELEMENTS = 4096
GEGLU_WARPS = 4


def launcher(kernel, traced: bool):
    """The kernel itself for eager calls; wrapped for the operators, so that torch.compile sees the
    launch and inductor makes it from its own generated code (no Python operator call per launch)."""
    return torch.library.wrap_triton(kernel) if traced else kernel


def unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the kernels read it: unit stride along the last dim (copied only if needed)."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


# -- rotary ------------------------------------------------------------------------------------------


@triton.jit
def _tile(tokens, n_tokens, part, s_t, s_p, s_h, SPAN: tl.constexpr, COLS: tl.constexpr, width):
    """Offsets into part `part` of a [N, 3, heads, dim] tensor for a tile of `tokens` x COLS columns
    that run over the heads, SPAN elements of each (head_dim, or its first half); the tile's mask;
    each column's index within its head."""
    cols = tl.arange(0, COLS)
    head, within = cols // SPAN, cols % SPAN
    offsets = tokens[:, None] * s_t + part * s_p + head[None, :] * s_h + within[None, :]
    return offsets, (tokens[:, None] < n_tokens) & (cols[None, :] < width), within


@triton.jit
def _rotate(
    SRC, DST, COS, SIN, tokens, rows, n_tokens,
    ss_t, ss_p, ss_h, sd_t, sd_p, sd_h, sc_t,
    part: tl.constexpr, direction: tl.constexpr, HALF: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """Rotate part `part` (0: q, 1: k) of SRC into DST; direction -1 rotates back (the gradient)."""
    src, ok, j = _tile(tokens, n_tokens, part, ss_t, ss_p, ss_h, HALF, COLS, rows)
    dst, _, _ = _tile(tokens, n_tokens, part, sd_t, sd_p, sd_h, HALF, COLS, rows)
    cos = tl.load(COS + tokens[:, None] * sc_t + j[None, :], mask=ok, other=0.0)
    sin = tl.load(SIN + tokens[:, None] * sc_t + j[None, :], mask=ok, other=0.0) * direction
    x1 = tl.load(SRC + src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(SRC + src + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(DST + dst, (x1 * cos - x2 * sin).to(DST.dtype.element_ty), mask=ok)
    tl.store(DST + dst + HALF, (x2 * cos + x1 * sin).to(DST.dtype.element_ty), mask=ok)


@triton.jit
def _copy_part(
    SRC, DST, tokens, n_tokens, ss_t, ss_p, ss_h, sd_t, sd_p, sd_h,
    part: tl.constexpr, HEAD_DIM: tl.constexpr, COLS: tl.constexpr, width,
):  # fmt: skip
    src, ok, _ = _tile(tokens, n_tokens, part, ss_t, ss_p, ss_h, HEAD_DIM, COLS, width)
    dst, _, _ = _tile(tokens, n_tokens, part, sd_t, sd_p, sd_h, HEAD_DIM, COLS, width)
    tl.store(DST + dst, tl.load(SRC + src, mask=ok, other=0.0).to(DST.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_parts(
    QS, KS, VS, QD, KD, VD, COS, SIN, n_tokens, heads,
    sqs_t, sqs_p, sqs_h, sks_t, sks_p, sks_h, svs_t, svs_p, svs_h,
    sqd_t, sqd_p, sqd_h, skd_t, skd_p, skd_h, svd_t, svd_p, svd_h, sc_t,
    direction: tl.constexpr, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF_COLS: tl.constexpr, COLS: tl.constexpr, COPY_V: tl.constexpr = True,
):  # fmt: skip
    """One block of tokens: q and k rotated and v copied from QS, KS, VS to QD, KD, VD. q, k and v are
    parts 0, 1 and 2: of one [N, 3, heads, dim] tensor (its part stride) or tensors of their own
    (part stride 0). The forward and the backward differ only in the rotation's sign."""
    tokens = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)  # int64: N x stride can pass 2**31
    half: tl.constexpr = HEAD_DIM // 2
    rows = heads * half
    _rotate(QS, QD, COS, SIN, tokens, rows, n_tokens, sqs_t, sqs_p, sqs_h, sqd_t, sqd_p, sqd_h, sc_t,
            0, direction, half, HALF_COLS)  # fmt: skip
    _rotate(KS, KD, COS, SIN, tokens, rows, n_tokens, sks_t, sks_p, sks_h, skd_t, skd_p, skd_h, sc_t,
            1, direction, half, HALF_COLS)  # fmt: skip
    if COPY_V:
        _copy_part(VS, VD, tokens, n_tokens, svs_t, svs_p, svs_h, svd_t, svd_p, svd_h,
                   2, HEAD_DIM, COLS, heads * HEAD_DIM)  # fmt: skip


@triton.jit
def _rotary_fwd(
    QKV, QD, KD, VD, COS, SIN, n_tokens, heads, s_t, s_p, s_h,
    sqd_t, sqd_h, skd_t, skd_h, svd_t, svd_h, sc_t,
    TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_COLS: tl.constexpr, COLS: tl.constexpr,
    COPY_V: tl.constexpr,
):  # fmt: skip
    """qkv [N, 3, heads, dim] to q and k rotated, each [N, heads, dim] of its own, and v copied into a
    third unless COPY_V is off."""
    _rotary_parts(QKV, QKV, QKV, QD, KD, VD, COS, SIN, n_tokens, heads,
                  s_t, s_p, s_h, s_t, s_p, s_h, s_t, s_p, s_h,
                  sqd_t, 0, sqd_h, skd_t, 0, skd_h, svd_t, 0, svd_h, sc_t,
                  1, TOKENS, HEAD_DIM, HALF_COLS, COLS, COPY_V)  # fmt: skip


@triton.jit
def _rotary_bwd(
    GQ, GK, GV, GRAD_QKV, COS, SIN, n_tokens, heads,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, s_t, s_p, s_h, sc_t,
    TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_COLS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """q's, k's and v's gradients [N, heads, dim] to qkv's [N, 3, heads, dim]: rotated back, copied.
    One output tensor, not three views of it: inside a compiled graph, a kernel that writes views
    makes inductor copy each written view back into its base (three extra passes per layer)."""
    _rotary_parts(GQ, GK, GV, GRAD_QKV, GRAD_QKV, GRAD_QKV, COS, SIN, n_tokens, heads,
                  sq_t, 0, sq_h, sk_t, 0, sk_h, sv_t, 0, sv_h,
                  s_t, s_p, s_h, s_t, s_p, s_h, s_t, s_p, s_h, sc_t,
                  -1, TOKENS, HEAD_DIM, HALF_COLS, COLS)  # fmt: skip


def _rotary_shape(heads: int, head_dim: int, tokens: int | None = None) -> dict:
    return dict(
        TOKENS=tokens or ROTARY_TOKENS,
        HEAD_DIM=head_dim,
        HALF_COLS=triton.next_power_of_2(heads * head_dim // 2),
        COLS=triton.next_power_of_2(heads * head_dim),
    )


def _rotary_forward(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, traced: bool = False, copy_v: bool = True
) -> list[torch.Tensor]:
    """q, k rotated and v, each [N, heads, dim] in a buffer of its own; without `copy_v`, v is the
    view qkv[:, 2] (for calls without gradients, whose consumers read strided v)."""
    tokens, _, heads, head_dim = qkv.shape
    q, k = (qkv.new_empty(tokens, heads, head_dim) for _ in range(2))
    v = qkv.new_empty(tokens, heads, head_dim) if copy_v else qkv[:, 2]
    launcher(_rotary_fwd, traced)[(triton.cdiv(tokens, ROTARY_TOKENS),)](
        qkv, q, k, v, cos, sin, tokens, heads, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        *(stride for t in (q, k, v) for stride in (t.stride(0), t.stride(1))), cos.stride(0),
        **_rotary_shape(heads, head_dim), COPY_V=copy_v, num_warps=ROTARY_WARPS,
    )  # fmt: skip
    return [q, k, v]


def _rotary_backward(
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    traced: bool = False,
) -> torch.Tensor:
    """The gradient of qkv [N, 3, heads, dim] in one pass: q's and k's rotated back, v's copied."""
    tokens, heads, head_dim = grad_q.shape
    grad_qkv = grad_q.new_empty(tokens, 3, heads, head_dim)
    launcher(_rotary_bwd, traced)[(triton.cdiv(tokens, ROTARY_BACKWARD_TOKENS),)](
        grad_q, grad_k, grad_v, grad_qkv, cos, sin, tokens, heads,
        *(stride for t in (grad_q, grad_k, grad_v) for stride in (t.stride(0), t.stride(1))),
        grad_qkv.stride(0), grad_qkv.stride(1), grad_qkv.stride(2), cos.stride(0),
        **_rotary_shape(heads, head_dim, ROTARY_BACKWARD_TOKENS),
    )  # fmt: skip
    return grad_qkv


class _RotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin):
        ctx.save_for_backward(cos, sin)
        return tuple(_rotary_forward(qkv, cos, sin))

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        grads = _dense_grads((grad_q, grad_k, grad_v))
        return _rotary_backward(*grads, *ctx.saved_tensors), None, None


# The same kernels as operators for torch.compile; inductor launches them from its generated code.
# Its own code for the backward takes two passes of ~50 us each per layer at 16k tokens on an H200
# (benchmarks/NOTES.md, run 12's training profile), this one pass.
@torch.library.triton_op("mbert_retrieval::rotary_qkv_fwd", mutates_args=())
def rotary_forward_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
    return _rotary_forward(qkv, cos, sin, traced=True)


@torch.library.triton_op("mbert_retrieval::rotary_qkv_bwd", mutates_args=())
def rotary_backward_op(
    grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    return _rotary_backward(grad_q, grad_k, grad_v, cos, sin, traced=True)


def _save_rotation(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _rotary_op_backward(ctx, grads):
    return rotary_backward_op(*_dense_grads(grads), *ctx.saved_tensors), None, None


rotary_forward_op.register_autograd(_rotary_op_backward, setup_context=_save_rotation)


def _dense_grads(grads) -> list[torch.Tensor]:
    """q's, k's and v's gradients as the kernels read them: unit stride along the last dim (a sum's
    gradient comes expanded, stride 0), and a missing one (an output that nothing used) as zeros."""
    like = next(g for g in grads if g is not None)
    dense = []
    for grad in grads:
        if grad is None:
            grad = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        dense.append(unit_stride(grad))
    return dense


def rotary_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k rotated (rotate-half, float32 arithmetic like `encoder.apply_rotary`) and v, from the
    projection qkv [N, 3, heads, head_dim]; cos, sin [N, ..., head_dim / 2] float32 per token."""
    tokens, parts, _, head_dim = qkv.shape
    if parts != 3 or head_dim % 2 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [tokens, 3, heads, even head_dim] with unit stride, got {qkv.shape}")
    cos, sin = cos.reshape(tokens, head_dim // 2), sin.reshape(tokens, head_dim // 2)
    if torch.compiler.is_compiling():  # an operator inductor calls, not an autograd.Function to trace
        return tuple(rotary_forward_op(qkv, cos, sin))
    if not records_gradients(qkv, cos, sin):  # v stays a view: one copy less
        return tuple(_rotary_forward(qkv, cos, sin, copy_v=False))
    return _RotaryQKV.apply(qkv, cos, sin)


# -- GeGLU -------------------------------------------------------------------------------------------


@triton.jit
def _gelu_and_slope(a):
    """GELU (exact, erf) of float32 `a` and its derivative."""
    cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))  # 1 / sqrt(2)
    density = tl.exp(-0.5 * a * a) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return a * cdf, cdf + a * density


@triton.jit
def _load_halves(H, n_tokens, width, sh_t, TOKENS: tl.constexpr, COLS: tl.constexpr):
    """This program's tile: its tokens and columns, the mask, and both halves of H there (float32)."""
    tokens = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)  # int64: N x stride can pass 2**31
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    ok = (tokens[:, None] < n_tokens) & (cols[None, :] < width)
    inputs = H + tokens[:, None] * sh_t + cols[None, :]
    a = tl.load(inputs, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(inputs + width, mask=ok, other=0.0).to(tl.float32)
    return tokens, cols, ok, a, gate


@triton.jit
def _geglu_fwd(H, OUT, n_tokens, width, sh_t, so_t, TOKENS: tl.constexpr, COLS: tl.constexpr):
    tokens, cols, ok, a, gate = _load_halves(H, n_tokens, width, sh_t, TOKENS, COLS)
    gelu, _ = _gelu_and_slope(a)
    # Rounded as eager PyTorch rounds: GELU's output in the input's dtype, then the product.
    gelu = gelu.to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + tokens[:, None] * so_t + cols[None, :], (gelu * gate).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _geglu_bwd(
    H, GRAD, DH, n_tokens, width, sh_t, sg_t, sd_t, TOKENS: tl.constexpr, COLS: tl.constexpr
):  # fmt: skip
    tokens, cols, ok, a, gate = _load_halves(H, n_tokens, width, sh_t, TOKENS, COLS)
    grad = tl.load(GRAD + tokens[:, None] * sg_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gelu, slope = _gelu_and_slope(a)
    gelu = gelu.to(DH.dtype.element_ty).to(tl.float32)
    grad_gelu = (grad * gate).to(DH.dtype.element_ty).to(tl.float32)
    grads = DH + tokens[:, None] * sd_t + cols[None, :]
    tl.store(grads, (grad_gelu * slope).to(DH.dtype.element_ty), mask=ok)
    tl.store(grads + width, (grad * gelu).to(DH.dtype.element_ty), mask=ok)


def _geglu_tiles(tokens: int, width: int, elements: int | None = None) -> tuple[tuple[int, int], int, int]:
    """Grid, tokens and columns per program. Masked lanes still compute GELU (erf, exp), so the
    columns per program divide the width where a power of two up to 256 does (1152 = 9 x 128)."""
    cols = next((c for c in (256, 128, 64) if width % c == 0), min(256, triton.next_power_of_2(width)))
    rows = (elements or GEGLU_ELEMENTS) // cols
    return (triton.cdiv(tokens, rows), triton.cdiv(width, cols)), rows, cols


def _geglu_forward(hidden: torch.Tensor, traced: bool = False) -> torch.Tensor:
    tokens, width = hidden.shape[0], hidden.shape[1] // 2
    out = hidden.new_empty(tokens, width)
    grid, rows, cols = _geglu_tiles(tokens, width)
    launcher(_geglu_fwd, traced)[grid](
        hidden, out, tokens, width, hidden.stride(0), out.stride(0), rows, cols, num_warps=GEGLU_WARPS
    )
    return out


def _geglu_backward(hidden: torch.Tensor, grad: torch.Tensor, traced: bool = False) -> torch.Tensor:
    grad = grad.contiguous()
    tokens, width = grad.shape
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    grid, rows, cols = _geglu_tiles(tokens, width, GEGLU_BACKWARD_ELEMENTS)
    launcher(_geglu_bwd, traced)[grid](
        hidden, grad, grad_hidden, tokens, width,
        hidden.stride(0), grad.stride(0), grad_hidden.stride(0), rows, cols,
    )  # fmt: skip
    return grad_hidden


class _GeGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden):
        ctx.save_for_backward(hidden)
        return _geglu_forward(hidden)

    @staticmethod
    def backward(ctx, grad):
        (hidden,) = ctx.saved_tensors
        return _geglu_backward(hidden, grad)


# The same kernels as operators for torch.compile; inductor launches them from its generated code.
# Its own GeGLU backward writes the [N, 2 * width] gradient one element at a time and computes both
# halves' GELU (erf, exp) for every element: 132 us per layer at 16k tokens on an H200
# (benchmarks/NOTES.md, run 12).
@torch.library.triton_op("mbert_retrieval::geglu_fwd", mutates_args=())
def geglu_forward_op(hidden: torch.Tensor) -> torch.Tensor:
    return _geglu_forward(hidden, traced=True)


@torch.library.triton_op("mbert_retrieval::geglu_bwd", mutates_args=())
def geglu_backward_op(hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return _geglu_backward(hidden, grad, traced=True)


def _save_geglu_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _geglu_op_backward(ctx, grad):
    return geglu_backward_op(ctx.saved_tensors[0], grad)


geglu_forward_op.register_autograd(_geglu_op_backward, setup_context=_save_geglu_input)


def geglu(hidden: torch.Tensor) -> torch.Tensor:
    """gelu(first half) * second half of hidden [N, 2 * width] (exact GELU), as `GeGLU` computes it."""
    if hidden.dim() != 2 or hidden.shape[1] % 2:
        raise ValueError(f"geglu needs [tokens, 2 * width], got {tuple(hidden.shape)}")
    hidden = hidden.contiguous()
    if torch.compiler.is_compiling():  # an operator inductor calls, not an autograd.Function to trace
        return geglu_forward_op(hidden)
    if not records_gradients(hidden):
        return _geglu_forward(hidden)
    return _GeGLU.apply(hidden)
