"""The residual sum and the LayerNorm that reads it (no bias), as one Triton kernel each way.

Every layer does `x = x + update; normed = layer_norm(x)` twice. Eager PyTorch runs the sum and the
norm as two kernels, and its backward as two more plus the gradient's accumulation. Under
torch.compile inductor fuses the forward already; its backward, in the profile of a short training
step on an H200 (benchmarks/NOTES.md, run 12), leaves one extra reduction per norm for the weight's
gradient (45 a step, 19 us each). Here each backward program sums its own rows' share of the
weight's gradient as it goes and writes one partial row; a small sum over the programs finishes it.

Used inside torch.compile'd training graphs of the triton backend (`encoder.uses_fused_norm`), and
its forward kernel alone in eager inference; eager PyTorch's own LayerNorm backward has no such extra
pass. Arithmetic in float32, rounded where eager
PyTorch rounds: the sum in its dtype, the norm's output in the sum's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mbert_retrieval.modeling.attention import records_gradients
from mbert_retrieval.modeling.fused_elementwise import launcher, unit_stride


@dataclass(frozen=True)
class Launch:
    """A kernel's launch shape: rows per step, rows per program (the backward writes one partial row
    of the weight's gradient per program; the forward takes one step), warps."""

    rows: int
    rows_per_program: int
    warps: int = 4


# benchmarks/norm_kernel_sweep.py times other shapes against inductor's kernels.
FORWARD = Launch(rows=4, rows_per_program=4)
BACKWARD = Launch(rows=4, rows_per_program=64)


