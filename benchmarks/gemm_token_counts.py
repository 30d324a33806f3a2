"""The model's four GEMMs (cuBLAS, bf16) at every token count around a workload's, and the kernel
cuBLAS picks for each: whether the count a replayed batch is padded to runs slower than the batch's
own.

Until run 60 `GraphedForward` padded each batch to a multiple of 128 tokens, so that a few recordings
serve all batches. Replayed short batches lost ~2% to that padding (benchmarks/NOTES.md, runs 54-55)
although the 76 padding tokens are 0.5% of the work; cuBLAS choosing a different kernel at the padded
count would explain it. Each GEMM reads a contiguous input of its own width, as the model's do. Each GEMM is recorded as a CUDA graph of `--chain` calls and replayed; token
counts take turns within each round, so clock drift hits all of them alike. Prints a table and
writes JSON:

    PYTHONPATH=. python3 benchmarks/gemm_token_counts.py --out benchmarks/results/gemm_token_counts.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import write_result
from benchmarks.encoder_throughput import FULL

# (name, input width, output width) of ModernBERT-base's projections
GEMMS = [("Wqkv", 768, 2304), ("attn.Wo", 768, 768), ("mlp.Wi", 768, 2304), ("mlp.Wo", 1152, 768)]
LAYERS = 22


def workload_tokens() -> dict[str, int]:
    """Each workload's token count, drawn as encoder_throughput.py draws them."""
    generator = torch.Generator().manual_seed(1)
    return {workload.name: sum(workload.lengths(generator)) for workload in FULL}


def token_counts(tokens: int, step: int, span: int) -> list[int]:
    """The workload's own count, and multiples of `step` from `span` below it to `span` above."""
    low, high = (tokens - span) // step * step, tokens + span
    return sorted({tokens, *range(low, high + 1, step)})


def kernel_name(fn) -> str:
    """The name of the (longest) GPU kernel one call of `fn` runs."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in kernels if "memset" not in e.name.lower()]
    return max(kernels, key=lambda e: e.device_time_total).name if kernels else ""


def recorded(fn, chain: int) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(chain):
            fn()
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="short_variable,long_variable")
    parser.add_argument("--halves", action="store_true", help="also around half of each workload's count")
    parser.add_argument("--step", type=int, default=16, help="token counts at multiples of this")
    parser.add_argument("--span", type=int, default=256, help="tokens below and above the workload's count")
    parser.add_argument("--chain", type=int, default=20, help="GEMMs per recorded graph")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/gemm_token_counts.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemm_token_counts.py times cuBLAS on a GPU")

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    weights = {
        name: (torch.randn(out, width, generator=generator) * width**-0.5).to(device, torch.bfloat16)
        for name, width, out in GEMMS
    }
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python3 " + " ".join(sys.argv),
        "workloads": {},
    }
    centres = {}
    for workload, tokens in workload_tokens().items():
        if workload in args.workloads.split(","):
            centres[workload] = tokens
            if args.halves:  # what each stream records with `GraphedForward(..., streams=2)`
                centres[f"{workload}_half"] = tokens // 2
    for workload, tokens in centres.items():
        counts = token_counts(tokens, args.step, args.span)
        widths = {width for _, width, _ in GEMMS}
        inputs = {
            (n, width): torch.randn(n, width, generator=generator).to(device, torch.bfloat16)
            for n in counts
            for width in widths
        }
        calls = {
            (name, n): (lambda x=inputs[(n, width)], w=weights[name]: F.linear(x, w))
            for n in counts
            for name, width, _ in GEMMS
        }
        graphs = {key: recorded(fn, args.chain) for key, fn in calls.items()}
        times: dict = {key: [] for key in graphs}
        for _ in range(args.rounds):
            for key, graph in graphs.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times[key].append(start.elapsed_time(end) * 1e3 / args.chain)
        rows = []
        for n in counts:
            row: dict = {"tokens": n, "padding": n - tokens}
            for name, width, out in GEMMS:
                us = statistics.median(times[(name, n)])
                row[f"{name}_us"] = us
                row[f"{name}_tflops"] = 2 * n * width * out / us / 1e6
                row[f"{name}_kernel"] = kernel_name(calls[(name, n)])
            row["forward_gemms_ms"] = LAYERS * sum(row[f"{name}_us"] for name, _, _ in GEMMS) / 1e3
            row["forward_gemms_us_per_1k_tokens"] = row["forward_gemms_ms"] * 1e6 / n
            rows.append(row)
        results["workloads"][workload] = {"tokens": tokens, "counts": rows}
        write_result(results, args.out)

    lines = ["| workload | tokens | padding | " + " | ".join(f"{n} us" for n, _, _ in GEMMS)
             + " | 22 layers ms | us per 1k tokens | kernels (Wqkv, mlp.Wo) |",
             "|---|---|---|" + "---|" * len(GEMMS) + "---|---|---|"]  # fmt: skip
    for workload, entry in results["workloads"].items():
        for row in entry["counts"]:
            cells = " | ".join(f"{row[f'{n}_us']:.1f}" for n, _, _ in GEMMS)
            kernels = f"{row['Wqkv_kernel'][:40]}, {row['mlp.Wo_kernel'][:40]}"
            lines.append(
                f"| {workload} | {row['tokens']} | {row['padding']} | {cells} | {row['forward_gemms_ms']:.3f} | "
                f"{row['forward_gemms_us_per_1k_tokens']:.1f} | {kernels} |"
            )
    write_result(results, args.out, "\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
