"""`mbert-retrieval train ...`: the options every training command shares, how they reach the trainer,
and the one-line errors of bad settings."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from mbert_retrieval.cli import app
from mbert_retrieval.training import cli as training_cli
from mbert_retrieval.training.cli import ExampleOptions, RunOptions

runner = CliRunner()
COMMANDS = ("dense", "colbert", "cross-encoder", "mlm")


def options_of(command: str) -> dict[str, object]:
    """{parameter name: click parameter} of `train <command>`."""
    group = get_command(app).commands["train"]
    return {param.name: param for param in group.commands[command].params}


def test_every_command_has_the_shared_options_and_the_retrieval_heads_the_example_options():
    run_names = {f.name for f in fields(RunOptions)}
    example_names = {f.name for f in fields(ExampleOptions)} - run_names
    assert {"max_time", "learning_rate", "output_dir", "seed"} <= run_names
    for command in COMMANDS:
        params = options_of(command)
        assert run_names <= set(params), command
        assert all(params[name].help for name in run_names), command
        has_examples = command != "mlm"
        assert (example_names <= set(params)) == has_examples, command
    assert options_of("dense")["teacher"].help and "teacher" not in options_of("colbert")


def test_each_command_keeps_its_own_defaults():
    assert options_of("dense")["learning_rate"].default == 2e-5
    assert options_of("colbert")["learning_rate"].default == 3e-5
    assert options_of("cross-encoder")["batch_size"].default == 16
    assert options_of("dense")["batch_size"].default == 32
    assert str(options_of("colbert")["output_dir"].default) == "runs/colbert"
    mlm = options_of("mlm")
    assert (mlm["learning_rate"].default, mlm["max_steps"].default) == (8e-4, 1000)
    assert mlm["optimizer"].default.value == "stable_adamw" and mlm["decay"].default.value == "1-sqrt"
    assert options_of("dense")["decay"].default.value == "linear"


def test_options_after_the_arguments_become_training_arguments(hf_mlm_dir, tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(training_cli, "train_and_report", lambda *run: runs.append(run))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"query": "q", "positive": "p", "negatives": ["a", "b", "c"]}) + "\n")
    command = ["train", "colbert", str(hf_mlm_dir), str(data), "-o", str(tmp_path / "out")]
    command += ["--max-steps", "7", "--lr", "1e-3", "--max-time", "30", "--decay", "cosine"]
    command += ["--grad-accum", "2", "--no-bf16", "--num-negatives", "1", "--embedding-size", "32"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    [(task, examples, args, dev)] = runs
    assert (args.max_steps, args.learning_rate, args.max_time) == (7, 1e-3, 30.0)
    assert (args.decay, args.optimizer, args.gradient_accumulation_steps) == ("cosine", "adamw", 2)
    assert (args.bf16, args.batch_size, args.output_dir) == (False, 32, str(tmp_path / "out"))
    assert dev is None and task.model.dim == 32
    assert [len(e.negatives) for e in examples] == [1]

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f():\n    return 1\n")
    command = ["train", "mlm", str(hf_mlm_dir), str(corpus), "-o", str(tmp_path / "mlm")]
    result = runner.invoke(app, command + ["--max-tokens-per-batch", "2048", "--max-time", "5"])
    assert result.exit_code == 0, result.output
    args = runs[-1][2]
    assert (args.batch_size, args.max_tokens_per_batch, args.max_steps, args.max_time) == (
        None,
        2048,
        1000,
        5.0,
    )
    assert (args.optimizer, args.decay, args.learning_rate) == ("stable_adamw", "1-sqrt", 8e-4)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["--max-steps", "0"], "max_steps must be positive"),
        (["--grad-accum", "0"], "gradient_accumulation_steps must be at least 1"),
        (["--dev", "{tmp}/missing"], "missing"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(settings, message, hf_mlm_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(4)))
    settings = [s.format(tmp=tmp_path) for s in settings]
    command = ["train", "dense", str(hf_mlm_dir), str(data), "-o", str(tmp_path / "o"), "--device", "cpu"]
    result = runner.invoke(app, command + settings)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_unknown_shared_option_default_is_refused():
    with pytest.raises(TypeError, match="no options"):
        training_cli.with_options(RunOptions, batch_size=8)
