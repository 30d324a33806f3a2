"""`max_time`: a run stops at its time limit and still saves its model."""

from __future__ import annotations

import pytest
from test_dense_distillation import Examples, make_examples

from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.training import DenseTask, Trainer, TrainingArguments


def test_a_run_past_its_time_limit_stops_and_saves(hf_mlm_dir, tmp_path):
    model = DenseRetriever.from_pretrained(hf_mlm_dir, max_length=64, device="cpu")
    args = TrainingArguments(
        str(tmp_path), max_steps=10_000, max_time=2.0, batch_size=8, show_progress=False, device="cpu"
    )
    result = Trainer(DenseTask(model), Examples(make_examples(64)), args).train()
    assert 0 < result.steps < 10_000
    assert (result.final_model / "model.safetensors").exists()


def test_time_limit_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_time must be positive"):
        TrainingArguments(str(tmp_path), max_time=0)
