"""An opt-in profile of a few training steps, per rank, for finding where a step's time goes.

Set `MBERT_RETRIEVAL_PROFILE=<folder>` and the trainer runs `torch.profiler` over steps
WAIT + WARMUP + 1 .. WAIT + WARMUP + ACTIVE, then writes, for each rank r, into that folder:

    rank{r}.txt   the profiler's key-averages table (top operators by host time, then by device time)
    rank{r}.json  per step: wall time, GPU busy time (kernels, memory copies), NCCL kernel time,
                  and host time in each labelled part of the step (`section` names)

Off (the variable unset), `section` is an empty context manager and nothing else runs.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from mbert_retrieval.files import atomic_write_text

ENVIRONMENT_VARIABLE = "MBERT_RETRIEVAL_PROFILE"
WAIT, WARMUP, ACTIVE = 3, 2, 5  # steps: skipped (start-up), profiled but dropped, recorded
SECTIONS = ("data", "forward", "backward", "optimizer", "loss_sync")

_enabled = False


def section(name: str):
    """Label a part of the step in the profile (a no-op when not profiling)."""
    if not _enabled:
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


class _NoProfiler:
    def step(self) -> None:
        pass


@contextlib.contextmanager
def step_profiler(rank: int, use_cuda: bool):
    """A profiler to `.step()` once per optimizer step: the real one when the environment variable
    names a folder, else one that does nothing."""
    global _enabled
    folder = os.environ.get(ENVIRONMENT_VARIABLE)
    if not folder:
        yield _NoProfiler()
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if use_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
        on_trace_ready=lambda done: write_report(done, Path(folder), rank),
    )
    _enabled = True
    try:
        with profiler:
            yield profiler
    finally:
        _enabled = False


def write_report(profiler, folder: Path, rank: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    averages = profiler.key_averages()
    table = averages.table(sort_by="cpu_time_total", row_limit=30)
    if any(event.self_device_time_total > 0 for event in averages):
        table += "\n" + averages.table(sort_by="self_device_time_total", row_limit=30)
    atomic_write_text(folder / f"rank{rank}.txt", table + "\n")
    summary = {"rank": rank, **summarize(profiler.events())}
    atomic_write_text(folder / f"rank{rank}.json", json.dumps(summary, indent=2) + "\n")


def summarize(events) -> dict:
    """Milliseconds per profiled step: wall, GPU busy (the union of device intervals, so streams
    running side by side count once), NCCL kernels, and host time in each section."""
    # the host's step markers only (with CUDA the profiler also shows each step on the device)
    steps = [
        e
        for e in events
        if e.name.startswith("ProfilerStep") and e.device_type == torch.autograd.DeviceType.CPU
    ]
    count = max(1, len(steps))
    device = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    nccl = sum(e.time_range.elapsed_us() for e in device if "nccl" in e.name.lower())
    host = {name: 0.0 for name in SECTIONS}
    for event in events:
        if event.name in host and event.device_type == torch.autograd.DeviceType.CPU:
            host[event.name] += event.time_range.elapsed_us()
    return {
        "steps": len(steps),
        "wall_ms_per_step": _ms(sum(e.time_range.elapsed_us() for e in steps), count),
        "gpu_busy_ms_per_step": _ms(_union_us([e.time_range for e in device]), count),
        "gpu_kernel_ms_per_step": _ms(sum(e.time_range.elapsed_us() for e in device), count),
        "nccl_kernel_ms_per_step": _ms(nccl, count),
        "host_ms_per_step": {name: _ms(us, count) for name, us in host.items()},
    }


def _union_us(ranges) -> float:
    total, end = 0.0, float("-inf")
    for interval in sorted(ranges, key=lambda r: r.start):
        if interval.end > end:
            total += interval.end - max(interval.start, end)
            end = interval.end
    return total


def _ms(microseconds: float, steps: int) -> float:
    return round(microseconds / 1000 / steps, 3)
