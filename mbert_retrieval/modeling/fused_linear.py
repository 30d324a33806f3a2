"""Inference projections that finish their elementwise follow-up before they store (Triton).

Two of each layer's four GEMMs are followed by an elementwise pass over their whole output: Wqkv by
the rotary embedding of q and k, Wi by GELU(input half) * gate half. Each pass reads and writes the
projection once more ([N, 3H] and [N, 2I], 30-35 us per layer on a 16k-token batch on an H200,
benchmarks/NOTES.md). Here the GEMM applies them to its tile in registers and stores the result.

Both need two columns of the projection together: x[d] and x[d + head_dim / 2] for a rotation,
input[j] and gate[j] for GeGLU. So a tile takes the weight's rows in an interleaved order: tile
columns 2p and 2p + 1 are the pair p. The order is index arithmetic in the kernel (`_weight_rows`);
the weight itself is read where it lies, in its checkpoint layout.

Forward only: the model uses these kernels when nothing needs gradients (`can_fuse`); training
keeps cuBLAS plus the plain code (or, under torch.compile, inductor's kernels). On a CPU they run
under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROTARY, GEGLU = 0, 1  # the epilogues
_GEGLU = tl.constexpr(GEGLU)  # the same, as a global a compiled kernel may read
BLOCK_K = 64
CONFIGS = [  # Hopper-sized tiles; the autotuner picks per (N, K, epilogue) on the first call
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_stages=5, num_warps=4),
]
INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 2}  # small: the interpreter runs numpy


@triton.jit
def _weight_rows(cols, EPILOGUE: tl.constexpr, paired_cols, gate_offset, HALF: tl.constexpr):
    """The weight row that feeds each tile column: pair p = col // 2 takes member col % 2."""
    pair, member = cols // 2, cols % 2
    if EPILOGUE == _GEGLU:
        return pair + member * gate_offset  # input j, gate j
    head, within = pair // HALF, pair % HALF
    rotated = head * 2 * HALF + member * HALF + within  # x[d], x[d + HALF] of one head
    return tl.where(cols < paired_cols, rotated, cols)  # v: in order


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))  # exact GELU; 1 / sqrt(2)


