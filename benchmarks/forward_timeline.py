"""Where one forward's time goes between the host and the GPU, call by call.

`encoder_throughput.py` times each call from its start until the GPU finishes it (`*_tok_s`), and
calls launched back to back; the two differ by what the GPU waits for while the host works. This
script traces single calls (CUDA activity only: CUPTI's record of each kernel, copy or memset and of
the host-side launch that queued it, linked by correlation id) and splits each call's time into:

- `prologue_ms`: from the call's start (a marker kernel launched just before it) to the first launch
  of the call's own work: Python, guards, the compiled wrapper's setup;
- `first_latency_ms`: from that launch until its kernel starts;
- `busy_ms`: the GPU running the call's kernels, copies and memsets;
- `starved_ms`: GPU idle because the next kernel had not been launched yet (its launch began after the
  previous kernel ended): the host bounds the call there;
- `queued_gap_ms`: GPU idle with the next kernel already launched (launch latency, waits).

They add up to `wall_ms`. Prints a table and writes JSON:

    PYTHONPATH=. python3 benchmarks/forward_timeline.py --variants eager,compiled_model \\
        --out benchmarks/results/forward_timeline.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import write_result
from benchmarks.encoder_throughput import FULL, ModelVariants, build_models, make_batch, ours_forward
from mbert_retrieval.modeling.encoder import positions_from_cu_seqlens

SKIP_GUARDS = "_skip_guards"  # a variant name's suffix: dynamo evaluates only its differentiating guards


@dataclass(frozen=True)
class Interval:
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class GpuWork(Interval):
    launch: Interval | None  # the host-side API call that queued it, when CUPTI linked one
    name: str = ""


def split_call(call_start_ns: int, work: list[GpuWork]) -> dict:
    """The call's time from `call_start_ns` until its last GPU work ends, split as the module says."""
    work = sorted(work, key=lambda item: item.start_ns)
    if not work:
        raise ValueError("no GPU work recorded for the call")
    first = work[0]
    first_launch = first.launch.start_ns if first.launch else first.start_ns
    parts = {
        "prologue_ms": max(first_launch - call_start_ns, 0),
        "first_latency_ms": max(first.start_ns - max(first_launch, call_start_ns), 0),
        "busy_ms": 0,
        "starved_ms": 0,
        "queued_gap_ms": 0,
    }
    busy_until, previous, gaps = first.start_ns, "", []
    for item in work:
        gap = item.start_ns - busy_until
        if gap > 0:
            host_late = item.launch.start_ns - busy_until if item.launch else 0
            starved = min(max(host_late, 0), gap)
            parts["starved_ms"] += starved
            parts["queued_gap_ms"] += gap - starved
            gaps.append((gap, starved, previous, item))
        parts["busy_ms"] += max(item.end_ns - max(item.start_ns, busy_until), 0)
        busy_until, previous = max(busy_until, item.end_ns), item.name
    result: dict = {name: ns / 1e6 for name, ns in parts.items()}
    result["wall_ms"] = (busy_until - call_start_ns) / 1e6
    result["kernels"] = len(work)
    result["linked_launches"] = sum(item.launch is not None for item in work)
    result["first_work"] = [describe(item, call_start_ns) for item in work[:8]]
    result["largest_gaps"] = [
        {"after": after, **describe(item, call_start_ns), "gap_us": gap / 1e3, "starved_us": starved / 1e3}
        for gap, starved, after, item in sorted(gaps, key=lambda entry: -entry[0])[:6]
    ]
    return result


def describe(item: GpuWork, call_start_ns: int) -> dict:
    """A piece of GPU work: its name, when its launch began and when it ran, in us from the call's start."""
    return {
        "name": item.name[:80],
        "launch_at_us": None if item.launch is None else (item.launch.start_ns - call_start_ns) / 1e3,
        "start_at_us": (item.start_ns - call_start_ns) / 1e3,
        "duration_us": (item.end_ns - item.start_ns) / 1e3,
    }


