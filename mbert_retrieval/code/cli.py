"""Command-line entry points: `index-code` and `search-code` (`serve` is in server/cli.py).

    mbert-retrieval index-code REPO --index DIR [--model M] [--full] [--include-secrets]
    mbert-retrieval search-code DIR QUERY... [-k 10] [--mode hybrid|dense|bm25] [--path GLOB] [--json]

`register(app)` adds the commands to a typer app; this module's own `app` runs them standalone
(`python -m mbert_retrieval.code.cli ...`).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mbert_retrieval.cli_errors import command_app, reports_errors

CPU_BACKEND_HELP = (
    "How the dense model runs without a GPU: torch (float32), bf16 (bfloat16), onnx (onnxruntime, "
    "int8 weights; exported once into the user cache, needs mbert-retrieval[onnx]) or auto (bf16 on "
    "CPUs with AMX, else onnx when an export exists, else torch)"
)


def cpu_backend_option():
    return typer.Option("auto", "--cpu-backend", help=CPU_BACKEND_HELP)


@reports_errors
def index_code(
    repo: Path = typer.Argument(..., help="Repository folder to index"),
    index: Path = typer.Option(..., "--index", help="Index folder (created, or updated in place)"),
    model: str | None = typer.Option(
        None, "--model", help="Dense model folder or hub id (default: shipped model)"
    ),
    full: bool = typer.Option(False, "--full", help="Re-encode every file, not only changed ones"),
    max_file_kb: int = typer.Option(1000, "--max-file-kb", help="Skip files larger than this"),
    include_secrets: bool = typer.Option(
        False,
        "--include-secrets",
        help="Also index secret-looking files (.env, private keys, .netrc, credentials, ...), skipped by default",
    ),
    cpu_backend: str = cpu_backend_option(),
) -> None:
    """Index a repository's functions, classes and methods for code search (incremental)."""
    from mbert_retrieval.code.encoders import load_encoder, model_name
    from mbert_retrieval.code.index import build_code_index

    encoder = load_encoder(model, cpu_backend=cpu_backend)
    report = build_code_index(
        repo,
        index,
        encoder,
        model_name=model_name(model),
        full=full,
        max_file_bytes=max_file_kb * 1000,
        include_secrets=include_secrets,
    )
    typer.echo(report.summary())


@reports_errors
def search_code(
    index: Path = typer.Argument(..., help="Index folder built by index-code"),
    query: list[str] = typer.Argument(..., help="What to look for (several words make one query)"),
    k: int = typer.Option(10, "--k", "-k", min=1, help="Number of hits"),
    mode: str | None = typer.Option(
        None, "--mode", help="hybrid, dense or bm25 (default: the index's setting; bm25 needs no model)"
    ),
    path: str | None = typer.Option(None, "--path", help="Only files matching this glob, e.g. 'src/**/*.py'"),
    language: str | None = typer.Option(None, "--language", help="Only this language, e.g. python"),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as a JSON list, snippets included"),
    model: str | None = typer.Option(
        None, "--model", help="Dense model (default: the one the index was built with)"
    ),
    cpu_backend: str = cpu_backend_option(),
) -> None:
    """Search a code index from the command line, without starting the server."""
    [hits] = run_code_search(
        index,
        [" ".join(query)],
        k,
        mode=mode,
        path=path,
        language=language,
        model=model,
        cpu_backend=cpu_backend,
    )
    if as_json:
        typer.echo(json.dumps([hit_record(hit) for hit in hits], indent=1))
        return
    if not hits:
        typer.echo("no hits", err=True)
    for hit in hits:
        typer.echo(hit_line(hit))


def is_code_index(folder: Path) -> bool:
    from mbert_retrieval.code.metadata import POINTER

    return (Path(folder) / POINTER).is_file()


def run_code_search(
    index_dir: Path,
    queries: list[str],
    k: int,
    *,
    mode: str | None = None,
    path: str | None = None,
    language: str | None = None,
    model: str | None = None,
    reranker: str | None = None,
    rerank_depth: int = 50,
    cpu_backend: str = "auto",
) -> list:
    """The hits of each query in a code index; the dense model is loaded only when the mode needs it."""
    from mbert_retrieval.code.encoders import load_reranker
    from mbert_retrieval.code.index import MODES, CodeIndex

    if not Path(index_dir).is_dir():
        raise FileNotFoundError(f"index folder {index_dir} does not exist")
    if mode is not None and mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    index = CodeIndex.load(index_dir)
    encoder = LazyEncoder(lambda: encoder_for(index, model, cpu_backend))
    rerank_model = load_reranker(reranker) if reranker else None
    return [
        index.search(
            encoder,
            text,
            k=k,
            mode=mode,
            path=path,
            language=language,
            reranker=rerank_model,
            rerank_depth=rerank_depth,
        )
        for text in queries
    ]


class LazyEncoder:
    """The dense model, loaded on the first query that needs it (a BM25 search needs none)."""

    def __init__(self, load):
        self._load = load
        self._model = None

    def encode_queries(self, texts, **kwargs):
        if self._model is None:
            self._model = self._load()
        return self._model.encode_queries(texts, **kwargs)


def encoder_for(index, model: str | None, cpu_backend: str = "auto"):
    """The index's dense model (or `model`), refused when its vectors do not fit the index."""
    from mbert_retrieval.code.encoders import load_encoder, model_name

    encoder = load_encoder(model_name(model) if model is not None else index.model_name, cpu_backend)
    dim = encoder.encode_queries(["dimension check"]).shape[-1]
    if dim != index.meta["dim"]:
        raise ValueError(
            f"the model gives {dim}-dimensional vectors but {index.directory} holds "
            f"{index.meta['dim']}-dimensional ones (built with {index.model_name!r}); pass that model with --model"
        )
    return encoder


def hit_line(hit) -> str:
    return f"{hit.path}:{hit.start_line}  {hit.symbol or '-'}  {hit.score:.4f}"


def hit_record(hit) -> dict:
    return hit.record()


def register(app: typer.Typer) -> None:
    """Add `index-code` and `search-code` to a typer app."""
    app.command("index-code")(index_code)
    app.command("search-code")(search_code)


app = command_app("Code search: index a repository and search it.")
register(app)

if __name__ == "__main__":
    app()