@triton.jit
def _linear_kernel(
    X, W, OUT, COS, SIN, M, N, K, s_xm, s_wn, s_om, s_cm, paired_cols, gate_offset,
    EPILOGUE: tl.constexpr, HALF: tl.constexpr, EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """OUT = epilogue(X [M, K] @ W[rows]^T) for one BLOCK_M x BLOCK_N tile of the interleaved product.

    ROTARY: columns below `paired_cols` (q and k) are rotated with COS, SIN [M, HALF] and stored in
    the checkpoint's order; the rest (v) are stored as they are. GEGLU: OUT [M, N / 2] gets
    gelu(input) * gate.
    """
    # Programs walk GROUP_M row blocks down a column before moving on, so W's tiles stay in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_rows
    pid_n = (pid % (GROUP_M * blocks_n)) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M x stride can pass 2**31
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = _weight_rows(cols % N, EPILOGUE, paired_cols, gate_offset, HALF)
    ks = tl.arange(0, BLOCK_K)
    x_tile = X + (rows % M)[:, None] * s_xm + ks[None, :]  # rows past M re-read row r % M: no masks
    w_tile = W + w_rows[None, :].to(tl.int64) * s_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a, b = tl.load(x_tile), tl.load(w_tile)
        else:
            left = K - k * BLOCK_K
            a = tl.load(x_tile, mask=ks[None, :] < left, other=0.0)
            b = tl.load(w_tile, mask=ks[:, None] < left, other=0.0)
        if FP32_DOT:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_tile += BLOCK_K
        w_tile += BLOCK_K

    first, second = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # pair members
    pairs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    row_ok = (rows < M)[:, None]
    out_rows = OUT + rows[:, None] * s_om
    if EPILOGUE == _GEGLU:
        ok = row_ok & (pairs < N // 2)[None, :]
        tl.store(out_rows + pairs[None, :], (_gelu(first) * second).to(OUT.dtype.element_ty), mask=ok)
    else:
        rotate = (2 * pairs < paired_cols)[None, :]
        within = pairs % HALF
        angle = (rows % M)[:, None] * s_cm + within[None, :]
        cos = tl.load(COS + angle, mask=rotate, other=1.0)
        sin = tl.load(SIN + angle, mask=rotate, other=0.0)
        # Rotated pairs go back to x[d], x[d + HALF] of their head; v's pairs to columns 2p, 2p + 1.
        col_first = tl.where(rotate, ((pairs // HALF) * 2 * HALF + within)[None, :], 2 * pairs[None, :])
        col_second = tl.where(rotate, col_first + HALF, col_first + 1)
        ok = row_ok & (2 * pairs < N)[None, :]
        tl.store(out_rows + col_first, (first * cos - second * sin).to(OUT.dtype.element_ty), mask=ok)
        tl.store(out_rows + col_second, (second * cos + first * sin).to(OUT.dtype.element_ty), mask=ok)


_tuned_linear_kernel = triton.autotune(CONFIGS, key=["N", "K", "EPILOGUE"])(_linear_kernel)


def _launch(x, weight, out, cos, sin, epilogue: int, half: int, paired_cols: int, gate_offset: int) -> None:
    (m, k), n = x.shape, weight.shape[0]
    args = (x, weight, out, cos, sin, m, n, k, x.stride(0), weight.stride(0), out.stride(0), cos.stride(0))
    flags = dict(
        EPILOGUE=epilogue,
        HALF=half,
        EVEN_K=k % BLOCK_K == 0,
        FP32_DOT=x.dtype == torch.float32,
        BLOCK_K=BLOCK_K,
    )
    if x.is_cuda:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _tuned_linear_kernel[grid](*args, paired_cols, gate_offset, **flags)
    else:  # Triton's interpreter: one small tile shape, no autotuning
        tile = INTERPRETER_TILE
        grid = (triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"]),)
        _linear_kernel[grid](*args, paired_cols, gate_offset, **flags, **tile)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x [tokens, in] and weight [out, in] must agree, got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.stride(1) != 1 or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("x and weight need unit stride along their last dimension and one dtype")


@torch.library.custom_op("mbert_retrieval::rotary_projection", mutates_args=())
def rotary_projection(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """x [N, H] @ Wqkv^T with q and k rotated: [N, 3H] laid out as Wqkv's output, ready for attention.
    cos, sin [N, head_dim / 2] float32 per token (rotate-half convention, as `encoder.apply_rotary`)."""
    _check(x, weight)
    half = cos.shape[-1]
    if weight.shape[0] % 3 or (weight.shape[0] // 3) % (2 * half) or cos.shape != (x.shape[0], half):
        raise ValueError(
            f"Wqkv {tuple(weight.shape)} and cos {tuple(cos.shape)} do not fit heads of {2 * half}"
        )
    out = x.new_empty(x.shape[0], weight.shape[0])
    _launch(x, weight, out, cos.contiguous(), sin.contiguous(), ROTARY, half, 2 * weight.shape[0] // 3, 0)
    return out


@rotary_projection.register_fake
def _(x, weight, cos, sin):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("mbert_retrieval::geglu_projection", mutates_args=())
def geglu_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """gelu(x @ Wi[:I]^T) * (x @ Wi[I:]^T): [N, I] for Wi [2I, H] (exact GELU)."""
    _check(x, weight)
    if weight.shape[0] % 2:
        raise ValueError(
            f"Wi must have an even number of rows (input and gate halves), got {weight.shape[0]}"
        )
    width = weight.shape[0] // 2
    out = x.new_empty(x.shape[0], width)
    unused = x.new_empty(1, 1, dtype=torch.float32)  # no rotary tables for this epilogue
    _launch(x, weight, out, unused, unused, GEGLU, 1, 0, width)
    return out


@geglu_projection.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


def can_fuse(x: torch.Tensor, linear: torch.nn.Linear) -> bool:
    """Whether the fused forward can stand in for `linear` (+ epilogue) here: no bias, one half-precision
    dtype on CUDA, no autocast, and nothing that would need a gradient through it."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)
    return (
        linear.bias is None
        and x.dtype == linear.weight.dtype
        and x.dtype in (torch.float16, torch.bfloat16)
        and not torch.is_autocast_enabled(x.device.type)
        and not needs_grad
    )
