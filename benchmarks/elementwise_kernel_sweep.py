"""The rotary and GeGLU forward kernels (`modeling/fused_elementwise.py`) alone: launch shapes against
inductor's kernels for the same plain code, and against the memory traffic's floor.

ModernBERT-base's shapes (12 heads of 64, GeGLU width 1152), bf16, the encoder benchmark's short and
long variable token counts. Each kernel reads and writes a fixed number of bytes, so a kernel near
the floor has nothing left to gain: the floor is inductor's kernel for the same bytes without the
arithmetic (`gate * a` for GeGLU, copying q, k and v out for rotary). Times are medians of CUDA-graph
replays (no launch overhead); prints a table and writes JSON:

    PYTHONPATH=. python3 benchmarks/elementwise_kernel_sweep.py --out benchmarks/results/elementwise_kernel_sweep.json
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import recorder, run_sweep
from benchmarks.encoder_throughput import FULL
from mbert_retrieval.modeling import fused_elementwise as kernels

HEADS, HEAD_DIM, GEGLU_WIDTH = 12, 64, 1152
GEGLU_CANDIDATES = [(elements, warps) for elements in (2048, 4096, 8192, 16384) for warps in (4, 8)]
ROTARY_CANDIDATES = [(tokens, warps) for tokens in (4, 8, 16, 32) for warps in (4, 8)]


def plain_geglu(hidden: torch.Tensor) -> torch.Tensor:
    a, gate = hidden.chunk(2, dim=-1)
    return F.gelu(a) * gate


def product_only(hidden: torch.Tensor) -> torch.Tensor:
    a, gate = hidden.chunk(2, dim=-1)
    return a * gate


def plain_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    q, k, v = qkv.unbind(1)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k), v.clone()


def copies_only(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return tuple(part.clone() for part in qkv.unbind(1))


def measure(tokens: int) -> dict:
    device = torch.device("cuda")
    row = {"tokens": tokens}
    record = recorder(row)
    hidden = torch.randn(tokens, 2 * GEGLU_WIDTH, device=device, dtype=torch.bfloat16)
    qkv = torch.randn(tokens, 3, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    angles = torch.rand(tokens, 1, HEAD_DIM // 2, device=device) * 6.28
    cos, sin = angles.cos(), angles.sin()
    row["geglu_bytes"] = hidden.numel() * 2 + tokens * GEGLU_WIDTH * 2
    row["rotary_bytes"] = 2 * qkv.numel() * 2 + 2 * cos.numel() * 4

    with torch.no_grad():
        for name, fn, args in (
            ("geglu_inductor_us", plain_geglu, (hidden,)),
            ("geglu_floor_us", product_only, (hidden,)),
            ("rotary_inductor_us", plain_rotary, (qkv, cos, sin)),
            ("rotary_floor_us", copies_only, (qkv, cos, sin)),
        ):
            compiled = torch.compile(fn, dynamic=False)
            record(name, lambda compiled=compiled, args=args: compiled(*args))
        shipped = (kernels.GEGLU_ELEMENTS, kernels.GEGLU_WARPS, kernels.ROTARY_TOKENS, kernels.ROTARY_WARPS)
        for elements, warps in GEGLU_CANDIDATES:
            kernels.GEGLU_ELEMENTS, kernels.GEGLU_WARPS = elements, warps
            record(f"geglu_e{elements}_w{warps}_us", lambda: kernels.geglu(hidden))
        rotary_cos, rotary_sin = cos.reshape(tokens, -1), sin.reshape(tokens, -1)
        for per_program, warps in ROTARY_CANDIDATES:
            kernels.ROTARY_TOKENS, kernels.ROTARY_WARPS = per_program, warps
            record(
                f"rotary_t{per_program}_w{warps}_us",
                lambda: kernels.rotary_qkv(qkv, rotary_cos, rotary_sin),
            )
        kernels.GEGLU_ELEMENTS, kernels.GEGLU_WARPS, kernels.ROTARY_TOKENS, kernels.ROTARY_WARPS = shipped
    return row


def main() -> None:
    shipped = {
        "geglu": f"e{kernels.GEGLU_ELEMENTS}_w{kernels.GEGLU_WARPS}",
        "rotary": f"t{kernels.ROTARY_TOKENS}_w{kernels.ROTARY_WARPS}",
    }
    run_sweep(__doc__, "elementwise_kernel_sweep", lambda lengths: measure(sum(lengths)), FULL, shipped)


if __name__ == "__main__":
    main()
