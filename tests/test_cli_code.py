"""The command line around code indexes and the one-line errors of `search` and `--system`."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sysconfig
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mbert_retrieval.cli import app

STDLIB = Path(sysconfig.get_paths()["stdlib"])
HIT_LINE = re.compile(r"^\S+:\d+  \S+  -?\d+\.\d{4}$")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def cli(command: str, *args, code: int = 0) -> str:
    """Run `mbert-retrieval <command> <args>` in-process; check the exit code and that no traceback shows."""
    argv = shlex.split(command) + [str(a) for a in args]
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}"
    assert "Traceback" not in result.output
    if code:
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.output.strip() == errors[0], result.output  # one line
    return result.output


@pytest.fixture(scope="module")
def code_index(tmp_path_factory, hf_mlm_dir):
    """A small repository (json package, a JS file and a .env) indexed through the CLI."""
    tmp = tmp_path_factory.mktemp("cli_code")
    repo = tmp / "repo"
    shutil.copytree(STDLIB / "json", repo / "json", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "web").mkdir()
    (repo / "web" / "cart.js").write_text("export function addToCart(cart, item) {\n  cart.push(item);\n}\n")
    (repo / ".env").write_text("STRIPE_KEY=sk_live_supersecretvalue\n")
    output = cli(f"index-code {repo} --index {tmp / 'index'} --model {hf_mlm_dir}")
    assert "1 secret" in output and "--include-secrets" in output
    return repo, tmp / "index"


def test_search_code_prints_path_line_symbol_score(code_index):
    _, index = code_index
    output = cli(f"search-code {index} decode a JSON document from a string --mode bm25 -k 5")
    lines = output.splitlines()
    assert len(lines) == 5 and all(HIT_LINE.match(line) for line in lines), output
    assert any(line.split()[1] in ("JSONDecoder.decode", "loads") for line in lines)
    scores = [float(line.split()[-1]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_search_code_filters_json_output_and_dense_mode(code_index):
    _, index = code_index
    hits = json.loads(cli(f"search-code {index} add an item to the cart --json --language javascript"))
    assert [h["path"] for h in hits] == ["web/cart.js"] and hits[0]["symbol"] == "addToCart"
    assert {"path", "start_line", "end_line", "symbol", "kind", "language", "score", "snippet"} == set(
        hits[0]
    )
    hits = json.loads(cli(f"search-code {index} scanner --json --path 'json/s*.py' --mode dense -k 50"))
    assert hits and {h["path"] for h in hits} <= {"json/scanner.py"}
    module = json.loads(cli(f"search-code {index} import re --json --path json/scanner.py -k 50"))
    assert {h["symbol"] for h in module if h["kind"] == "module"} == {"json.scanner"}


def test_search_code_bad_input_is_one_line(code_index, tmp_path):
    _, index = code_index
    assert "does not exist" in cli(f"search-code {tmp_path / 'missing'} x", code=2)
    assert "not a code index" in cli(f"search-code {tmp_path} x", code=2)
    assert "--mode must be one of" in cli(f"search-code {index} x --mode fuzzy", code=2)
    assert "unknown language" in cli(f"search-code {index} x --language klingon --mode bm25", code=2)
    assert "must not contain '..'" in cli(f"search-code {index} x --path '../*' --mode bm25", code=2)


def test_include_secrets_indexes_them(code_index, tmp_path, hf_mlm_dir):
    repo, _ = code_index
    cli(f"index-code {repo} --index {tmp_path / 'index'} --model {hf_mlm_dir} --include-secrets")
    hits = json.loads(cli(f"search-code {tmp_path / 'index'} STRIPE_KEY --mode bm25 --json"))
    assert hits[0]["path"] == ".env"


def test_search_recognises_a_code_index(code_index, tmp_path):
    _, index = code_index
    output = cli(f"search --index {index} -q 'decode a JSON document' -q 'add to cart' -k 3")
    assert output.startswith("[q1] decode a JSON document\n")
    hit_lines = [line.split(". ", 1)[1] for line in output.splitlines() if not line.startswith("[")]
    assert len(hit_lines) == 6 and all(HIT_LINE.match(line) for line in hit_lines), output
    rows = [json.loads(line) for line in cli(f"search --index {index} -q cart --format json").splitlines()]
    assert rows[0]["query_id"] == "q1" and rows[0]["hits"][0]["path"] == "web/cart.js"


def test_search_errors_name_the_real_problem(code_index, tmp_path):
    _, index = code_index
    assert "does not exist" in cli(f"search --index {tmp_path / 'missing'} -q x", code=2)
    (tmp_path / "empty.txt").write_text("\n  \n")
    message = cli(f"search --index {index} --queries {tmp_path / 'empty.txt'}", code=2)
    assert "empty.txt: the file has no queries" in message
    (tmp_path / "empty.jsonl").write_text("")
    assert "has no queries" in cli(f"search --index {index} --queries {tmp_path / 'empty.jsonl'}", code=2)


def test_a_malformed_jsonl_line_is_reported_whole_on_one_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "d1", "text": "fine"}\n{"_id": "d2", "text": oops}\n')
    message = cli(f"index --data {corpus} --system bm25 --output {tmp_path / 'ix'} --no-progress", code=2)
    assert str(corpus) in message and "line 2: not valid JSON" in message and "column 23" in message


@pytest.fixture
def shipped_model(tmp_path, hf_mlm_dir, monkeypatch):
    """A tiny dense model standing in for the shipped one; any hub download fails the test."""
    from mbert_retrieval.modeling import io
    from mbert_retrieval.models import dense

    folder = tmp_path / "default_model"
    dense.DenseRetriever.from_pretrained(hf_mlm_dir, max_length=64, device="cpu").save_pretrained(folder)
    monkeypatch.setattr(dense, "DEFAULT_MODEL_DIR", folder)

    def no_hub(name):
        raise AssertionError(f"tried the hub for {name!r}")

    monkeypatch.setattr(io, "_download", no_hub)
    return folder


def test_system_default_is_the_shipped_model(shipped_model, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(4)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a folder named like it in the working directory does not count
    output = cli(f"index --data {corpus} --system default --output {tmp_path / 'ix'} --no-progress")
    assert "indexed 4 documents" in output
    assert json.loads((tmp_path / "ix" / "retriever.json").read_text())["model"] == "default"
    assert "[q1] document 2" in cli(f"search --index {tmp_path / 'ix'} -q 'document 2' -k 2")
    assert "indexed 4" in cli(
        f"index --data {corpus} --system hybrid:default --output {tmp_path / 'h'} --no-progress"
    )


def test_system_default_without_a_shipped_model_is_a_clear_error(shipped_model, tmp_path, monkeypatch):
    from mbert_retrieval.models import dense

    monkeypatch.setattr(dense, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "text": "x"}) + "\n")
    message = cli(f"index --data {corpus} --system default --output {tmp_path / 'ix'} --no-progress", code=2)
    assert "shipped with mbert-retrieval" in message
