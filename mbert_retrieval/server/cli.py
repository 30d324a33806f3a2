"""The `serve` command: code search over HTTP for IDE plugins.

    mbert-retrieval serve --index DIR [--host 127.0.0.1] [--port 8765] [--token T] [--allow-no-token]

`register(app)` adds it to a typer app; this module's own `app` runs it standalone
(`python -m mbert_retrieval.server.cli serve ...`). The server's libraries (FastAPI, uvicorn) are
imported when the command runs, so the command line starts without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from mbert_retrieval.cli_errors import command_app, reports_errors
from mbert_retrieval.code.cli import cpu_backend_option


@reports_errors
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
    cpu_backend: str = cpu_backend_option(),
) -> None:
    """Serve code search over HTTP for IDE plugins (POST /search, POST /reindex, GET /health)."""
    from mbert_retrieval.code.encoders import load_encoder, load_reranker, model_name
    from mbert_retrieval.code.index import read_index_settings
    from mbert_retrieval.server.app import Limits, create_app
    from mbert_retrieval.server.run import check_token
    from mbert_retrieval.server.run import serve as run_server
    from mbert_retrieval.server.service import CodeSearchService

    if threads is not None:  # many concurrent requests each using every core thrash; one or two is often best
        import torch

        torch.set_num_threads(threads)
    if token is None:  # typer reads an empty variable as unset; an empty token must be refused
        token = os.environ.get("MBERT_RETRIEVAL_TOKEN")
    check_token(token, host, allow_no_token)
    name = model_name(model) if model is not None else read_index_settings(index)["model_name"]
    service = CodeSearchService(
        index,
        load_encoder(name, cpu_backend=cpu_backend),
        model_name=name,
        reranker=load_reranker(reranker) if reranker else None,
    )
    run_server(
        create_app(service, token=token, limits=Limits(max_k=max_k)),
        host=host,
        port=port,
        token=token,
        allow_no_token=allow_no_token,
    )


def register(app: typer.Typer) -> None:
    """Add `serve` to a typer app."""
    app.command("serve")(serve)


app = command_app("Serve code search over HTTP for IDE plugins.")
register(app)

if __name__ == "__main__":
    app()
