"""Wqkv + rotary and Wi + GeGLU on the base model's shapes: the fused inference kernels
(`mbert_retrieval/modeling/fused_linear.py`) against what the compiled model runs otherwise, cuBLAS
followed by inductor's fused elementwise kernel, and against the cuBLAS GEMM alone (the part of the
ceiling these kernels stand for). Also each autotuning candidate alone, to choose the tile list.

    PYTHONPATH=. python3 benchmarks/fused_projections.py   # -> benchmarks/results/fused_projections.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import write_result
from mbert_retrieval.modeling.encoder import Rotary, apply_rotary


def plain_rotary(x, weight, cos, sin, heads: int):
    qkv = F.linear(x, weight).view(x.shape[0], 3, heads, -1)
    q, k = apply_rotary(qkv[:, :2], cos[:, None, None, :], sin[:, None, None, :]).unbind(dim=1)
    return q, k, qkv[:, 2]


def plain_geglu(x, weight):
    inputs, gate = F.linear(x, weight).chunk(2, dim=-1)
    return F.gelu(inputs) * gate


def microseconds(fn) -> float:
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=25, rep=200)


def candidates(x, weight, cos, sin, epilogue: int) -> dict[str, float]:
    """Each tile configuration of the autotuner's list, timed alone."""
    import triton

    from mbert_retrieval.modeling import fused_linear as fl

    (m, k), n = x.shape, weight.shape[0]
    width = n // 2 if epilogue == fl.GEGLU else n
    out = x.new_empty(m, width)
    paired, gate = (2 * n // 3, 0) if epilogue == fl.ROTARY else (0, n // 2)
    half = cos.shape[-1] if epilogue == fl.ROTARY else 1
    times = {}
    for config in fl.CONFIGS:
        meta = config.kwargs
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        def run(meta=meta, config=config, grid=grid):
            fl._linear_kernel[grid](
                x, weight, out, cos, sin, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                cos.stride(0), paired, gate, EPILOGUE=epilogue, HALF=half, EVEN_K=k % fl.BLOCK_K == 0,
                FP32_DOT=False, BLOCK_K=fl.BLOCK_K, num_warps=config.num_warps,
                num_stages=config.num_stages, **meta,
            )  # fmt: skip

        name = f"{meta['BLOCK_M']}x{meta['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
        try:
            times[name] = microseconds(run)
        except Exception as err:  # e.g. a tile that needs more shared memory than the GPU has
            times[name] = f"{type(err).__name__}: {err}"[:200]
    return times


def measure(tokens: int, hidden: int, heads: int, intermediate: int) -> dict:
    from mbert_retrieval.modeling import fused_linear as fl

    device, dtype = "cuda", torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=generator)
    wqkv = torch.randn(3 * hidden, hidden, device=device, dtype=dtype, generator=generator) / hidden**0.5
    wi = torch.randn(2 * intermediate, hidden, device=device, dtype=dtype, generator=generator) / hidden**0.5
    positions = torch.arange(tokens, device=device) % 512
    cos, sin = Rotary(hidden // heads, 160000.0, 8192)(positions)
    cos, sin = cos.reshape(tokens, -1), sin.reshape(tokens, -1)
    compiled_rotary = torch.compile(plain_rotary, dynamic=False)
    compiled_geglu = torch.compile(plain_geglu, dynamic=False)
    row: dict = {"tokens": tokens}
    for name, weight, fused, compiled, epilogue in (
        ("qkv_rotary", wqkv, lambda: fl.rotary_projection(x, wqkv, cos, sin),
         lambda: compiled_rotary(x, wqkv, cos, sin, heads), fl.ROTARY),
        ("wi_geglu", wi, lambda: fl.geglu_projection(x, wi), lambda: compiled_geglu(x, wi), fl.GEGLU),
    ):  # fmt: skip
        with torch.inference_mode():
            fused()  # autotunes
            flops = 2 * tokens * hidden * weight.shape[0]
            times = {
                "fused_us": microseconds(fused),
                "cublas_then_elementwise_us": microseconds(compiled),
                "cublas_gemm_alone_us": microseconds(lambda w=weight: F.linear(x, w)),
            }
            best = fl._tuned_linear_kernel.best_config
            row[name] = {
                **times,
                "fused_over_unfused": times["cublas_then_elementwise_us"] / times["fused_us"],
                "fused_tflops": flops / times["fused_us"] / 1e6,
                "cublas_tflops": flops / times["cublas_gemm_alone_us"] / 1e6,
                "autotuned": str(best),
                "candidates_us": candidates(x, weight, cos, sin, epilogue),
            }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", default="15924,32208", help="token counts (the short / long variable batches)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_projections.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fused_projections.py needs a CUDA GPU")
    rows = [measure(int(t), 768, 12, 1152) for t in args.tokens.split(",")]
    lines = [
        "| tokens | projection | fused us | cuBLAS + elementwise us | cuBLAS GEMM alone us | fused gain | fused TFLOP/s | cuBLAS TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for name in ("qkv_rotary", "wi_geglu"):
            r = row[name]
            lines.append(
                f"| {row['tokens']} | {name} | {r['fused_us']:.1f} | {r['cublas_then_elementwise_us']:.1f} | "
                f"{r['cublas_gemm_alone_us']:.1f} | {r['fused_over_unfused']:.2f}x | {r['fused_tflops']:.0f} | "
                f"{r['cublas_tflops']:.0f} |"
            )
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python3 " + " ".join(sys.argv),
        "shape": "base (hidden 768, 12 heads, GeGLU 1152), bf16",
        "rows": rows,
    }
    write_result(result, args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
