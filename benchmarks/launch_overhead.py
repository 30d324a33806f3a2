"""Host time per call of the eager CUDA path's pieces, on inputs so small that the GPU never waits:
what one launch costs the host, for a PyTorch operator, a Triton kernel launched through Triton's
JIT, our fused kernels behind their autograd Functions, and a custom operator.

A training step bound by its host (one rank of several, benchmarks/NOTES.md) spends its time in
these calls; this says which kind of launch to avoid.

    PYTHONPATH=. python3 benchmarks/launch_overhead.py   # -> benchmarks/results/launch_overhead.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import write_result


def host_us_per_call(call, calls: int) -> float:
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    seconds = time.perf_counter() - started  # the launches, not the GPU work (queued, not waited for)
    torch.cuda.synchronize()
    return 1e6 * seconds / calls


def cases(grad: bool) -> dict:
    """With `grad`, the fused kernels' inputs require gradients, so each call records its graph."""
    from mbert_retrieval.modeling import fused_elementwise as fused
    from mbert_retrieval.modeling import window_attention as window

    device, dtype = "cuda", torch.bfloat16
    a, b = torch.randn(64, device=device), torch.randn(64, device=device)
    qkv = torch.randn(16, 3, 12, 64, device=device, dtype=dtype, requires_grad=grad)
    cos, sin = torch.randn(16, 32, device=device), torch.randn(16, 32, device=device)
    hidden = torch.randn(16, 2304, device=device, dtype=dtype, requires_grad=grad)
    out = torch.empty(16, 1152, device=device, dtype=dtype)
    cu = torch.tensor([0, 16], device=device, dtype=torch.int32)
    seq_ids = window.sequence_ids(cu, 16)
    q, k, v = qkv.unbind(1)
    grid, rows, cols = fused._geglu_tiles(16, 1152)

    def triton_jit_launch():
        fused._geglu_fwd[grid](hidden, out, 16, 1152, hidden.stride(0), out.stride(0), rows, cols)

    return {
        "aten add (one kernel)": lambda: torch.add(a, b),
        "Triton JIT launch (GeGLU forward kernel)": triton_jit_launch,
        "fused GeGLU forward (autograd Function + launch)": lambda: fused.geglu(hidden),
        "fused rotary forward (autograd Function + launch)": lambda: fused.rotary_qkv(qkv, cos, sin),
        "window attention, eager Function": lambda: window.window_attention(q, k, v, cu, 8, seq_ids),
        "window attention, custom operator": lambda: window.window_attention_fwd(q, k, v, cu, seq_ids, 8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/launch_overhead.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    timings = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for name, call in cases(grad).items():
                timings[f"{name}{', grad on' if grad else ''}"] = round(host_us_per_call(call, args.calls), 1)
    result = {
        "device": torch.cuda.get_device_name(0),
        "command": "PYTHONPATH=. python3 " + " ".join(["benchmarks/launch_overhead.py", *sys.argv[1:]]),
        "calls": args.calls,
        "host_us_per_call": timings,
    }
    table = ["| call | host us per call |", "| --- | --- |"]
    table += [f"| {name} | {us} |" for name, us in timings.items()]
    write_result(result, args.out, "\n".join(table))


if __name__ == "__main__":
    main()
