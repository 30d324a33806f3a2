"""How every `mbert-retrieval` command reports a failure: one line on stderr and an exit code.

Exit codes: 2 for bad usage or bad input, the errors a user can fix (a missing file or folder, a
malformed file, an impossible setting); 1 for anything else; 130 when interrupted. No traceback,
unless `--verbose` asked for the tracebacks of unexpected failures.

Bad input is any `ValueError`, which every error type of the project derives from (ConfigError,
CheckpointError, IndexFormatError, DataFormatError, TrainingDataError, LeaderboardConfigError,
BadInput, ...), and a path that is missing or of the wrong kind.
"""

from __future__ import annotations

import functools
import traceback

import click
import typer

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
BAD_INPUT_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
)

# typer's and click's own exits and usage errors (typer's Exit is click's in older versions)
PASSED_THROUGH = (
    typer.Exit,
    typer.Abort,
    click.exceptions.Exit,
    click.exceptions.Abort,
    click.ClickException,
)

show_tracebacks = False  # set by `mbert-retrieval --verbose`


def command_app(help: str, name: str | None = None) -> typer.Typer:
    """A typer app with the settings every command group shares: help when run bare, no shell
    completion, and no pretty tracebacks (failures go through `reports_errors`)."""
    return typer.Typer(
        name=name, help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )


class BadInput(ValueError):
    """A user error found by a command itself."""


def reports_errors(command):
    """Run `command`, turning any exception into a one-line message and the policy's exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PASSED_THROUGH:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BAD_INPUT_ERRORS as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as err:  # anything else is a failure, not the user's input
            if show_tracebacks:
                traceback.print_exc()
            typer.echo(f"error: {type(err).__name__}: {err}", err=True)
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper
