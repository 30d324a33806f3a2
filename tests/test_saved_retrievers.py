"""Retriever folders saved by an earlier version (tests/data/saved_retrievers, written by
tests/data/write_saved_retrievers.py) still load, and give the hits they gave when saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hashing_models import HashingColBERT, HashingEncoder

from mbert_retrieval.search.retriever import Retriever

SAVED = Path(__file__).parent / "data" / "saved_retrievers"
EXPECTED = json.loads((SAVED / "expected_hits.json").read_text())
MODELS = {
    "bm25": None,
    "dense_hybrid": HashingEncoder,
    "colbert_flat": HashingColBERT,
    "colbert_plaid": HashingColBERT,
}


def load(folder: Path, name: str) -> Retriever:
    model = MODELS[name]
    return Retriever.load(folder, model=None if model is None else model(), device="cpu")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_saved_folder_gives_the_same_hits(name, tmp_path):
    retriever = load(SAVED / name, name)
    hits = retriever.search(EXPECTED["queries"], k=5)
    for row, expected in zip(hits, EXPECTED["hits"][name]):
        assert [h.id for h in row] == [i for i, _ in expected]
        np.testing.assert_allclose([h.score for h in row], [s for _, s in expected], rtol=1e-5, atol=1e-6)

    # Saved again by this version, it loads to the same hits.
    retriever.save(tmp_path / name)
    again = load(tmp_path / name, name).search(EXPECTED["queries"], k=5)
    assert [[(h.id, h.score) for h in row] for row in again] == [
        [(h.id, h.score) for h in row] for row in hits
    ]


def test_damaged_saved_folder_is_refused(tmp_path):
    from mbert_retrieval.index.storage import IndexFormatError

    shutil.copytree(SAVED / "dense_hybrid", tmp_path / "r")
    data = next((tmp_path / "r" / "faiss").glob("data-*/index.faiss"))
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(IndexFormatError, match="truncated"):
        load(tmp_path / "r", "dense_hybrid")
