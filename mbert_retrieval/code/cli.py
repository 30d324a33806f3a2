"""Command-line entry points: `index-code` and `serve`.

    mbert-retrieval index-code REPO --index DIR [--model M] [--full]
    mbert-retrieval serve --index DIR [--host 127.0.0.1] [--port 8765] [--token T] [--allow-no-token]

`register(app)` adds both commands to a typer app; this module's own `app` runs them standalone
(`python -m mbert_retrieval.code.cli ...`).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from mbert_retrieval.code.encoders import load_encoder, load_reranker, model_name
from mbert_retrieval.index.storage import IndexFormatError

USER_ERRORS = (ValueError, FileNotFoundError, IndexFormatError, RuntimeError)


def index_code(
    repo: Path = typer.Argument(..., help="Repository folder to index"),
    index: Path = typer.Option(..., "--index", help="Index folder (created, or updated in place)"),
    model: str | None = typer.Option(
        None, "--model", help="Dense model folder or hub id (default: shipped model)"
    ),
    full: bool = typer.Option(False, "--full", help="Re-encode every file, not only changed ones"),
    max_file_kb: int = typer.Option(1000, "--max-file-kb", help="Skip files larger than this"),
) -> None:
    """Index a repository's functions, classes and methods for code search (incremental)."""
    from mbert_retrieval.code.index import build_code_index

    try:
        encoder = load_encoder(model)
        report = build_code_index(
            repo, index, encoder, model_name=model_name(model), full=full, max_file_bytes=max_file_kb * 1000
        )
    except USER_ERRORS as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(report.summary())


def serve(
    index: Path = typer.Option(..., "--index", help="Index folder built by index-code"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on"),
    port: int = typer.Option(8765, "--port", help="Port to listen on"),
    token: str | None = typer.Option(
        None, "--token", envvar="MBERT_RETRIEVAL_TOKEN", help="Require 'Authorization: Bearer TOKEN'"
    ),
    model: str | None = typer.Option(
        None, "--model", help="Dense model (default: the one the index was built with)"
    ),
    reranker: str | None = typer.Option(None, "--reranker", help="CrossEncoder folder to rerank the hits"),
    max_k: int = typer.Option(100, "--max-k", help="Largest k a request may ask for"),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads per model call (default: torch's)"
    ),
    allow_no_token: bool = typer.Option(
        False, "--allow-no-token", help="Serve without a token on an address other than loopback"
    ),
) -> None:
    """Serve code search over HTTP for IDE plugins (POST /search, POST /reindex, GET /health)."""
    from mbert_retrieval.code.index import read_index_settings
    from mbert_retrieval.server import CodeSearchService, Limits, create_app
    from mbert_retrieval.server import serve as run_server
    from mbert_retrieval.server.run import check_token

    if threads is not None:  # many concurrent requests each using every core thrash; one or two is often best
        import torch

        torch.set_num_threads(threads)
    if token is None:  # typer reads an empty variable as unset; an empty token must be refused
        token = os.environ.get("MBERT_RETRIEVAL_TOKEN")
    try:
        check_token(token, host, allow_no_token)
        name = model_name(model) if model is not None else read_index_settings(index)["model_name"]
        service = CodeSearchService(
            index,
            load_encoder(name),
            model_name=name,
            reranker=load_reranker(reranker) if reranker else None,
        )
    except USER_ERRORS as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    run_server(
        create_app(service, token=token, limits=Limits(max_k=max_k)),
        host=host,
        port=port,
        token=token,
        allow_no_token=allow_no_token,
    )


def register(app: typer.Typer) -> None:
    """Add `index-code` and `serve` to a typer app."""
    app.command("index-code")(index_code)
    app.command("serve")(serve)


app = typer.Typer(help="Code search: index a repository and serve it to IDE plugins.", no_args_is_help=True)
register(app)

if __name__ == "__main__":
    app()
