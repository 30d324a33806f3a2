"""Inference projections that apply their elementwise follow-up before they store (Triton, TMA).

Two of each layer's four GEMMs are followed by an elementwise pass over their whole output: Wi by
GELU(input half) * gate half, Wqkv by the rotary embedding of q and k. Each pass reads and writes the
projection once more (30-35 us per layer on a 16k-token batch on an H200, benchmarks/NOTES.md). Here
the GEMM applies it to the tile in registers and stores only the result.

- GeGLU: each program computes the same columns of the input half and of the gate half (two
  accumulators over one read of x) and stores gelu(input) * gate: [N, I] straight from x.
- Rotary: the two members of a rotation pair, x[d] and x[d + head_dim / 2], must sit in one tile.
  The kernel takes Wqkv with the rows of every q and k head interleaved (d, d + half, d + 1, ...,
  `interleave_rotary_rows`), so a pair is two neighbouring columns, and stores q and k in that
  interleaved order. Attention only takes dot products of q with k over the head dimension, which
  one permutation applied to both leaves unchanged; v keeps its order, so the attention output does.

Operands travel through the Hopper tensor memory accelerator (host-made `TensorDescriptor`s);
under Triton's interpreter (TRITON_INTERPRET=1) the same kernel runs on a CPU, which is how the
tests check it without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

PLAIN, GEGLU, ROTARY = 0, 1, 2  # the epilogues
_GEGLU, _ROTARY = tl.constexpr(GEGLU), tl.constexpr(ROTARY)  # the same, for compiled kernels


@dataclass(frozen=True)
class TileConfig:
    """One launch shape. `persistent`: one program per SM walks the tiles (else one per tile)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    stages: int = 4
    warps: int = 8
    persistent: bool = True


INTERPRETER_TILE = TileConfig(block_m=32, block_n=64, block_k=32, group_m=2, stages=1, warps=4)


@triton.jit
def _erf(x):
    """erf to 1.5e-7 (Abramowitz and Stegun 7.1.26): one exp and one division, no branches;
    far below bfloat16's rounding of the result, and cheaper than libdevice's erff."""
    z = tl.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    value = 1.0 - poly * tl.exp(-z * z)
    return tl.where(x < 0, -value, value)


@triton.jit
def _gelu(a, GELU_ERF: tl.constexpr):
    """Exact GELU, a * Phi(a). GELU_ERF: 0 libdevice's erf, 1 `_erf`, 2 none (a diagnostic)."""
    if GELU_ERF == 0:
        return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))  # 1 / sqrt(2)
    elif GELU_ERF == 1:
        return 0.5 * a * (1.0 + _erf(a * 0.7071067811865476))
    return a


@triton.jit
def _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Row and column block of `tile`: GROUP_M row blocks walk down a column block together, so the
    weight's tiles stay in L2 while they are used."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows_in_group, (tile % per_group) // rows_in_group


