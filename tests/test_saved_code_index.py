"""A code index saved by an earlier version (tests/data/saved_code_index, written by
tests/data/write_saved_code_index.py) still loads, and gives the hits it gave when saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hashing_models import HashingEncoder

from mbert_retrieval.code.index import CodeIndex, build_code_index

SAVED = Path(__file__).parent / "data" / "saved_code_index"
EXPECTED = json.loads((SAVED / "expected_hits.json").read_text())


def hits_of(index: CodeIndex, mode: str) -> list:
    model = HashingEncoder()
    return [
        [[h.path, h.start_line, h.symbol, h.score] for h in index.search(model, q, k=4, mode=mode)]
        for q in EXPECTED["queries"]
    ]


@pytest.mark.parametrize("mode", sorted(EXPECTED["hits"]))
def test_saved_code_index_gives_the_same_hits(mode):
    got = hits_of(CodeIndex.load(SAVED / "index"), mode)
    for row, want in zip(got, EXPECTED["hits"][mode]):
        assert [h[:3] for h in row] == [h[:3] for h in want]
        np.testing.assert_allclose([h[3] for h in row], [h[3] for h in want], rtol=1e-5, atol=1e-6)


def test_an_update_over_a_saved_code_index_keeps_its_hits(tmp_path):
    """Rebuilt by this version from the same files, the index gives the same hits."""
    saved = CodeIndex.load(SAVED / "index")
    repo = tmp_path / "repo"
    index_dir = tmp_path / "index"
    shutil.copytree(SAVED / "index", index_dir)
    write_files_back(saved, repo)
    build_code_index(repo, index_dir, HashingEncoder(), model_name="hashing-dense", show_progress=False)
    rebuilt = CodeIndex.load(index_dir)
    assert rebuilt.entries() == saved.entries()
    for mode in EXPECTED["hits"]:
        assert hits_of(rebuilt, mode) == hits_of(saved, mode)


def write_files_back(index: CodeIndex, repo: Path) -> None:
    """The indexed files, back from their chunks (every line of these files is in one)."""
    lines: dict[str, dict[int, str]] = {}
    for chunk in index.chunks:
        for number, line in enumerate(chunk.text.split("\n"), start=chunk.start_line):
            lines.setdefault(chunk.path, {})[number] = line
    for path, numbered in lines.items():
        text = "\n".join(numbered.get(n, "") for n in range(1, max(numbered) + 1)) + "\n"
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