def trace_call(fn, marker: torch.Tensor) -> dict:
    """Runs `fn` once under the profiler, a marker kernel launched just before it, and splits its time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        marker.add_(1)
        fn()
        torch.cuda.synchronize()
    events = prof.profiler.kineto_results.events()
    launches = {
        event.correlation_id(): Interval(event.start_ns(), event.end_ns())
        for event in events
        if event.device_type() == torch.autograd.DeviceType.CPU and event.correlation_id() > 0
    }
    gpu = sorted(
        (event for event in events if event.device_type() == torch.autograd.DeviceType.CUDA),
        key=lambda event: event.start_ns(),
    )
    if len(gpu) < 2:
        raise RuntimeError("the profiler recorded no GPU work for the call")
    marker_event, own = gpu[0], gpu[1:]
    marker_launch = launches.get(marker_event.correlation_id())
    call_start = marker_launch.end_ns if marker_launch else marker_event.end_ns()
    work = [
        GpuWork(event.start_ns(), event.end_ns(), launches.get(event.correlation_id()), event.name())
        for event in own
    ]
    return split_call(call_start, work)


def median_parts(calls: list[dict]) -> dict:
    """The median of each number over the calls; the details of the call with the median wall time."""
    numbers = {
        name: statistics.median(call[name] for call in calls)
        for name in calls[0]
        if name.endswith(("_ms", "kernels", "launches"))
    }
    middle = sorted(calls, key=lambda call: call["wall_ms"])[len(calls) // 2]
    return {**numbers, "first_work": middle["first_work"], "largest_gaps": middle["largest_gaps"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/forward_timeline.json"))
    parser.add_argument(
        "--variants", default="eager,compiled_model", help="encoder_throughput's variant names"
    )
    parser.add_argument("--workloads", default="short_variable,long_variable")
    parser.add_argument("--calls", type=int, default=5, help="traced calls per variant (the median is kept)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("forward_timeline.py traces CUDA kernels: run it on a GPU")

    device = torch.device("cuda")
    config, ours, _hf = build_models(False, device, torch.bfloat16, "auto")
    models = ModelVariants(ours)
    workloads = [w for w in FULL if w.name in args.workloads.split(",")]
    marker = torch.zeros(1, device=device)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python3 " + " ".join(sys.argv),
        "workloads": {},
    }
    generator = torch.Generator().manual_seed(1)
    for workload in workloads:
        lengths = workload.lengths(generator)
        packed, cu, _, _ = make_batch(lengths, config.vocab_size, device, generator)
        positions = positions_from_cu_seqlens(cu, packed.numel())
        row = results["workloads"][workload.name] = {"tokens": sum(lengths)}
        for name in args.variants.split(","):
            model = models.get(name.removesuffix(SKIP_GUARDS))

            def call(model=model, skip_guards=name.endswith(SKIP_GUARDS)):
                # Diagnostic only: how much of the prologue is dynamo checking its guards.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=skip_guards):
                    return ours_forward(model, packed, cu, max(lengths), positions)

            with torch.inference_mode():
                for _ in range(args.warmup):
                    call()
                row[name] = median_parts([trace_call(call, marker) for _ in range(args.calls)])
            write_result(results, args.out)
    print_table(results)
    print(f"wrote {args.out}")


def print_table(results: dict) -> None:
    columns = ["wall_ms", "prologue_ms", "first_latency_ms", "busy_ms", "starved_ms", "queued_gap_ms"]
    print(f"{'workload':16} {'variant':20} " + " ".join(f"{c[:-3]:>13}" for c in columns) + "  kernels")
    for workload, row in results["workloads"].items():
        for name, parts in row.items():
            if isinstance(parts, dict):
                cells = " ".join(f"{parts[c]:13.3f}" for c in columns)
                print(f"{workload:16} {name:20} {cells}  {parts['kernels']:.0f}")
                for gap in parts["largest_gaps"][:3]:
                    print(
                        f"{'':38}gap {gap['gap_us']:7.1f} us ({gap['starved_us']:.1f} starved) before "
                        f"{gap['name'][:50]} at {gap['start_at_us']:.0f} us"
                    )


if __name__ == "__main__":
    main()
