"""Bad data and interrupted saves: one-line errors that name the file, and no debris left behind."""

from __future__ import annotations

import json

import pytest
from mbert_retrieval.evaluation.data import DataFormatError, load_beir, save_beir
from typer.testing import CliRunner

from mbert_retrieval.cli import app

CORPUS = {
    "d1": {"title": "Sorting", "text": "sorted(xs) returns a new sorted list"},
    "d2": {"title": "", "text": "list.sort() sorts in place"},
    "d3": {"title": "Files", "text": "open(path) returns a file object"},
}
QUERIES = {"q1": "how to sort a list", "q2": "open a file", "q3": ""}
QRELS = {"test": {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 2}, "q3": {"d2": 1}}}


@pytest.fixture
def folder(tmp_path):
    return save_beir(tmp_path / "set", CORPUS, QUERIES, QRELS)


def replace_with_folder(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        (lambda f: (f / "qrels" / "test.tsv").write_bytes(bytes(range(256)) * 4), "test.tsv", "not UTF-8"),
        (
            lambda f: (f / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "\xff\xfe"}\n'),
            "queries.jsonl",
            "line 1 is not UTF-8",
        ),
        (lambda f: replace_with_folder(f / "corpus.jsonl"), "corpus.jsonl", "is a folder"),
        (lambda f: replace_with_folder(f / "queries.jsonl"), "queries.jsonl", "is a folder"),
        (lambda f: replace_with_folder(f / "qrels" / "test.tsv"), "test.tsv", "is a folder"),
        (lambda f: (f / "qrels" / "test.tsv").write_text("q1\td1\t1\rq2\td3\t1\n"), "test.tsv", "line 1"),
    ],
    ids=["binary-qrels", "latin1-queries", "corpus-folder", "queries-folder", "qrels-folder", "bare-cr"],
)
def test_unreadable_files_are_data_format_errors(folder, damage, file, problem):
    damage(folder)
    with pytest.raises(DataFormatError) as err:
        load_beir(folder)
    message = str(err.value)
    assert file in message and problem in message and "\n" not in message, message


def test_cli_reports_a_binary_qrels_file_in_one_line(folder, tmp_path):
    (folder / "qrels" / "test.tsv").write_bytes(b"\x80\x81\x00garbage\xff" * 50)
    result = CliRunner().invoke(
        app, ["evaluate", "--data", str(folder), "--system", "bm25", "--output", str(tmp_path / "run")]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "test.tsv: line 1 is not UTF-8" in result.output


def test_an_empty_query_gets_no_results_and_scores_zero(folder, tmp_path):
    """BEIR-style evaluation over a query set with an empty query: that query scores 0, the others as usual."""
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--data",
            str(folder),
            "--system",
            "bm25",
            "--output",
            str(tmp_path / "run"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    per_query = json.loads((tmp_path / "run" / "per_query.json").read_text())
    assert set(per_query) == {"q1", "q2", "q3"}
    assert all(value == 0 for value in per_query["q3"].values())
    assert per_query["q1"]["NDCG@10"] > 0 and per_query["q2"]["NDCG@10"] > 0
    run_lines = (tmp_path / "run" / "run.trec").read_text().splitlines()
    assert run_lines and not any(line.startswith("q3 ") for line in run_lines)
    assert json.loads((tmp_path / "run" / "info.json").read_text())["empty_queries"] == 1
