"""MBERT_RETRIEVAL_PROFILE: a profile of a few training steps, written per rank; off by default."""

from __future__ import annotations

import json

from test_dense_distillation import Examples, make_examples

from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.training import DenseTask, Trainer, TrainingArguments, profiling


def train(hf_mlm_dir, output, steps):
    model = DenseRetriever.from_pretrained(hf_mlm_dir, max_length=64, device="cpu")
    args = TrainingArguments(
        str(output), max_steps=steps, batch_size=8, show_progress=False, device="cpu", save_final_model=False
    )
    return Trainer(DenseTask(model), Examples(make_examples(64)), args).train()


def test_the_profile_times_each_part_of_the_profiled_steps(hf_mlm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(profiling.ENVIRONMENT_VARIABLE, str(tmp_path / "profile"))
    steps = profiling.WAIT + profiling.WARMUP + profiling.ACTIVE
    train(hf_mlm_dir, tmp_path / "run", steps)
    summary = json.loads((tmp_path / "profile" / "rank0.json").read_text())
    assert summary["steps"] == profiling.ACTIVE
    host = summary["host_ms_per_step"]
    assert all(host[name] > 0 for name in ("data", "forward", "backward", "optimizer", "loss_sync"))
    assert sum(host.values()) <= summary["wall_ms_per_step"] * 1.05
    assert summary["gpu_busy_ms_per_step"] == 0  # no GPU here
    assert "forward" in (tmp_path / "profile" / "rank0.txt").read_text()
    assert not profiling._enabled


def test_without_the_variable_nothing_is_written(hf_mlm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(profiling.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    train(hf_mlm_dir, tmp_path / "run", 2)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "training_args.json"]
    assert not profiling._enabled


def test_gpu_busy_time_counts_overlapping_intervals_once():
    class Interval:
        def __init__(self, start, end):
            self.start, self.end = start, end

    assert profiling._union_us([Interval(0, 10), Interval(5, 15), Interval(20, 25), Interval(21, 22)]) == 20
