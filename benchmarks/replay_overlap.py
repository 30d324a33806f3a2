"""Replayed forward on one stream against the batch cut in two, each half on a stream of its own.

Inside one replayed graph the GPU still idles between kernels: ~1.6 us after each of ~300 kernels,
a memset before each of cuBLAS's 88 GEMMs, and the last, partial wave of every kernel. Two halves of
a batch (cut at the sequence boundary nearest its middle; sequences never attend across it) have no
dependency on each other, so recorded on two streams one half's kernels can fill the other's idle
time. Also measured: the graphs recorded with cuBLASLt given a 1 KiB workspace (`--lt-workspace-kib`;
0 fails), meant to leave out the kernels that need a memset; its GEMMs still had one each (run 54).

Every variant replays the same batch without padding; `shipped` is `GraphedForward` as the model
uses it (padded to 32 tokens past a multiple of 128; `multiples_of_128`: as before run 60). Timing
is interleaved: each round times one call of every variant and one of the ceiling (`encoder_throughput.Ceiling`: the GEMMs and FlashAttention
alone, eager), so the GPU's clock drift hits all of them alike. Prints a table and writes JSON:

    PYTHONPATH=. python3 benchmarks/replay_overlap.py --out benchmarks/results/replay_overlap.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


class Recorded:
    """One batch's forward recorded as a CUDA graph, whole on one stream or cut into `streams`
    parts (at the sequence boundaries nearest each equal share of its tokens), each on a stream of
    its own."""

    def __init__(self, model, ids, cu, max_len: int, streams: int, blas: str):
        import torch

        self.model, self.streams = model, streams
        ends = cu.tolist()
        cuts = [0, *cut_points(ends, streams), len(ends) - 1]
        self.parts = []
        for first, last in zip(cuts, cuts[1:]):
            part_cu = (cu[first : last + 1] - ends[first]).to(cu.dtype)
            longest = max(b - a for a, b in zip(ends[first:last], ends[first + 1 : last + 1]))
            self.parts.append((ids[ends[first] : ends[last]], part_cu, longest))
        self.side = [torch.cuda.Stream() for _ in self.parts]
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(blas)
        try:
            self._record()
        finally:
            torch.backends.cuda.preferred_blas_library(previous)

    def _run(self):
        import torch

        main = torch.cuda.current_stream()
        outs = []
        for stream, (ids, cu, longest) in zip(self.side, self.parts):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(self.model.forward_packed(ids, cu, longest, check_inputs=False))
        for stream in self.side:
            main.wait_stream(stream)
        return outs

    def _record(self) -> None:
        import torch

        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm), torch.inference_mode():
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(warm)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.outs = self._run()

    def __call__(self):
        import torch

        self.graph.replay()
        return torch.cat(self.outs) if len(self.outs) > 1 else self.outs[0].clone()


def cut_points(ends: list[int], parts: int) -> list[int]:
    """Indices into `ends` (cu_seqlens) of the sequence boundaries nearest 1/parts, 2/parts, ... of
    the tokens, each past the one before: where a batch is cut into `parts` parts."""
    cuts: list[int] = []
    for share in range(1, parts):
        target = ends[-1] * share / parts
        first = (cuts[-1] if cuts else 0) + 1
        cuts.append(min(range(first, len(ends) - 1), key=lambda i: abs(ends[i] - target)))
    return cuts


def make_variant(name: str, model, ids, cu, max_len: int):
    """A replayable forward of the batch: `GraphedForward` with the default padding (`shipped`) or
    with less of it, or the batch recorded as it is on one or two streams (`Recorded`)."""
    from mbert_retrieval.modeling.cuda_graphs import GraphedForward, GraphShapes

    name = name.split("#")[0]  # "shipped#2": a second, separate recording of the same variant
    shapes = {
        "shipped": GraphShapes(),
        "multiples_of_128": GraphShapes(token_offset=0),  # the token counts padded to before run 60
        "pad_tokens_only": GraphShapes(tokens=128, sequences=1),
        "pad_sequences_only": GraphShapes(tokens=1, sequences=16, pad_length=1),
        "shipped_unpadded": GraphShapes(tokens=1, sequences=1, pad_length=1),
    }
    if name in shapes:
        graphed = GraphedForward(model, shapes[name])
        return lambda: graphed(ids, cu, max_len)
    if name == "shipped_two_streams":
        graphed = GraphedForward(model, streams=2)
        return lambda: graphed(ids, cu, max_len)
    recorded = {
        "one_stream": (1, "cublas"),
        "two_streams": (2, "cublas"),
        "three_streams": (3, "cublas"),
        "four_streams": (4, "cublas"),
        "one_stream_lt": (1, "cublaslt"),
        "two_streams_lt": (2, "cublaslt"),
    }
    if name not in recorded:
        raise ValueError(f"unknown variant {name!r}; known: {[*shapes, 'shipped_two_streams', *recorded]}")
    return Recorded(model, ids, cu, max_len, *recorded[name])


def sm_clock() -> int | None:
    """The SM clock now (MHz), through NVML when it is installed."""
    import torch

    try:
        return torch.cuda.clock_rate()
    except Exception:
        return None


def record_ceiling(call):
    """The ceiling's eager forward recorded as one CUDA graph: its GPU time without the host's."""
    import torch

    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm), torch.inference_mode():
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        call()
    return graph


def count_memsets_and_kernels(fn) -> tuple[int, int]:
    import torch

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    memsets = kernels = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if "memset" in event.name.lower():
                memsets += 1
            else:
                kernels += 1
    return memsets, kernels


def host_profile(fn, calls: int = 30, rows: int = 12) -> list[dict]:
    """Where a call's host time goes: cProfile over `calls` calls (each waited for, so the GPU's
    queue never blocks the host), the functions with the most time of their own, per call."""
    import cProfile
    import pstats

    import torch

    profiler = cProfile.Profile()
    for _ in range(calls):
        torch.cuda.synchronize()
        profiler.enable()
        fn()
        profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:rows]
    return [
        {
            "function": f"{Path(file).name}:{line}({function})",
            "calls_per_call": count / calls,
            "own_us_per_call": 1e6 * own / calls,
            "cumulative_us_per_call": 1e6 * cumulative / calls,
        }
        for (file, line, function), (_, count, own, cumulative, _) in top
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="short_variable,long_variable")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument(
        "--variants",
        default="shipped,shipped_unpadded,one_stream,two_streams,one_stream_lt,two_streams_lt",
        help="comma list of: shipped, multiples_of_128, shipped_two_streams (GraphedForward's streams=2), pad_tokens_only, pad_sequences_only, shipped_unpadded, "
        "one_stream, two_streams, three_streams, four_streams, one_stream_lt, two_streams_lt; NAME#2 records NAME again as a control",
    )
    parser.add_argument(
        "--lt-workspace-kib",
        type=int,
        default=1,
        help="CUBLASLT_WORKSPACE_SIZE for the cuBLASLt variants (read once, before the first cuBLASLt call)",
    )
    parser.add_argument(
        "--host-profile",
        action="store_true",
        help="also cProfile each variant's calls (host time per function)",
    )
    parser.add_argument("--out", default="benchmarks/results/replay_overlap.json")
    args = parser.parse_args()
    os.environ["CUBLASLT_WORKSPACE_SIZE"] = str(args.lt_workspace_kib)

    import torch
    from transformers import ModernBertModel

    from benchmarks.common import write_result
    from benchmarks.encoder_throughput import FULL, Ceiling, base_config, make_batch, time_call
    from mbert_retrieval import ModernBert

    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as checkpoint:
        torch.manual_seed(0)
        ModernBertModel(base_config(False)).save_pretrained(checkpoint)
        model = ModernBert.from_pretrained(checkpoint, dtype=torch.bfloat16, device=device).eval()
    ceiling = Ceiling(model.config, device, torch.bfloat16)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python3 " + " ".join(sys.argv),
        "lt_workspace_kib": args.lt_workspace_kib,
        "workloads": {},
    }
    generator = torch.Generator().manual_seed(1)
    for workload in FULL:
        lengths = workload.lengths(generator)  # drawn in encoder_throughput.py's order
        if workload.name not in args.workloads.split(","):
            continue
        ids, cu, _, _ = make_batch(lengths, model.config.vocab_size, device, torch.Generator().manual_seed(2))
        tokens, max_len = sum(lengths), max(lengths)
        row: dict = {"tokens": tokens, "sequences": len(lengths), "max_len": max_len}
        variants = {}
        for name in args.variants.split(","):
            try:
                variants[name] = make_variant(name, model, ids, cu, max_len)
            except Exception as err:  # reported, not fatal: the others still run
                row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"{workload.name} {name}: {row[f'{name}_error']}", flush=True)
        x = torch.randn(tokens, model.config.hidden_size, device=device, dtype=torch.bfloat16)
        ceiling_call = lambda: ceiling.forward(x, cu, max_len, "varlen")  # noqa: E731
        ceiling_graph = record_ceiling(ceiling_call)
        with torch.inference_mode():
            reference = variants["one_stream" if "one_stream" in variants else "shipped"]().float()
            for name, fn in variants.items():
                out = fn().float()
                row[f"{name}_max_abs_diff_vs_one_stream"] = (out - reference).abs().max().item()
                row[f"{name}_memsets"], row[f"{name}_kernels"] = count_memsets_and_kernels(fn)
                if args.host_profile:
                    row[f"{name}_host_profile"] = host_profile(fn)
            timed = {**variants, "ceiling": ceiling_call, "ceiling_replayed": ceiling_graph.replay}
            for fn in timed.values():
                fn()
            times: dict[str, list[float]] = {name: [] for name in timed}
            for _ in range(args.rounds):
                for name, fn in timed.items():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) / 1e3)
            # As encoder_throughput.py times them: consecutive calls of one thing, in blocks, the
            # order reversed for the second pass so that drift over the run cancels in the mean.
            for order in (list(timed), list(timed)[::-1]):
                for name in order:
                    host = []
                    timed_call = timed[name]

                    def call(fn=timed_call, host=host):
                        begin = time.perf_counter()
                        fn()
                        host.append(time.perf_counter() - begin)

                    seconds = time_call(call, device, 3, args.rounds)
                    row.setdefault(f"{name}_consecutive_tok_s_passes", []).append(tokens / seconds)
                    row.setdefault(f"{name}_host_us_passes", []).append(1e6 * statistics.median(host))
                    row.setdefault(f"{name}_sm_clock_mhz_passes", []).append(sm_clock())
            for name in timed:
                row[f"{name}_consecutive_tok_s"] = statistics.mean(row[f"{name}_consecutive_tok_s_passes"])
        for name, values in times.items():
            row[f"{name}_tok_s"] = tokens / statistics.median(values)
            row[f"{name}_tok_s_quartiles"] = [tokens / q for q in statistics.quantiles(values, n=4)[::-1]]
        for name in variants:
            row[f"{name}_over_ceiling"] = row[f"{name}_tok_s"] / row["ceiling_tok_s"]
        results["workloads"][workload.name] = row
        write_result(results, args.out)

    lines = [
        "| workload | variant | M tok/s interleaved | / ceiling | M tok/s consecutive | / ceiling | host us | memsets | kernels | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["workloads"].items():
        lines.append(
            f"| {name} | ceiling (GEMMs + FlashAttention, eager) | {row['ceiling_tok_s'] / 1e6:.3f} | 1 | "
            f"{row['ceiling_consecutive_tok_s'] / 1e6:.3f} | 1 | | | | |"
        )
        lines.append(
            f"| {name} | ceiling replayed | {row['ceiling_replayed_tok_s'] / 1e6:.3f} | | "
            f"{row['ceiling_replayed_consecutive_tok_s'] / 1e6:.3f} | | | | | |"
        )
        for variant in args.variants.split(","):
            if f"{variant}_tok_s" not in row:
                continue
            lines.append(
                f"| {name} | {variant} | {row[f'{variant}_tok_s'] / 1e6:.3f} | {row[f'{variant}_over_ceiling']:.3f} | "
                f"{row[f'{variant}_consecutive_tok_s'] / 1e6:.3f} | "
                f"{row[f'{variant}_consecutive_tok_s'] / row['ceiling_consecutive_tok_s']:.3f} | "
                f"{statistics.median(row[f'{variant}_host_us_passes']):.0f} | "
                f"{row[f'{variant}_memsets']} | {row[f'{variant}_kernels']} | "
                f"{row[f'{variant}_max_abs_diff_vs_one_stream']:.2e} |"
            )
    write_result(results, args.out, "\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