# Widths and eps are constexpr: inductor passes a float argument of a triton_op's kernel as fp64.
@triton.jit
def _add_norm_fwd(
    X, U, W, SUM, OUT, MEAN, RSTD, n_tokens, sx, su, ss, so,
    WIDTH: tl.constexpr, EPS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_tokens
    ok = row_ok[:, None] & (cols[None, :] < WIDTH)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * su + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    total = (x + u).to(SUM.dtype.element_ty)
    tl.store(SUM + rows[:, None] * ss + cols[None, :], total, mask=ok)
    total = total.to(tl.float32)
    mean = tl.sum(total, 1) / WIDTH
    centred = tl.where(ok, total - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / WIDTH + EPS)
    weight = tl.load(W + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
    normed = centred * rstd[:, None] * weight[None, :]
    tl.store(OUT + rows[:, None] * so + cols[None, :], normed.to(OUT.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _add_norm_bwd(
    SUM, GRAD_OUT, GRAD_SUM, W, MEAN, RSTD, GRAD_X, PARTIAL_W, n_tokens, ss, sgo, sgs, sgx,
    WIDTH: tl.constexpr, HAS_GRAD_SUM: tl.constexpr, ROWS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK)
    col_ok = cols < WIDTH
    weight = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK], tl.float32)
    first = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM
    for step in range(0, ROWS_PER_PROGRAM, ROWS):
        rows = first + step + tl.arange(0, ROWS)
        row_ok = rows < n_tokens
        ok = row_ok[:, None] & col_ok[None, :]
        total = tl.load(SUM + rows[:, None] * ss + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(ok, (total - mean[:, None]) * rstd[:, None], 0.0)
        grad_out = tl.load(GRAD_OUT + rows[:, None] * sgo + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        grad_hat = grad_out * weight[None, :]
        mean_grad = tl.sum(grad_hat, 1) / WIDTH
        mean_grad_x_hat = tl.sum(grad_hat * x_hat, 1) / WIDTH
        grad = (grad_hat - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None]) * rstd[:, None]
        if HAS_GRAD_SUM:  # the sum's own gradient (the next residual's), added as autograd adds it
            grad = grad.to(GRAD_X.dtype.element_ty).to(tl.float32)
            grad += tl.load(GRAD_SUM + rows[:, None] * sgs + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(GRAD_X + rows[:, None] * sgx + cols[None, :], grad.to(GRAD_X.dtype.element_ty), mask=ok)
        grad_weight += tl.sum(grad_out * x_hat, 0)
    tl.store(PARTIAL_W + tl.program_id(0) * BLOCK + cols, grad_weight, mask=col_ok)


def _add_norm_forward(
    x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float, traced: bool = False
) -> list[torch.Tensor]:
    x, update = unit_stride(x), unit_stride(update)
    tokens, width = x.shape
    dtype = torch.promote_types(x.dtype, update.dtype)
    total, normed = x.new_empty(tokens, width, dtype=dtype), x.new_empty(tokens, width, dtype=dtype)
    mean, rstd = (x.new_empty(tokens, dtype=torch.float32) for _ in range(2))
    launch = FORWARD
    launcher(_add_norm_fwd, traced)[(triton.cdiv(tokens, launch.rows),)](
        x, update, weight, total, normed, mean, rstd, tokens,
        x.stride(0), update.stride(0), total.stride(0), normed.stride(0),
        WIDTH=width, EPS=eps, ROWS=launch.rows, BLOCK=triton.next_power_of_2(width),
        num_warps=launch.warps,
    )  # fmt: skip
    return [total, normed, mean, rstd]


def _add_norm_backward(
    total: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_normed: torch.Tensor,
    grad_total: torch.Tensor | None,
    traced: bool = False,
) -> list[torch.Tensor]:
    """The sum's whole gradient (through the norm, plus its own if any) and the weight's."""
    grad_normed = unit_stride(grad_normed)
    tokens, width = total.shape
    block = triton.next_power_of_2(width)
    launch = BACKWARD
    programs = triton.cdiv(tokens, launch.rows_per_program)
    grad_x = torch.empty_like(total, memory_format=torch.contiguous_format)
    partial = total.new_empty(programs, block, dtype=torch.float32)
    has_grad_total = grad_total is not None
    grad_total = unit_stride(grad_total) if has_grad_total else grad_normed  # not read without its flag
    launcher(_add_norm_bwd, traced)[(programs,)](
        total, grad_normed, grad_total, weight, mean, rstd, grad_x, partial, tokens,
        total.stride(0), grad_normed.stride(0), grad_total.stride(0), grad_x.stride(0),
        WIDTH=width, HAS_GRAD_SUM=has_grad_total, ROWS=launch.rows, ROWS_PER_PROGRAM=launch.rows_per_program,
        BLOCK=block, num_warps=launch.warps,
    )  # fmt: skip
    return [grad_x, partial[:, :width].sum(0).to(weight.dtype)]


# Operators, so that inductor launches the kernels from its generated code; called eagerly they run
# the same kernels.
@torch.library.triton_op("mbert_retrieval::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_forward_op(
    x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float
) -> list[torch.Tensor]:
    return _add_norm_forward(x, update, weight, eps, traced=True)


@torch.library.triton_op("mbert_retrieval::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_backward_op(
    total: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_normed: torch.Tensor,
    grad_total: torch.Tensor | None,
) -> list[torch.Tensor]:
    return _add_norm_backward(total, weight, mean, rstd, grad_normed, grad_total, traced=True)


def _save_for_norm_backward(ctx, inputs, output):
    x, update, weight, _ = inputs
    total, _, mean, rstd = output
    ctx.save_for_backward(total, weight, mean, rstd)
    ctx.input_dtypes = (x.dtype, update.dtype)


def _add_norm_op_backward(ctx, grads):
    grad_total, grad_normed = grads[0], grads[1]
    if grad_normed is None:  # the norm's output unused: only the sum's own gradient flows back
        grad_normed = torch.zeros_like(ctx.saved_tensors[0])
    grad, grad_weight = add_layer_norm_backward_op(*ctx.saved_tensors, grad_normed, grad_total)
    return grad.to(ctx.input_dtypes[0]), grad.to(ctx.input_dtypes[1]), grad_weight, None


add_layer_norm_forward_op.register_autograd(_add_norm_op_backward, setup_context=_save_for_norm_backward)


def add_layer_norm(
    x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`total = x + update` and `layer_norm(total, weight, eps)` (no bias) over the last dimension of
    [tokens, width] inputs; the sum in the promoted dtype of both, as `x + update` gives it."""
    if x.dim() != 2 or x.shape != update.shape or weight.shape != x.shape[1:]:
        raise ValueError(
            f"add_layer_norm needs x and update [tokens, width] and weight [width], got "
            f"{tuple(x.shape)}, {tuple(update.shape)}, {tuple(weight.shape)}"
        )
    if not torch.compiler.is_compiling() and not records_gradients(x, update, weight):
        total, normed, _, _ = _add_norm_forward(x, update, weight, eps)  # no operator: less host time
        return total, normed
    total, normed, _, _ = add_layer_norm_forward_op(x, update, weight, eps)
    return total, normed