@triton.jit
def _rotate_pairs(acc, COS, SIN, rows, M, n0, s_cos, HALF: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rotate neighbouring column pairs (x[d], x[d + HALF] of a head, interleaved) by each row's angles."""
    first, second = tl.split(tl.reshape(acc, (acc.shape[0], BLOCK_N // 2, 2)))
    frequency = (n0 // 2 + tl.arange(0, BLOCK_N // 2)) % HALF
    at = rows[:, None].to(tl.int64) * s_cos + frequency[None, :]
    in_batch = (rows < M)[:, None]
    cos = tl.load(COS + at, mask=in_batch, other=1.0)
    sin = tl.load(SIN + at, mask=in_batch, other=0.0)
    rotated = tl.join(first * cos - second * sin, second * cos + first * sin)
    return tl.reshape(rotated, (acc.shape[0], BLOCK_N))


@triton.jit
def _projection_kernel(
    x_desc, w_desc, out_desc, COS, SIN, M, K, out_cols, gate_offset, rotary_cols, s_cos, programs,
    EPILOGUE: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GELU_ERF: tl.constexpr,
):  # fmt: skip
    """out[:, tile] = epilogue(x @ W[tile rows]^T), tile by tile (several per program if persistent)."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(out_cols, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs, flatten=True):
        pid_m, pid_n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M)
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = x_desc.load([m0, k])
            acc = tl.dot(x, w_desc.load([n0, k]).T, acc)
            if EPILOGUE == _GEGLU:
                gate = tl.dot(x, w_desc.load([gate_offset + n0, k]).T, gate)
        if EPILOGUE == _GEGLU:
            acc = _gelu(acc, GELU_ERF) * gate
        elif EPILOGUE == _ROTARY:
            if n0 < rotary_cols:
                rows = m0 + tl.arange(0, BLOCK_M)
                acc = _rotate_pairs(acc, COS, SIN, rows, M, n0, s_cos, HALF, BLOCK_N)
        out_desc.store([m0, n0], acc.to(out_desc.dtype))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    epilogue: int = PLAIN,
    config: TileConfig | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rotary_cols: int = 0,
    half: int = 1,
    gelu_erf: int = 1,
) -> torch.Tensor:
    """Run one projection into `out` [M, out_cols]. GEGLU: weight [2 * out_cols, K], input half first.
    ROTARY: weight's first `rotary_cols` rows interleaved per head (`interleave_rotary_rows`), cos and
    sin [M, half] float32 per token."""
    if config is None:
        config = INTERPRETER_TILE if not x.is_cuda else TileConfig()
    (m, k), out_cols = x.shape, out.shape[1]
    if epilogue == ROTARY and (rotary_cols % config.block_n or config.block_n % (2 * half)):
        raise ValueError(f"block_n {config.block_n} must tile q and k's {rotary_cols} columns by whole heads")
    x_desc = TensorDescriptor.from_tensor(x, [config.block_m, config.block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k])
    out_desc = TensorDescriptor.from_tensor(out, [config.block_m, config.block_n])
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(out_cols, config.block_n)
    programs = min(tiles, _sm_count(x.device)) if (config.persistent and x.is_cuda) else tiles
    unused = out.new_empty(1, dtype=torch.float32)
    cos = unused if cos is None else cos
    sin = unused if sin is None else sin
    _projection_kernel[(programs,)](
        x_desc, w_desc, out_desc, cos, sin, m, k, out_cols, out_cols, rotary_cols,
        cos.stride(0) if cos.dim() == 2 else 0, programs,
        EPILOGUE=epilogue, HALF=half, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, GELU_ERF=gelu_erf, num_warps=config.warps, num_stages=config.stages,
    )  # fmt: skip
    return out


def interleave_rotary_rows(weight: torch.Tensor, head_dim: int, rotary_rows: int) -> torch.Tensor:
    """Wqkv with the first `rotary_rows` rows (q and k) reordered within each head to
    d0, d0 + half, d1, d1 + half, ...: a rotation pair becomes two neighbouring output columns."""
    half = head_dim // 2
    within = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).reshape(-1)
    heads = torch.arange(rotary_rows // head_dim)[:, None] * head_dim
    order = (heads + within[None, :]).reshape(-1).to(weight.device)
    return torch.cat((weight[:rotary_rows][order], weight[rotary_rows:]))


def interleave_rotary_columns(qk: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The same reordering applied to the columns of a [N, heads * head_dim] q or k (for tests)."""
    half = head_dim // 2
    n = qk.shape[0]
    return qk.reshape(n, -1, 2, half).transpose(2, 3).reshape(n, -1)


# -- the operators the model calls -------------------------------------------------------------------

# Launch shapes measured on one H200 for the base shape (benchmarks/results/projection_gemm_sweep.json).
GEGLU_TILE = TileConfig(block_m=128, block_n=128, block_k=64, group_m=8, stages=3, warps=8)
ROTARY_TILE = TileConfig(block_m=128, block_n=128, block_k=64, group_m=8, stages=4, warps=8)


def _tile(x: torch.Tensor, tile: TileConfig) -> TileConfig:
    return tile if x.is_cuda else INTERPRETER_TILE


def _check_operands(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x [tokens, in] and weight [out, in] must agree, got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype or (x.shape[1] * x.element_size()) % 16:
        raise ValueError("x and weight need one dtype and rows of a multiple of 16 bytes (TMA)")


@torch.library.custom_op("mbert_retrieval::geglu_projection", mutates_args=())
def geglu_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """gelu(x @ Wi[:I]^T) * (x @ Wi[I:]^T): [N, I] for Wi [2I, H] (exact GELU)."""
    _check_operands(x, weight)
    out = x.new_empty(x.shape[0], weight.shape[0] // 2)
    return launch(x.contiguous(), weight.contiguous(), out, GEGLU, _tile(x, GEGLU_TILE))


@geglu_projection.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


@torch.library.custom_op("mbert_retrieval::rotary_projection", mutates_args=())
def rotary_projection(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """x @ Wqkv^T [N, 3H] with q and k rotated (cos, sin [N, head_dim / 2] float32 per token) and
    stored with each head's dimensions interleaved (d, d + half, ...); v as it is."""
    _check_operands(x, weight)
    half, rotary_rows = cos.shape[-1], 2 * weight.shape[0] // 3
    interleaved = interleave_rotary_rows(weight, 2 * half, rotary_rows)  # 2.4 MB: ~3 us on an H200
    out = x.new_empty(x.shape[0], weight.shape[0])
    tile = _tile(x, ROTARY_TILE)
    return launch(
        x.contiguous(), interleaved, out, ROTARY, tile, cos.contiguous(), sin.contiguous(), rotary_rows, half
    )


@rotary_projection.register_fake
def _(x, weight, cos, sin):
    return x.new_empty(x.shape[0], weight.shape[0])


def supported(device: torch.device) -> bool:
    """Tensor-memory-accelerator loads need a Hopper GPU or newer (compute capability 9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
