"""The offline CodeSearchNet-style builder, checked against Python's own view of the functions."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
from mbert_retrieval.evaluation.code_dataset import build_code_dataset
from mbert_retrieval.evaluation.data import DataFormatError, load_beir

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def email_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("email_set")
    summary = build_code_dataset(STDLIB / "email", out, show_progress=False)
    return out, summary


def split_files(folder: Path, split: str) -> set[str]:
    data = load_beir(folder, split)
    return {doc_id.split(":")[0] for docs in data.qrels.values() for doc_id in docs}


def test_layout_and_splits(email_set):
    folder, summary = email_set
    for split in ("train", "dev", "test"):
        data = load_beir(folder, split)
        assert len(data.qrels) == summary.functions[split] > 0
        assert all(len(docs) == 1 for docs in data.qrels.values())
    files = {split: split_files(folder, split) for split in ("train", "dev", "test")}
    assert not files["train"] & files["test"]
    assert not files["train"] & files["dev"]
    assert not files["dev"] & files["test"]
    assert files["test"] == set(summary.units["test"])
    record = json.loads((folder / "build.json").read_text())
    assert record["functions"] == summary.functions
    total = sum(summary.functions.values())
    assert 0.1 * total < summary.functions["test"] < 0.35 * total


def test_pairs_match_the_live_functions(email_set):
    """Query = inspect's docstring, first paragraph; document = source minus the docstring."""
    folder, _ = email_set
    data = load_beir(folder, "test")
    checked = 0
    for query_id, docs in data.qrels.items():
        doc_id = next(iter(docs))
        path, qualname = doc_id.split(":")
        if "@" in qualname:
            continue
        module = importlib.import_module(
            "email." + path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        )
        function = module
        for part in qualname.split("."):
            function = getattr(function, part)
        function = inspect.unwrap(function.fget if isinstance(function, property) else function)
        expected_query = " ".join(inspect.getdoc(function).split("\n\n")[0].split())
        assert data.queries[query_id] == expected_query
        code = data.corpus[doc_id]["text"]
        tree = ast.parse(code)  # dedented, it is valid Python on its own
        node = tree.body[0]
        assert (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == qualname.split(".")[-1]
        )
        assert ast.get_docstring(node) is None
        source_lines = inspect.getsource(function).splitlines()
        assert len(code.splitlines()) < len(source_lines)
        checked += 1
    assert checked >= 10


def test_edge_cases(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text(
        '''
import functools


@functools.lru_cache
def decorated(x):
    """Return x squared, cached for later.

    More details that are not part of the query.
    """
    return x * x


def only_docstring():
    """This function has no body at all."""


def placeholder():
    """Subclasses must implement this one."""
    raise NotImplementedError


def short():
    """Too short."""
    return 1


def outer():
    """Outer function with a nested helper."""

    def inner():
        """Inner helper is not a pair of its own."""
        return 2

    return inner()


class Box:
    """A box."""

    def open(self, force=False):
        """Open the box, even when locked if forced."""
        return force
'''
    )
    (src / "b.py").write_text('def other():\n    """Compute another value from nothing."""\n    return 3\n')
    (src / "c.py").write_text('def third():\n    """Compute a third value from nothing."""\n    return 4\n')
    (src / "broken.py").write_text("def (:\n")
    (src / "tests").mkdir()
    (src / "tests" / "test_x.py").write_text(
        'def test_it():\n    """Tests are skipped by default here."""\n    assert 1\n'
    )
    summary = build_code_dataset(
        src, tmp_path / "out", dev_fraction=0.2, test_fraction=0.2, show_progress=False
    )
    assert summary.files_skipped == 1
    assert summary.skipped["no code besides the docstring"] == 2
    assert summary.skipped["query shorter than min_query_words"] == 1
    queries = {}
    corpus = {}
    for split in ("train", "dev", "test"):
        data = load_beir(tmp_path / "out", split)
        queries.update({next(iter(d)): data.queries[q] for q, d in data.qrels.items()})
        corpus.update({i: d["text"] for i, d in data.corpus.items()})
    assert set(queries) == {"a.py:decorated", "a.py:outer", "a.py:Box.open", "b.py:other", "c.py:third"}
    assert queries["a.py:decorated"] == "Return x squared, cached for later."
    assert corpus["a.py:decorated"] == "@functools.lru_cache\ndef decorated(x):\n    return x * x"
    assert corpus["a.py:Box.open"] == "def open(self, force=False):\n    return force"
    assert "Inner helper" in corpus["a.py:outer"]  # nested docstrings stay part of the outer code


def test_package_split_and_determinism(tmp_path):
    src = tmp_path / "lib"
    for package in ("json", "email", "http", "urllib", "logging", "xml"):
        shutil.copytree(STDLIB / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    first = build_code_dataset(src, tmp_path / "a", split_by="package", show_progress=False)
    again = build_code_dataset(src, tmp_path / "b", split_by="package", show_progress=False)
    other = build_code_dataset(src, tmp_path / "c", split_by="package", seed=7, show_progress=False)
    assert first.units == again.units
    assert (tmp_path / "a" / "qrels" / "test.tsv").read_text() == (
        tmp_path / "b" / "qrels" / "test.tsv"
    ).read_text()
    assert other.units != first.units
    packages = {
        s: {f.split("/")[0] for f in split_files(tmp_path / "a", s)} for s in ("train", "dev", "test")
    }
    assert packages["test"] == set(first.units["test"])
    assert not packages["train"] & packages["test"] and not packages["dev"] & packages["test"]
    capped = build_code_dataset(src, tmp_path / "d", split_by="module", max_functions=60, show_progress=False)
    assert 20 <= sum(capped.functions.values()) <= 90


def test_bad_inputs(tmp_path):
    with pytest.raises(DataFormatError, match="no such folder"):
        build_code_dataset(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.py").write_text("x = 1\n")
    with pytest.raises(DataFormatError, match="no documented Python functions"):
        build_code_dataset(tmp_path / "empty", tmp_path / "out", show_progress=False)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.py").write_text('def f():\n    """Do one single thing."""\n    return 1\n')
    with pytest.raises(DataFormatError, match="at least 3"):
        build_code_dataset(tmp_path / "one", tmp_path / "out", show_progress=False)
    with pytest.raises(ValueError, match="fraction"):
        build_code_dataset(tmp_path / "one", tmp_path / "out", test_fraction=0.8, dev_fraction=0.3)
