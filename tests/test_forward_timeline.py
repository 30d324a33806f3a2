"""The split of a call's time into host and GPU parts (benchmarks/forward_timeline.py), on made-up traces."""

from __future__ import annotations

import pytest

from benchmarks.forward_timeline import GpuWork, Interval, median_parts, split_call


def work(start, end, launch_start=None, name=""):
    launch = None if launch_start is None else Interval(launch_start, launch_start + 2)
    return GpuWork(start, end, launch, name)


def test_a_call_whose_host_stays_ahead_is_all_busy_after_its_prologue():
    # the first launch 100 ns after the call's start, its kernel 5 ns later, then two queued kernels
    parts = split_call(0, [work(105, 200, 100), work(200, 300, 110), work(300, 350, 120)])
    assert parts["prologue_ms"] * 1e6 == 100
    assert parts["first_latency_ms"] * 1e6 == 5
    assert parts["busy_ms"] * 1e6 == 245
    assert parts["starved_ms"] == parts["queued_gap_ms"] == 0
    assert parts["wall_ms"] * 1e6 == 350


def test_gaps_split_into_host_starved_and_queued():
    # kernel 2 launched 30 ns after kernel 1 ended and started 5 ns later: 30 starved, 5 queued;
    # kernel 3 launched early but started 20 ns after kernel 2 ended: 20 queued
    parts = split_call(0, [work(10, 100, 0, "a"), work(135, 200, 130, "b"), work(220, 260, 150, "c")])
    assert parts["starved_ms"] * 1e6 == pytest.approx(30)
    largest = parts["largest_gaps"][0]
    assert (largest["after"], largest["name"]) == ("a", "b")
    assert largest["gap_us"] * 1e3 == pytest.approx(35) and largest["starved_us"] * 1e3 == pytest.approx(30)
    assert [entry["name"] for entry in parts["first_work"]] == ["a", "b", "c"]
    assert parts["queued_gap_ms"] * 1e6 == pytest.approx(25)
    total = sum(
        parts[k] for k in ("prologue_ms", "first_latency_ms", "busy_ms", "starved_ms", "queued_gap_ms")
    )
    assert total == pytest.approx(parts["wall_ms"])
    assert parts["linked_launches"] == 3


def test_overlapping_work_counts_once_and_unlinked_gaps_are_queued():
    parts = split_call(0, [work(0, 100, 0), GpuWork(50, 120, None), GpuWork(150, 160, None)])
    assert parts["busy_ms"] * 1e6 == pytest.approx(130)
    assert parts["queued_gap_ms"] * 1e6 == pytest.approx(30)
    assert parts["linked_launches"] == 1


def test_a_call_without_gpu_work_is_an_error():
    with pytest.raises(ValueError, match="no GPU work"):
        split_call(0, [])


def test_the_median_call_gives_the_numbers_and_its_details():
    calls = [split_call(0, [work(10, end, 0, f"k{end}")]) for end in (300, 100, 200)]
    middle = median_parts(calls)
    assert middle["wall_ms"] * 1e6 == pytest.approx(200)
    assert middle["first_work"][0]["name"] == "k200"
