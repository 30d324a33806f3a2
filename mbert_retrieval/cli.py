"""The `mbert-retrieval` command line: index, search, evaluate, leaderboard (and train, when installed).

Exit codes: 0 success; 2 bad usage or bad input (a missing folder, a malformed file, an option that
does not fit the model); 1 any other failure. Errors are one line on stderr, without a traceback
(add --verbose before the command to get one for unexpected failures).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from mbert_retrieval import cli_errors
from mbert_retrieval.cli_errors import EXIT_FAILURE, BadInput, command_app, reports_errors

app = command_app(
    "Index, search and evaluate with ModernBERT retrieval models, BM25 and hybrids.", name="mbert-retrieval"
)


IndexKind = Literal["flat", "hnsw", "ivfpq", "plaid"]
OutputFormat = Literal["text", "json", "trec"]


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Log progress details, and print tracebacks of unexpected failures."
        ),
    ] = False,
):
    """Index, search and evaluate with ModernBERT retrieval models, BM25 and hybrids."""
    cli_errors.show_tracebacks = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )


# ------------------------------------------------------------------------------------------- options

SystemOption = Annotated[
    str,
    typer.Option(
        "--system",
        help="'bm25'; 'default' (the dense model shipped with the package); a model folder or hub id "
        "(sentence-transformers, dense or ColBERT; prefix with dense:, colbert: or st: to skip detection); "
        "or 'hybrid:<model>' for BM25 + the model fused by normalised scores.",
    ),
]
IndexOption = Annotated[
    IndexKind,
    typer.Option(
        "--index",
        help="First-stage index: flat (exact; exhaustive MaxSim for ColBERT), hnsw or ivfpq (single-vector "
        "models), plaid (ColBERT). Ignored for bm25.",
    ),
]
RerankOption = Annotated[
    str | None,
    typer.Option(
        "--rerank", help="Rerank the first stage's hits with this cross-encoder or ColBERT model folder."
    ),
]
FirstStageOption = Annotated[
    int, typer.Option("--first-stage-k", min=1, help="Hits the first stage passes to the reranker.")
]
DeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device", help="Device for the models, e.g. cpu or cuda:0 (default: cuda when available)."
    ),
]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
SplitIdentifiersOption = Annotated[
    bool,
    typer.Option(
        "--split-identifiers", help="BM25: also split snake_case and camelCase words (helps on code)."
    ),
]


# ------------------------------------------------------------------------------------------- commands


@app.command()
@reports_errors
def index(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Documents: a BEIR folder (its corpus.jsonl), a corpus .jsonl file, or a named set (beir:<name>, ...).",
        ),
    ],
    system: SystemOption,
    output: Annotated[Path, typer.Option("--output", help="Folder to save the index in.")],
    index_kind: IndexOption = "flat",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an index already saved in --output.")
    ] = False,
    split_identifiers: SplitIdentifiersOption = False,
    device: DeviceOption = None,
    progress: ProgressOption = True,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", min=0, help="Encode only this shard of the corpus (default: $RANK under torchrun)."
        ),
    ] = None,
    world_size: Annotated[
        int | None,
        typer.Option(
            "--world-size",
            min=1,
            help="Number of shards the corpus is cut in (default: $WORLD_SIZE under torchrun).",
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option("--merge", help="Only build the index from the finished shards in <output>/shards."),
    ] = False,
):
    """Encode a corpus and save a searchable index (documents, vectors and the models' names).

    Under `torchrun` (or with --rank/--world-size) every process encodes one shard of the corpus into
    <output>/shards; after all have finished, rank 0 builds the index from the shards (or run the
    command again with --merge). Finished shards are kept: re-running redoes only the missing ones."""
    position = shard_position(rank, world_size)
    if merge or position.world_size > 1:
        index_in_shards(data, system, output, index_kind, overwrite, device, progress, position, merge)
        return
    check_output_folder(output, overwrite, marker="retriever.json")
    corpus = read_documents(data)
    retriever = make_retriever(system, index_kind, None, 100, device, progress, split_identifiers)
    retriever.add(list(corpus), list(corpus.values()))
    retriever.save(output)
    rate = retriever.stats.documents_per_second
    typer.echo(
        f"indexed {len(retriever)} documents with {retriever.describe()} ({rate:,.1f} docs/s) -> {output}"
    )


@app.command()
@reports_errors
def search(
    index_dir: Annotated[
        Path,
        typer.Option(
            "--index", help="A folder saved by `mbert-retrieval index`, or a code index (`index-code`)."
        ),
    ],
    query: Annotated[
        list[str] | None, typer.Option("--query", "-q", help="A query (repeat the option for several).")
    ] = None,
    queries: Annotated[
        Path | None,
        typer.Option(
            "--queries", help="A file of queries: BEIR queries.jsonl ({'_id', 'text'}) or one query per line."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Hits per query.")] = 10,
    rerank: RerankOption = None,
    first_stage_k: FirstStageOption = 100,
    output_format: Annotated[
        OutputFormat,
        typer.Option("--format", help="text (readable), json (one line per query) or trec (a run file)."),
    ] = "text",
    output: Annotated[
        Path | None, typer.Option("--output", help="Write the results to this file instead of stdout.")
    ] = None,
    device: DeviceOption = None,
    progress: ProgressOption = False,
):
    """Search a saved index (or a code index) with one or more queries."""
    from mbert_retrieval.code.cli import is_code_index

    if not index_dir.is_dir():
        problem = "is a file, not an index folder" if index_dir.exists() else "does not exist"
        raise BadInput(f"--index {index_dir} {problem}")
    named = read_queries(query, queries)
    if is_code_index(index_dir):
        text = search_code_index(index_dir, named, top_k, rerank, first_stage_k, output_format)
    else:
        retriever = load_saved_retriever(index_dir, rerank, first_stage_k, device, progress)
        hits = retriever.search(list(named.values()), k=top_k)
        text = format_hits(named, hits, output_format)
    if output is None:
        typer.echo(text, nl=False)
    else:
        from mbert_retrieval.files import atomic_write_text

        atomic_write_text(output, text)
        typer.echo(f"wrote results of {len(named)} queries to {output}", err=True)


@app.command()
@reports_errors
def evaluate(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="A BEIR folder, or a named set: beir:<name>, mldr, coir:<name>, codesearchnet:<lang>.",
        ),
    ],
    system: Annotated[
        str,
        typer.Option(
            "--system",
            help="'bm25', 'default' (the shipped model), a model folder or hub id, 'hybrid:<model>', "
            "or a folder saved by `mbert-retrieval index`.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", help="Folder for metrics.json, run.trec, per_query.json and info.json."),
    ],
    index_kind: IndexOption = "flat",
    rerank: RerankOption = None,
    split: Annotated[str, typer.Option("--split", help="Which qrels to score: qrels/<split>.tsv.")] = "test",
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="Documents retrieved per query (Recall@100 needs 100).")
    ] = 100,
    first_stage_k: FirstStageOption = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Queries searched together.")] = 256,
    split_identifiers: SplitIdentifiersOption = False,
    device: DeviceOption = None,
    progress: ProgressOption = True,
):
    """Retrieve for every judged query of a data set and score the run (NDCG@10, MRR@10, Recall@100, MAP)."""
    from mbert_retrieval.evaluation.harness import evaluate_retriever
    from mbert_retrieval.evaluation.public import resolve_dataset

    dataset = resolve_dataset(data, split)
    report_dataset(dataset)
    if (Path(system) / "retriever.json").is_file():
        retriever = load_saved_retriever(Path(system), rerank, first_stage_k, device, progress)
    else:
        retriever = make_retriever(
            system, index_kind, rerank, first_stage_k, device, progress, split_identifiers
        )
    result = evaluate_retriever(
        retriever, dataset, k=top_k, batch_size=batch_size, output_dir=output, show_progress=progress
    )
    typer.echo(f"{retriever.describe()} on {dataset.summary()}")
    for name, value in result.metrics.items():
        typer.echo(f"  {name:<11}{value:.4f}")
    typer.echo(f"wrote {output / 'metrics.json'} and {output / 'run.trec'}")


@app.command()
@reports_errors
def leaderboard(
    config: Annotated[
        Path, typer.Option("--config", help="YAML or JSON file listing 'datasets' and 'systems'.")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Folder for leaderboard.md/.json/.png and runs/ (default: the config's 'output').",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Run everything again instead of reusing finished runs.")
    ] = False,
    device: DeviceOption = None,
    progress: ProgressOption = True,
):
    """Run every system on every data set of a config; write a Markdown table, JSON and a quality/throughput plot.

    Finished runs are cached under <output>/runs/ and reused while the config entry, the data and the
    model files are unchanged."""
    from mbert_retrieval.evaluation.leaderboard import load_config, require_datasets_exist, run_leaderboard

    parsed = load_config(config)
    require_datasets_exist(parsed)
    output = output or Path(parsed.output or "leaderboard")
    entries = run_leaderboard(parsed, output, force=force, device=device, show_progress=progress)
    reused = sum(e.cached for e in entries)
    typer.echo((output / "leaderboard.md").read_text(), nl=False)
    typer.echo(
        f"{len(entries)} runs ({reused} reused) -> {output}/leaderboard.md, leaderboard.json, leaderboard.png"
    )


@app.command("build-code-dataset")
@reports_errors
def build_code_dataset_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder of Python, Java, JavaScript, TypeScript or Go source (a repository, ...)."
        ),
    ],
    output: Annotated[Path, typer.Argument(help="Where to write the BEIR folder.")],
    split_by: Annotated[
        str, typer.Option("--split-by", help="Unit that never straddles splits: module (file) or package.")
    ] = "module",
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of pairs for test.")] = 0.2,
    dev_fraction: Annotated[
        float, typer.Option("--dev-fraction", help="Share of pairs for dev (0 for none).")
    ] = 0.1,
    min_query_words: Annotated[
        int, typer.Option("--min-query-words", help="Shorter docstring summaries are skipped.")
    ] = 3,
    max_functions: Annotated[
        int | None, typer.Option("--max-functions", help="Keep about this many pairs.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the unit shuffle.")] = 0,
    languages: Annotated[
        str, typer.Option("--languages", help="Comma-separated: python, java, javascript, typescript, go.")
    ] = "python,java,javascript,typescript,go",
    typescript_declarations: Annotated[
        bool,
        typer.Option("--typescript-declarations", help="Also read .d.ts files (doc comment -> signature)."),
    ] = False,
    progress: ProgressOption = True,
):
    """Turn a source tree into a CodeSearchNet-style set: doc comment summary -> function without it."""
    from mbert_retrieval.evaluation.code_dataset import build_code_dataset

    if split_by not in ("module", "package"):
        raise BadInput(f"--split-by must be module or package, got {split_by!r}")
    summary = build_code_dataset(
        source,
        output,
        split_by=split_by,
        test_fraction=test_fraction,
        dev_fraction=dev_fraction,
        min_query_words=min_query_words,
        max_functions=max_functions,
        seed=seed,
        languages=[name.strip() for name in languages.split(",") if name.strip()],
        typescript_declarations=typescript_declarations,
        show_progress=progress,
    )
    counts = ", ".join(f"{split} {n}" for split, n in summary.functions.items())
    problems = "".join(f", {n} skipped: {why}" for why, n in summary.file_problems.items())
    problems += "".join(f", {n} left out: {why}" for why, n in summary.files_left_out.items())
    typer.echo(f"{output}: {counts} query-function pairs from {summary.files_read} files{problems}")


@app.command("export-onnx")
@reports_errors
def export_onnx_command(
    model: Annotated[
        str, typer.Argument(help="Dense model folder or hub id; 'default' for the shipped model.")
    ],
    out: Annotated[
        Path,
        typer.Argument(
            help="ONNX file to write. Saved as MODEL/onnx/model.onnx, index-code, search-code and serve "
            "use it on machines without a GPU."
        ),
    ],
    quantize: Annotated[
        bool, typer.Option("--quantize/--no-quantize", help="int8 weights for the linear layers.")
    ] = True,
):
    """Export a dense model to ONNX for onnxruntime on the CPU (needs mbert-retrieval[onnx])."""
    from mbert_retrieval.models.onnx_backend import export_onnx

    if out.is_dir():
        raise BadInput(f"{out} is a folder; give the path of the .onnx file to write")
    export_onnx(None if model == "default" else model, out, quantize=quantize)
    typer.echo(
        f"{out}: {out.stat().st_size / 2**20:.1f} MB ({'int8' if quantize else 'float32'} linear layers)"
    )


# ------------------------------------------------------------------------------------------- helpers


def load_saved_retriever(folder: Path, rerank, first_stage_k, device, progress):
    """A Retriever saved by `index`, with the reranker and first-stage depth of the options."""
    from mbert_retrieval.search.models import canonical_name
    from mbert_retrieval.search.retriever import Retriever

    retriever = Retriever.load(
        folder,
        reranker_name=canonical_name(rerank) if rerank else None,
        device=device,
        show_progress=progress,
    )
    retriever.first_stage_k = first_stage_k
    return retriever


def make_retriever(system, index_kind, rerank, first_stage_k, device, progress, split_identifiers):
    """A Retriever for the options; option combinations that do not fit are bad input."""
    from mbert_retrieval.search.models import build_retriever

    try:
        return build_retriever(
            system,
            index_kind,
            rerank,
            first_stage_k=first_stage_k,
            device=device,
            show_progress=progress,
            bm25_settings={"split_identifiers": split_identifiers},
        )
    except OSError as err:  # a model that is not there (transformers raises OSError)
        raise BadInput(str(err)) from err


def search_code_index(index_dir, named: dict[str, str], k, rerank, first_stage_k, output_format) -> str:
    """`search` over a code index (built by `index-code`), in the same output formats."""
    from mbert_retrieval.code.cli import hit_line, hit_record, run_code_search

    try:
        hits = run_code_search(
            index_dir, list(named.values()), k, reranker=rerank, rerank_depth=max(first_stage_k, k)
        )
    except OSError as err:  # a model that is not there (transformers raises OSError)
        raise BadInput(str(err)) from err
    return format_hits(named, hits, output_format, record=hit_record, trec_id=code_hit_id, line=hit_line)


def code_hit_id(hit) -> str:
    return f"{hit.path}:{hit.start_line}-{hit.end_line}"


def check_output_folder(folder: Path, overwrite: bool, marker: str, allowed: tuple[str, ...] = ()) -> None:
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"--output {folder} is a file")
    if folder.is_dir() and any(p.name not in allowed for p in folder.iterdir()):
        if not (folder / marker).exists():
            raise BadInput(f"--output {folder} is a non-empty folder that is not an index; choose another")
        if not overwrite:
            raise BadInput(f"--output {folder} already holds an index (pass --overwrite to replace it)")


@dataclass
class ShardPosition:
    rank: int
    world_size: int
    local_rank: int
    from_launcher: bool  # set by torchrun (whose ranks can meet at a barrier), not by options


def shard_position(rank: int | None, world_size: int | None) -> ShardPosition:
    """This process's shard: --rank / --world-size, else torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    from_launcher = rank is None and world_size is None and "WORLD_SIZE" in os.environ
    try:
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise BadInput(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {err}") from None
    if not 0 <= rank < world_size:
        raise BadInput(f"rank {rank} is not between 0 and world size {world_size} - 1")
    return ShardPosition(rank, world_size, local_rank, from_launcher)


def index_in_shards(data, system, output, index_kind, overwrite, device, progress, position, merge_only):
    """Encode this process's shard of the corpus (unless merging only); then, on rank 0 once every shard
    is done, build the index from the shards."""
    from mbert_retrieval.models.loading import resolve
    from mbert_retrieval.search import sharded
    from mbert_retrieval.search.models import canonical_name, load_search_model
    from mbert_retrieval.search.retriever import check_first_stage

    if system == "bm25" or system.startswith("hybrid:"):
        raise BadInput(
            "indexing in shards needs a model: --system bm25 and hybrid: systems are not supported"
        )
    check_output_folder(output, overwrite, marker="retriever.json", allowed=("shards",))
    model_name = canonical_name(system)
    fingerprint = sharded.model_digest(resolve(model_name)[1])
    corpus = read_documents(data)
    ids, texts = list(corpus), list(corpus.values())
    shards_dir = output / "shards"
    rank, world_size = position.rank, position.world_size
    if not merge_only:
        if device is None and torch_cuda_available():
            device = f"cuda:{position.local_rank}"
        model = load_search_model(model_name, device=device)
        check_first_stage(model, index_kind, False)
        status = sharded.encode_shard(
            shards_dir,
            rank,
            world_size,
            ids,
            texts,
            model,
            model_name,
            model_fingerprint=fingerprint,
            show_progress=progress,
            progress_position=position.local_rank,
        )
        done = "encoded" if status.encoded else "kept (already done for this model and corpus)"
        typer.echo(
            f"shard {rank + 1}/{world_size}: {done}, {status.n_documents} documents -> {status.folder}"
        )
        met = position.from_launcher and wait_for_every_rank()
        if rank != 0:
            return
        unfinished = [
            r
            for r in range(world_size)
            if not (sharded.shard_folder(shards_dir, r, world_size) / sharded.SHARD_MANIFEST).exists()
        ]
        if unfinished and not met:
            typer.echo(
                f"{len(unfinished)} of {world_size} shards are not finished yet (rank {unfinished[0]} first); "
                "when they are, build the index with the same command and --merge"
            )
            return
    shards = sharded.read_shards(
        shards_dir, model_name=model_name, model_fingerprint=fingerprint, corpus=(ids, texts)
    )
    n_documents = sharded.merge_shards(shards, output, index_kind, device=device, show_progress=progress)
    typer.echo(
        f"indexed {n_documents} documents from {len(shards)} shards with {model_name} [{index_kind}] -> {output}"
    )


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def wait_for_every_rank() -> bool:
    """A barrier over the ranks torchrun started (gloo: it needs no GPU); False when there is none."""
    import torch.distributed as dist

    if not dist.is_available() or "MASTER_ADDR" not in os.environ:
        return False
    dist.init_process_group("gloo", timeout=timedelta(hours=72))  # ranks may finish hours apart
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return True


def read_documents(data: str) -> dict[str, str]:
    from mbert_retrieval.evaluation.data import DataFormatError, document_text, read_corpus, report_problems
    from mbert_retrieval.evaluation.public import resolve_dataset

    path = Path(data)
    if path.is_file():
        corpus_file = path
    elif (path / "corpus.jsonl").exists():
        corpus_file = path / "corpus.jsonl"
    elif ":" in data or data.lower() == "mldr":
        return {i: document_text(d) for i, d in resolve_dataset(data).corpus.items()}
    else:
        raise DataFormatError(f"--data {data}: neither a corpus .jsonl file nor a folder with corpus.jsonl")
    problems: Counter = Counter()
    corpus = read_corpus(corpus_file, problems)
    report_problems(corpus_file, problems)
    return {i: document_text(d) for i, d in corpus.items()}


def read_queries(query: list[str] | None, queries_file: Path | None) -> dict[str, str]:
    """{query id: text} from --query options (ids q1, q2, ...) and/or a --queries file."""
    named = {f"q{n}": text for n, text in enumerate(query or [], start=1)}
    if queries_file is not None:
        if not queries_file.is_file():
            raise BadInput(f"--queries {queries_file}: no such file")
        if queries_file.suffix == ".jsonl":
            from mbert_retrieval.evaluation.data import read_queries as read_beir_queries

            from_file = read_beir_queries(queries_file, Counter())
        else:
            lines = [line.strip() for line in read_text_file(queries_file).splitlines() if line.strip()]
            from_file = {f"q{n}": text for n, text in enumerate(lines, start=len(named) + 1)}
        if not from_file:
            raise BadInput(f"--queries {queries_file}: the file has no queries")
        named.update(from_file)
    if not named:
        raise BadInput("give at least one --query or a --queries file")
    if any(not text.strip() for text in named.values()):
        raise BadInput("queries must not be empty")
    return named


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text (byte {err.start})") from None


def document_record(hit) -> dict:
    return {"id": hit.id, "score": hit.score}


def document_line(hit) -> str:
    preview = " ".join(hit.text.split())[:80]
    return f"{hit.score:9.4f}  {hit.id}  {preview}"


def format_hits(
    named: dict[str, str],
    hits,
    output_format: OutputFormat,
    record: Callable[[Any], dict] = document_record,
    trec_id: Callable[[Any], str] = attrgetter("id"),
    line: Callable[[Any], str] = document_line,
) -> str:
    """The rankings as JSON lines (`record` of each hit), a TREC run or text (`line` of each hit)."""
    lines = []
    for (query_id, text), ranking in zip(named.items(), hits):
        if output_format == "json":
            row = {"query_id": query_id, "query": text, "hits": [record(h) for h in ranking]}
            lines.append(json.dumps(row))
        elif output_format == "trec":
            lines += [
                f"{query_id} Q0 {trec_id(h)} {rank} {h.score:.6f} mbert-retrieval"
                for rank, h in enumerate(ranking, 1)
            ]
        else:
            lines.append(f"[{query_id}] {text}")
            lines += [f"  {rank:>3}. {line(h)}" for rank, h in enumerate(ranking, 1)]
    return "\n".join(lines) + "\n"


def report_dataset(dataset) -> None:
    typer.echo(dataset.summary(), err=True)
    for what, count in sorted(dataset.problems.items()):
        typer.echo(f"warning: {count} {what}", err=True)


def register_train_command() -> None:
    """`mbert-retrieval train ...` comes from mbert_retrieval.training.cli when that module is installed.

    If it is there but fails to import, the other commands keep working and `train` reports why."""
    try:
        training_cli = importlib.import_module("mbert_retrieval.training.cli")
    except ModuleNotFoundError as err:
        if err.name in ("mbert_retrieval.training", "mbert_retrieval.training.cli"):
            return
        import_error = err
    except Exception as err:  # a broken training module must not take the other commands down
        import_error = err
    else:
        train_app = getattr(training_cli, "app", None) or training_cli.train_app
        app.add_typer(train_app, name="train", help=train_app.info.help)
        return

    @app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def train_unavailable():
        """Train retrieval models (unavailable: the training module failed to import)."""
        typer.echo(f"error: the training commands could not be loaded: {import_error}", err=True)
        raise typer.Exit(EXIT_FAILURE)


register_train_command()
importlib.import_module("mbert_retrieval.code.cli").register(app)  # index-code, search-code
importlib.import_module("mbert_retrieval.server.cli").register(app)  # serve

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
