"""The rotary embedding of q and k, and GeGLU, as one Triton kernel each way (forward, backward).

Eager PyTorch runs `apply_rotary` on the Wqkv projection as about ten kernels forward and twenty
backward (float casts, halves, products, the concatenation, and the gradients of the slices taken
out of the projection), and GeGLU as two forward and four backward. On a GPU whose step is bound by
the host's kernel launches (two GPUs sharing a global batch: benchmarks/NOTES.md), every launch
saved is time saved. The arithmetic is the reference's: float32 inside, rounded where it rounds.

Used by the model's eager CUDA path (the "triton" attention backend); under `torch.compile`
inductor fuses the plain code by itself. On a CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1, set before import), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROTARY_TOKENS = 16  # tokens per program; each program covers all heads of q, k and v
GEGLU_ELEMENTS = 4096  # per program


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
def _rotary_kernel(
    SRC, DST, COS, SIN, n_tokens, heads,
    ss_t, ss_p, ss_h, sd_t, sd_p, sd_h, sc_t,
    direction: tl.constexpr, COPY_V: tl.constexpr, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF_COLS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """One block of tokens: q and k rotated (and v copied when COPY_V) from SRC [N, 3, heads, dim]
    (any strides but unit along dim) to DST. The forward and the backward differ only in the
    rotation's sign."""
    tokens = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)  # int64: N x stride can pass 2**31
    half: tl.constexpr = HEAD_DIM // 2
    rows = heads * half
    for part in tl.static_range(2):
        _rotate(SRC, DST, COS, SIN, tokens, rows, n_tokens, ss_t, ss_p, ss_h, sd_t, sd_p, sd_h, sc_t,
                part, direction, half, HALF_COLS)  # fmt: skip
    if COPY_V:
        _copy_part(SRC, DST, tokens, n_tokens, ss_t, ss_p, ss_h, sd_t, sd_p, sd_h,
                   2, HEAD_DIM, COLS, heads * HEAD_DIM)  # fmt: skip


def _run_rotary(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, direction: int):
    tokens, _, heads, head_dim = src.shape
    grid = (triton.cdiv(tokens, ROTARY_TOKENS),)
    _rotary_kernel[grid](
        src, dst, cos, sin, tokens, heads,
        src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1), dst.stride(2),
        cos.stride(0), direction=direction, COPY_V=src is not dst, TOKENS=ROTARY_TOKENS, HEAD_DIM=head_dim,
        HALF_COLS=triton.next_power_of_2(heads * head_dim // 2),
        COLS=triton.next_power_of_2(heads * head_dim),
    )  # fmt: skip


class _RotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin):
        out = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        _run_rotary(qkv, out, cos, sin, direction=1)
        ctx.save_for_backward(cos, sin)
        return out.unbind(1)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        grads = torch.stack([_dense(g, grad_q, grad_k, grad_v) for g in (grad_q, grad_k, grad_v)], dim=1)
        # In place: each program reads a token's halves before it writes them; v's gradient stays.
        _run_rotary(grads, grads, cos, sin, direction=-1)
        return grads, None, None


def _dense(grad: torch.Tensor | None, *like: torch.Tensor | None) -> torch.Tensor:
    """A missing gradient (an output that nothing used) as zeros."""
    if grad is not None:
        return grad
    shape_of = next(g for g in like if g is not None)
    return torch.zeros_like(shape_of)


def rotary_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k rotated (rotate-half, float32 arithmetic like `encoder.apply_rotary`) and v, from the
    projection qkv [N, 3, heads, head_dim]; cos, sin [N, ..., head_dim / 2] float32 per token."""
    tokens, parts, _, head_dim = qkv.shape
    if parts != 3 or head_dim % 2 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [tokens, 3, heads, even head_dim] with unit stride, got {qkv.shape}")
    cos, sin = cos.reshape(tokens, head_dim // 2), sin.reshape(tokens, head_dim // 2)
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


def _geglu_tiles(tokens: int, width: int) -> tuple[tuple[int, int], int, int]:
    """Grid, tokens and columns per program. Masked lanes still compute GELU (erf, exp), so the
    columns per program divide the width where a power of two up to 256 does (1152 = 9 x 128)."""
    cols = next((c for c in (256, 128, 64) if width % c == 0), min(256, triton.next_power_of_2(width)))
    rows = GEGLU_ELEMENTS // cols
    return (triton.cdiv(tokens, rows), triton.cdiv(width, cols)), rows, cols


def _geglu_forward(hidden: torch.Tensor) -> torch.Tensor:
    tokens, width = hidden.shape[0], hidden.shape[1] // 2
    out = hidden.new_empty(tokens, width)
    grid, rows, cols = _geglu_tiles(tokens, width)
    _geglu_fwd[grid](hidden, out, tokens, width, hidden.stride(0), out.stride(0), rows, cols)
    return out


def _geglu_backward(hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    grad = grad.contiguous()
    tokens, width = grad.shape
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    grid, rows, cols = _geglu_tiles(tokens, width)
    _geglu_bwd[grid](
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


# The same kernels as operators that torch.compile calls as they are. Inductor's own GeGLU backward
# writes the [N, 2 * width] gradient one element at a time and computes both halves' GELU (erf, exp)
# for every element: 132 us per layer at 16k tokens on an H200 (benchmarks/NOTES.md, run 12).
geglu_forward_op = torch.library.custom_op("mbert_retrieval::geglu_fwd", mutates_args=())(_geglu_forward)
geglu_backward_op = torch.library.custom_op("mbert_retrieval::geglu_bwd", mutates_args=())(_geglu_backward)


@geglu_forward_op.register_fake
def _(hidden):
    return hidden.new_empty(hidden.shape[0], hidden.shape[1] // 2)


@geglu_backward_op.register_fake
def _(hidden, grad):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


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
    return _GeGLU.apply(hidden)
