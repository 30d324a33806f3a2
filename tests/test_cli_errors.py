"""One error policy for every command: bad input is one line and exit 2, any other failure one line
(with the error's type) and exit 1, never a traceback."""

from __future__ import annotations

import pytest
import typer
from mbert_retrieval.evaluation.data import DataFormatError
from mbert_retrieval.evaluation.leaderboard import LeaderboardConfigError
from typer.main import get_command
from typer.testing import CliRunner

from mbert_retrieval.cli import app
from mbert_retrieval.cli_errors import BadInput, reports_errors
from mbert_retrieval.code.encoders import ModelNotFoundError
from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.modeling import CheckpointError, ConfigError
from mbert_retrieval.training.data import TrainingDataError

runner = CliRunner()


def run_raising(error: BaseException) -> tuple[int, str]:
    """Exit code and output of a command that raises `error`."""
    single = typer.Typer()

    @single.command()
    @reports_errors
    def fail():
        raise error

    result = runner.invoke(single, [])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "error_type",
    [
        BadInput,
        ConfigError,
        CheckpointError,
        IndexFormatError,
        DataFormatError,
        LeaderboardConfigError,
        TrainingDataError,
        ModelNotFoundError,
        ValueError,
        FileNotFoundError,
    ],
)
def test_bad_input_is_one_line_and_exit_2(error_type):
    code, output = run_raising(error_type("corpus.jsonl line 3: not valid JSON"))
    assert (code, output) == (2, "error: corpus.jsonl line 3: not valid JSON\n")


def test_other_failures_name_the_error_and_exit_1():
    code, output = run_raising(RuntimeError("CUDA out of memory"))
    assert (code, output) == (1, "error: RuntimeError: CUDA out of memory\n")


def test_interruption_and_typer_exits():
    assert run_raising(KeyboardInterrupt()) == (130, "interrupted\n")
    assert run_raising(typer.Exit(3))[0] == 3


def test_every_command_reports_errors_through_the_policy():
    group = get_command(app)
    commands = dict(group.commands)
    commands.update({f"train {n}": c for n, c in group.commands["train"].commands.items()})
    commands.pop("train")
    assert {"index", "search", "index-code", "search-code", "serve", "train dense", "train mine"} <= set(
        commands
    )
    policy = reports_errors(len).__code__
    for name, command in commands.items():
        chain, function = [], command.callback
        while function is not None:
            chain.append(function.__code__)
            function = getattr(function, "__wrapped__", None)
        assert policy in chain, f"{name} does not use reports_errors"
