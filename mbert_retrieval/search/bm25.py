"""BM25 over a fixed corpus with bm25s (Lucene's BM25 by default), with string ids and crash-safe saves."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mbert_retrieval.index.storage import IndexFormatError, load_index_folder, save_index_folder

IDENTIFIER_BOUNDARY = re.compile(r"_+|(?<=[a-z0-9])(?=[A-Z])")


def import_bm25s():
    import bm25s

    # bm25s sets its own logger to DEBUG, which floods any application that configures logging.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class BM25Index:
    """Lexical search: `BM25Index.build(ids, texts)`, then `search(queries, k)` -> (ids, scores).

    `split_identifiers` also splits snake_case and camelCase words (useful for code), and
    `stopwords` is a bm25s stopword language ("en") or None.
    """

    def __init__(
        self,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | None = "en",
        split_identifiers: bool = False,
    ):
        bm25s = import_bm25s()

        self.settings = dict(
            k1=k1, b=b, method=method, stopwords=stopwords, split_identifiers=split_identifiers
        )
        self._bm25 = bm25s.BM25(k1=k1, b=b, method=method)
        self._ids: list[str] = []

    @classmethod
    def build(
        cls, ids: Sequence[str], texts: Sequence[str], show_progress: bool = False, **settings
    ) -> BM25Index:
        ids, texts = [str(i) for i in ids], list(texts)
        if not ids:
            raise ValueError("cannot build a BM25 index from an empty corpus")
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        if len(set(ids)) != len(ids):
            raise ValueError("document ids must be unique")
        index = cls(**settings)
        index._bm25.index(index.tokenize(texts, show_progress), show_progress=show_progress)
        index._ids = ids
        return index

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def tokenize(self, texts: Sequence[str], show_progress: bool = False) -> list[list[str]]:
        bm25s = import_bm25s()

        if self.settings["split_identifiers"]:
            texts = [IDENTIFIER_BOUNDARY.sub(" ", text) for text in texts]
        return bm25s.tokenize(
            list(texts), stopwords=self.settings["stopwords"], return_ids=False, show_progress=show_progress
        )

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for one query, [n_docs] float32 (0 where no term matches).

        A query with no terms left after tokenisation ("the", "?!", an emoji) matches nothing."""
        terms = self.tokenize([query])[0]
        if not terms:  # bm25s fails on an empty term list
            return np.zeros(len(self._ids), dtype=np.float32)
        return np.asarray(self._bm25.get_scores(terms), dtype=np.float32)

    def search(self, queries: str | Sequence[str], k: int = 10) -> tuple[list[list[str]], list[np.ndarray]]:
        """Top-k per query, best first: (ids, scores). Documents that match no query term are left out,
        so a list can be shorter than k."""
        if isinstance(queries, str):
            queries = [queries]
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        all_ids, all_scores = [], []
        for query in queries:
            scores = self.scores(query)
            top = top_k_indices(scores, k)
            top = top[scores[top] > 0]
            all_ids.append([self._ids[i] for i in top])
            all_scores.append(scores[top])
        return all_ids, all_scores

    # ---------------------------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self._bm25.save(tmp)
            files = {name: copier(Path(tmp) / name) for name in os.listdir(tmp)}
            files["ids.json"] = lambda path: path.write_text(json.dumps(self._ids))
            manifest = {"index_type": "bm25", "model_name": None, "n_documents": len(self), **self.settings}
            save_index_folder(directory, files, manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike, verify_checksums: bool = True) -> BM25Index:
        bm25s = import_bm25s()

        manifest, data_dir = load_index_folder(directory, "bm25", None, verify_checksums)
        index = cls(**{key: manifest[key] for key in ("k1", "b", "method", "stopwords", "split_identifiers")})
        try:
            index._bm25 = bm25s.BM25.load(str(data_dir), load_corpus=False)
            index._ids = json.loads((data_dir / "ids.json").read_text())
        except Exception as err:  # bm25s raises whatever numpy / json raise
            raise IndexFormatError(f"{directory}: unreadable BM25 data: {err}") from err
        if index._bm25.scores["num_docs"] != len(index._ids):
            raise IndexFormatError(f"{directory}: the BM25 matrix and the id list disagree in size")
        return index


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties: lower index first)."""
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return candidates[np.lexsort((candidates, -scores[candidates]))]


def copier(source: Path):
    return lambda path: path.write_bytes(source.read_bytes())
