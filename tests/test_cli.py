"""The mbert-retrieval command line, end to end on a small real code set, and its handling of bad input."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from mbert_retrieval.evaluation.data import load_beir
from typer.main import get_command
from typer.testing import CliRunner

from mbert_retrieval.cli import app

STDLIB = Path(sysconfig.get_paths()["stdlib"])
METRIC_KEYS = {"NDCG@10", "MRR@10", "Recall@100", "MAP"}
runner = CliRunner()


def cli(command: str, *args, code: int = 0):
    """Run `mbert-retrieval <command> <args>` in-process; check the exit code and that no traceback shows."""
    argv = shlex.split(command) + [str(a) for a in args]
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}"
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def code_data(tmp_path_factory):
    """A CodeSearchNet-style set built, through the CLI, from copies of stdlib packages."""
    root = tmp_path_factory.mktemp("cli")
    for package in ("json", "email"):
        shutil.copytree(
            STDLIB / package, root / "src" / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    assert "query-function pairs" in cli(
        f"build-code-dataset {root}/src {root}/data --max-functions 60 --no-progress"
    )
    return root / "data"


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_mlm_dir):
    from mbert_retrieval.models.colbert import ColBERT
    from mbert_retrieval.models.cross_encoder import CrossEncoder
    from mbert_retrieval.models.dense import DenseRetriever

    root = tmp_path_factory.mktemp("models")
    DenseRetriever.from_pretrained(hf_mlm_dir, max_length=128, device="cpu").save_pretrained(root / "dense")
    colbert = ColBERT.from_pretrained(hf_mlm_dir, query_length=16, document_length=96, device="cpu")
    colbert.save_pretrained(root / "colbert")
    CrossEncoder.from_pretrained(hf_mlm_dir, max_length=128, device="cpu").save_pretrained(root / "cross")
    return root


def read_metrics(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    return metrics


def test_index_search_evaluate_bm25(code_data, tmp_path):
    cli(f"index --data {code_data} --system bm25 --output {tmp_path}/ix --no-progress")
    data = load_beir(code_data, "test")
    query = next(iter(data.queries.values()))
    text = cli(f"search --index {tmp_path}/ix -k 3 -q", query, "-q", "decode a JSON document")
    assert text.count("[q") == 2 and "1." in text

    (tmp_path / "queries.txt").write_text(f"{query}\n\nserialize an object\n")
    cli(
        f"search --index {tmp_path}/ix --queries {tmp_path}/queries.txt --format json --output {tmp_path}/hits.jsonl"
    )
    rows = [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()]
    assert [r["query"] for r in rows] == [query, "serialize an object"] and len(rows[0]["hits"]) == 10

    trec = cli(f"search --index {tmp_path}/ix --queries {code_data}/queries.jsonl --format trec")
    per_query = {}
    for line in trec.splitlines():
        query_id, _, _, rank, _, _ = line.split()
        per_query.setdefault(query_id, []).append(int(rank))
    n_queries = len((code_data / "queries.jsonl").read_text().splitlines())
    assert 0.8 * n_queries <= len(per_query) <= n_queries  # a query matching no word gets no lines
    assert all(ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= 10 for ranks in per_query.values())

    output = cli(f"evaluate --data {code_data} --system bm25 --split test --output {tmp_path}/eval")
    metrics = read_metrics(tmp_path / "eval")
    assert f"{metrics['NDCG@10']:.4f}" in output
    run_lines = (tmp_path / "eval" / "run.trec").read_text().splitlines()
    assert {line.split()[0] for line in run_lines} <= set(data.queries)
    # The saved index evaluates to the same numbers as a fresh BM25.
    cli(f"evaluate --data {code_data} --system {tmp_path}/ix --output {tmp_path}/eval2 --no-progress")
    assert read_metrics(tmp_path / "eval2") == metrics


@pytest.mark.slow
def test_evaluate_models(code_data, models, tmp_path):
    common = f"--data {code_data} --top-k 20 --no-progress"
    cli(f"evaluate {common} --system {models}/dense --index hnsw --rerank {models}/cross --first-stage-k 10 "
        f"--output {tmp_path}/dense")  # fmt: skip
    read_metrics(tmp_path / "dense")
    info = json.loads((tmp_path / "dense" / "info.json").read_text())
    assert "rerank" in info["system"] and info["documents_per_second"] > 0
    cli(f"evaluate {common} --system {models}/colbert --index plaid --output {tmp_path}/plaid")
    read_metrics(tmp_path / "plaid")
    cli(f"evaluate {common} --system hybrid:{models}/dense --output {tmp_path}/hybrid")
    read_metrics(tmp_path / "hybrid")
    cli(
        f"index --data {code_data}/corpus.jsonl --system {models}/colbert --output {tmp_path}/cix --no-progress"
    )
    out = cli(f"search --index {tmp_path}/cix --rerank {models}/cross -k 2 -q", "parse a header")
    assert out.count("  1. ") == 1 and out.count("  2. ") == 1


@pytest.mark.slow
def test_leaderboard_table_plot_and_cache(code_data, models, tmp_path):
    config = tmp_path / "board.yaml"
    config.write_text(
        f"datasets:\n  - name: stdlib\n    data: {code_data}\n"
        f"systems:\n  - bm25\n  - name: tiny-dense\n    system: {models / 'dense'}\n"
    )
    board_command = f"leaderboard --config {config} --output {tmp_path}/board --no-progress"
    assert "2 runs (0 reused)" in cli(board_command)
    out = tmp_path / "board"
    table = (out / "leaderboard.md").read_text()
    assert "| system | stdlib | mean NDCG@10" in table and "| bm25 |" in table and "| tiny-dense |" in table
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {row["system"]: row for row in board["systems"]}
    assert set(rows) == {"bm25", "tiny-dense"}
    assert rows["bm25"]["mean"] == read_metrics(out / "runs" / "bm25__stdlib")
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "2 runs (2 reused)" in cli(board_command)
    (code_data / "qrels" / "test.tsv").touch()  # changed data: nothing reused
    assert "2 runs (0 reused)" in cli(board_command)
    assert "2 runs (0 reused)" in cli(board_command + " --force")


def test_bad_input_exit_codes(code_data, models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(code_data, bad)
    with (bad / "corpus.jsonl").open("a") as f:
        f.write("{oops\n")
    out = f"--output {tmp_path}/o"
    assert "not valid JSON" in cli(f"evaluate --data {bad} --system bm25 {out}", code=2)
    (bad / "corpus.jsonl").write_text("")
    assert "corpus is empty" in cli(f"index --data {bad} --system bm25 --output {tmp_path}/i", code=2)
    assert "no such folder" in cli(f"evaluate --data {tmp_path}/missing --system bm25 {out}", code=2)
    assert "validation.tsv is missing" in cli(
        f"evaluate --data {code_data} --system bm25 --split validation {out}", code=2
    )
    assert "does not exist" in cli(f"evaluate --data {code_data} --system {tmp_path}/no-model {out}", code=2)
    message = cli(f"evaluate --data {code_data} --system {models}/colbert --index hnsw {out}", code=2)
    assert "does not fit a ColBERT model" in message
    assert "cross-encoder" in cli(f"evaluate --data {code_data} --system {models}/cross {out}", code=2)
    cli(f"evaluate --data {code_data} --system bm25 --index annoy {out}", code=2)
    cli(f"evaluate --data {code_data} --system bm25", code=2)  # --output missing
    assert "not a saved retriever" in cli(f"search --index {tmp_path} -q x", code=2)
    assert "no such config" in cli(f"leaderboard --config {tmp_path}/none.yaml", code=2)
    (tmp_path / "c.yaml").write_text("systems: [bm25]\n")
    assert "'datasets'" in cli(f"leaderboard --config {tmp_path}/c.yaml", code=2)

    index = f"index --data {code_data} --system bm25 --output {tmp_path}/ix --no-progress"
    cli(index)
    assert "--overwrite" in cli(index, code=2)
    cli(index + " --overwrite")
    assert "at least one --query" in cli(f"search --index {tmp_path}/ix", code=2)


def test_help_documents_every_option():
    group = get_command(app)
    assert {"index", "search", "evaluate", "leaderboard"} <= set(group.commands)
    for name, command in group.commands.items():
        if name == "train":
            continue
        output = cli(f"{name} --help")
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.opts} has no help"
                assert param.opts[0] in output, f"{name} --help does not show {param.opts[0]}"


@pytest.mark.slow
def test_console_script_exit_code():
    script = Path(sys.executable).parent / "mbert-retrieval"
    bad = subprocess.run(
        [script, "evaluate", "--data", "/nonexistent", "--system", "bm25", "--output", "/tmp/x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
