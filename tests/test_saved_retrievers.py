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


def test_saved_bm25_searches_but_asks_to_be_rebuilt_before_it_changes():
    """Format 1 kept BM25 without its documents' terms: adding to it would need every text again."""
    for name in ("bm25", "dense_hybrid"):
        retriever = load(SAVED / name, name)
        with pytest.raises(ValueError, match="saved by an older version.*build it again"):
            retriever.add(["new"], ["merge two dicts"])
        assert len(retriever) == len(retriever.index) == 12  # nothing half-added
        assert "new" not in retriever.index.ids


def test_saved_colbert_flat_becomes_a_maxsim_index(tmp_path):
    retriever = load(SAVED / "colbert_flat", "colbert_flat")
    retriever.add(["new"], ["merge two dicts into one"])
    retriever.delete(["sort"])
    retriever.save(tmp_path / "r")
    assert (tmp_path / "r" / "maxsim" / "manifest.json").is_file()
    again = load(tmp_path / "r", "colbert_flat")
    assert set(again.ids) == set(retriever.ids) and "new" in again.ids and "sort" not in again.ids
    assert again.search("merge dicts", k=1)[0].id == "new"
