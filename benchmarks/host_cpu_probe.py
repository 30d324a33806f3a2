"""Does a second busy process slow this one's host work? A pure-Python spin loop and a loop of small
CUDA launches, each timed alone and with other processes running at the same time (free or pinned to
given cores): what two training ranks on one machine do to each other's host side.

    python3 benchmarks/host_cpu_probe.py     # -> benchmarks/results/host_cpu_probe.json

spin: loop iterations in 1 s per process; launch: kernel launches per second of host time per process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path


def spin(seconds: float = 1.0) -> int:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count


def launches(device: int, count: int = 20000) -> float:
    import torch

    x = torch.randn(1024, device=device)
    for _ in range(2000):
        x.add_(1.0)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        x.add_(1.0)
    host = time.perf_counter() - start
    torch.cuda.synchronize(device)
    return count / host


def worker(kind: str, cpu: int | None, device: int, barrier, results) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if kind == "launch":
        import torch

        torch.cuda.set_device(device)
        torch.zeros(1, device=device)
    barrier.wait()
    results.put(spin() if kind == "spin" else launches(device))


def trial(kind: str, placements: list[tuple[int | None, int]]) -> list[float]:
    """One process per (cpu or None, GPU) placement, started together; their rates."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(len(placements)), context.Queue()
    processes = [
        context.Process(target=worker, args=(kind, cpu, device, barrier, results))
        for cpu, device in placements
    ]
    for process in processes:
        process.start()
    rates = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return sorted(round(rate) for rate in rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/host_cpu_probe.json"))
    options = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    trials = {"spin alone": ("spin", [(None, 0)])}
    for other in sorted({1, 2, cores // 2, cores - 1} - {0} & set(range(cores))):
        trials[f"spin on cores 0 and {other}"] = ("spin", [(0, 0), (other, 0)])
    trials["spin, 2 processes"] = ("spin", [(None, 0)] * 2)
    trials[f"spin, {cores // 2} processes"] = ("spin", [(None, 0)] * (cores // 2))
    import torch

    if torch.cuda.device_count() >= 2:
        trials["launch alone"] = ("launch", [(None, 0)])
        trials["launch, 2 processes on 2 GPUs"] = ("launch", [(None, 0), (None, 1)])
        trials[f"launch, cores 0 and {cores // 2}"] = ("launch", [(0, 0), (cores // 2, 1)])
        trials["launch, cores 0 and 1"] = ("launch", [(0, 0), (1, 1)])
    result = {"machine": platform.machine(), "cores": cores, "trials": {}}
    print("| trial | rates per process |\n| --- | --- |")
    for name, (kind, placements) in trials.items():
        result["trials"][name] = trial(kind, placements)
        print(f"| {name} | {', '.join(f'{r:,}' for r in result['trials'][name])} |", flush=True)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
