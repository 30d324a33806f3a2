"""BM25Index: lexical search with bm25s (Lucene's BM25 by default), string ids and crash-safe saves.

    index = BM25Index(split_identifiers=True)
    index.add(["a", "b"], ["parse a json string", "read a file"])   # items are texts
    ids, scores = index.search(["json parser"], k=10)                # queries are texts
    index.save("my-bm25"); index = BM25Index.load("my-bm25")

It follows the `Index` protocol (index/base.py), with texts as items and queries. BM25's statistics
are global (document frequencies, mean length), so every add or delete rebuilds the score matrix from
the token ids the index keeps of each document; the texts themselves are not kept.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mbert_retrieval.index.base import (
    Index,
    ListedIds,
    SearchResult,
    best_per_query,
    check_k,
    check_known_ids,
    check_new_ids,
)
from mbert_retrieval.index.storage import IndexFormatError, save_index_folder

IDENTIFIER_BOUNDARY = re.compile(r"_+|(?<=[a-z0-9])(?=[A-Z])")
SETTINGS = ("k1", "b", "method", "stopwords", "split_identifiers")


def import_bm25s():
    import bm25s

    # bm25s sets its own logger to DEBUG, which floods any application that configures logging.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class BM25Index(ListedIds, Index):
    """`split_identifiers` also splits snake_case and camelCase words (useful for code), and
    `stopwords` is a bm25s stopword language ("en") or None."""

    index_type = "bm25"
    reads_texts = True

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
        self._set_ids([])
        # Each document's terms as ids into `_vocabulary`, end to end; None in an index saved before
        # they were kept, which can search but not change.
        self._vocabulary: dict[str, int] | None = {}
        self._terms: list[np.ndarray] | None = []
        self._saved_without_terms: str | None = None

    @classmethod
    def build(
        cls, ids: Sequence[str], texts: Sequence[str], show_progress: bool = False, **settings
    ) -> BM25Index:
        ids = [str(i) for i in ids]
        if not ids:
            raise ValueError("cannot build a BM25 index from an empty corpus")
        index = cls(**settings)
        index.add(ids, texts, show_progress=show_progress)
        return index

    # -------------------------------------------------------------------------------------- contents

    def add(self, ids: Sequence[str], texts: Sequence[str], show_progress: bool = False) -> None:
        """Add documents (one text each) and rebuild the scores over the whole corpus."""
        ids, texts = check_new_ids(ids, existing=self._position), list(texts)
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("BM25Index takes texts: every item must be a string")
        if not ids:
            return
        self._check_changeable()
        terms = self.tokenize(texts, show_progress)
        self._terms += [
            np.array([self._vocabulary.setdefault(t, len(self._vocabulary)) for t in doc], dtype=np.int32)
            for doc in terms
        ]
        self._set_ids(self._ids + ids)
        self._rebuild(show_progress)

    def delete(self, ids: Sequence[str]) -> None:
        ids = set(check_known_ids(ids, self._position))
        if not ids:
            return
        self._check_changeable()
        keep = [n for n, doc_id in enumerate(self._ids) if doc_id not in ids]
        self._set_ids([self._ids[n] for n in keep])
        self._terms = [self._terms[n] for n in keep]
        self._rebuild()

    def _rebuild(self, show_progress: bool = False) -> None:
        bm25s = import_bm25s()

        self._bm25 = bm25s.BM25(k1=self.settings["k1"], b=self.settings["b"], method=self.settings["method"])
        if self._ids:
            words = list(self._vocabulary)
            corpus = [[words[t] for t in doc.tolist()] for doc in self._terms]
            self._bm25.index(corpus, show_progress=show_progress)

    @property
    def changeable(self) -> bool:
        """False for an index saved before the terms were kept: it can search, not add or delete."""
        return self._terms is not None

    def _check_changeable(self) -> None:
        if self._terms is None:
            raise ValueError(
                f"the BM25 index in {self._saved_without_terms} was saved by an older version, without "
                f"the terms of its documents, so it can search but not add or delete: build it again "
                f"from the texts (BM25Index.build, or `mbert-retrieval index`)"
            )

    # ---------------------------------------------------------------------------------------- search

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
        if not terms or not self._ids:  # bm25s fails on an empty term list
            return np.zeros(len(self._ids), dtype=np.float32)
        return np.asarray(self._bm25.get_scores(terms), dtype=np.float32)

    def search(self, queries: str | Sequence[str], k: int = 10) -> SearchResult:
        """Top-k per query, best first: (ids, scores float32 [n_q, min(k, n_docs)]). Documents that
        match no query term are left out, so an id list can be shorter than k (scores -inf past it)."""
        if isinstance(queries, str):
            queries = [queries]
        check_k(k)
        return best_per_query(map(self.scores, queries), self._ids, k, above=0.0)

    # ---------------------------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            if self._ids:  # bm25s cannot save an empty index
                self._bm25.save(tmp)
                files = {name: copier(Path(tmp) / name) for name in os.listdir(tmp)}
            files["ids.json"] = lambda path: path.write_text(json.dumps(self._ids))
            if self._terms is not None:  # else saved as it was loaded: searchable, not changeable
                files["vocabulary.json"] = lambda path: path.write_text(json.dumps(list(self._vocabulary)))
                files["terms.npz"] = lambda path: path.write_bytes(self._terms_npz())
            manifest = {"index_type": self.index_type, "model_name": None, "n_documents": len(self)}
            save_index_folder(directory, files, {**manifest, **self.settings})

    def _terms_npz(self) -> bytes:
        terms = np.concatenate(self._terms) if self._terms else np.zeros(0, dtype=np.int32)
        lengths = np.array([len(doc) for doc in self._terms], dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, terms=terms, lengths=lengths)
        return buffer.getvalue()

    @classmethod
    def from_folder(cls, manifest: dict, data_dir: Path, device: str | None = None) -> BM25Index:
        """(BM25 runs on the CPU, whatever the `device`.)"""
        bm25s = import_bm25s()

        directory = data_dir.parent
        index = cls(**{key: manifest[key] for key in SETTINGS})
        try:
            index._set_ids(json.loads((data_dir / "ids.json").read_text()))
            if index._ids:
                index._bm25 = bm25s.BM25.load(str(data_dir), load_corpus=False)
            if "terms.npz" in manifest["files"]:
                index._vocabulary, index._terms = read_terms(data_dir)
            else:
                index._vocabulary = index._terms = None
                index._saved_without_terms = str(directory)
        except Exception as err:  # bm25s raises whatever numpy / json raise
            raise IndexFormatError(f"{directory}: unreadable BM25 data: {err}") from err
        if index._ids and index._bm25.scores["num_docs"] != len(index._ids):
            raise IndexFormatError(f"{directory}: the BM25 matrix and the id list disagree in size")
        if index._terms is not None and len(index._terms) != len(index._ids):
            raise IndexFormatError(f"{directory}: the term lists and the id list disagree in size")
        return index


def read_terms(data_dir: Path) -> tuple[dict[str, int], list[np.ndarray]]:
    words = json.loads((data_dir / "vocabulary.json").read_text())
    with np.load(data_dir / "terms.npz", allow_pickle=False) as arrays:
        terms, lengths = arrays["terms"], arrays["lengths"]
    if lengths.sum() != len(terms) or (len(terms) and terms.max() >= len(words)):
        raise ValueError("the term ids do not fit the document lengths and the vocabulary")
    documents = np.split(terms, np.cumsum(lengths)[:-1]) if len(lengths) else []
    return {word: n for n, word in enumerate(words)}, documents


def copier(source: Path):
    return lambda path: path.write_bytes(source.read_bytes())
