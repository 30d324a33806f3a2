"""The `Index` protocol every index follows, and the helpers they share.

    index.add(ids, items)              # ids: str; items: one per id (see below)
    ids, scores = index.search(queries, k=10)
    index.delete(ids)
    index.save("folder"); index = type(index).load("folder", expected_model=..., device=...)
    len(index), index.ids

What an item (and a query) is depends on the index:

    FaissIndex    one vector per document: [n, dim]; queries [n_q, dim]
    PlaidIndex    one [n_tokens_i, dim] matrix per document (ColBERT); queries [n_q, q_len, dim]
    MaxSimIndex   the same as PlaidIndex, scored exactly instead of through centroids
    BM25Index     one text per document; queries are texts

Every `search` answers the same way: `ids` is a list (one per query) of id lists, best first, and
`scores` a float32 array [n_queries, min(k, len(index))]. A query with fewer hits than that (BM25
leaves out documents without a query term; an approximate index may find fewer) has a shorter id
list, and -inf in the score columns past it; an empty id list is a query that found nothing.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from mbert_retrieval.index.storage import load_index_folder

SearchResult = tuple[list[list[str]], np.ndarray]
IndexT = TypeVar("IndexT", bound="Index")


class Index(ABC):
    index_type: ClassVar[str]  # written in the saved manifest; the folder name inside a saved Retriever
    reads_texts: ClassVar[bool] = False  # items and queries are texts (else what a model makes of them)

    @abstractmethod
    def add(self, ids: Sequence[str], items: Any) -> None:
        """Add new documents: one item per id (a vector, a token matrix or a text; see the module)."""

    @abstractmethod
    def search(self, queries: Any, k: int = 10) -> SearchResult:
        """The top-k documents of each query: (ids, scores), as the module describes."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents; an id not in the index is a KeyError."""

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Save as a folder (manifest.json + data); a crash mid-save leaves the previous save loadable."""

    @classmethod
    def load(
        cls: type[IndexT],
        directory: str | os.PathLike,
        *,
        expected_model: str | None = None,
        device: str | None = None,
        verify_checksums: bool = True,
        **options,
    ) -> IndexT:
        """Load a saved index: its manifest (type, format version, model) and the size and checksum of
        every file are checked first, and a damaged folder is an IndexFormatError naming the problem.

        `expected_model` refuses an index built by another model; `device` is where it searches
        (indexes that run on one device ignore it); `options` are an index's own (FaissIndex: `mmap`,
        `use_gpu`)."""
        manifest, data_dir = load_index_folder(directory, cls.index_type, expected_model, verify_checksums)
        return cls.from_folder(manifest, data_dir, device=device, **options)

    @classmethod
    @abstractmethod
    def from_folder(cls, manifest: dict[str, Any], data_dir: Path, device: str | None = None) -> Index:
        """The index saved in `data_dir`, whose checked manifest `load` read (the folder for error
        messages is `data_dir.parent`)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def ids(self) -> list[str]:
        """The ids of the documents, in the order they were added."""


class KeyedIds:
    """`len(index)`, `doc_id in index` and `index.ids` for an index that finds its documents through a
    dict keyed by their ids in the order they were added: `_id_table` returns it (the values are the
    index's own, such as a list position or a faiss label)."""

    def _id_table(self) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._id_table())

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._id_table()

    @property
    def ids(self) -> list[str]:
        return list(self._id_table())


class ListedIds(KeyedIds):
    """For an index that keeps its documents in a list, in the order they were added: the ids and
    each one's position in that list, which `_set_ids` keeps in step."""

    _ids: list[str]
    _position: dict[str, int]

    def _set_ids(self, ids: list[str]) -> None:
        self._ids = ids
        self._position = {doc_id: n for n, doc_id in enumerate(ids)}

    def _id_table(self) -> dict[str, int]:
        return self._position


def as_id_list(ids) -> list[str]:
    if isinstance(ids, str):
        raise TypeError("ids must be a sequence of strings, not one string")
    ids = list(ids)
    bad = [i for i in ids if not isinstance(i, str)]
    if bad:
        raise TypeError(f"ids must be strings, got {type(bad[0]).__name__}")
    return ids


def check_new_ids(ids, existing) -> list[str]:
    """`ids` as a list of str, refusing duplicates within it and ids already in `existing`."""
    ids = as_id_list(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    clash = [i for i in ids if i in existing]
    if clash:
        raise ValueError(f"ids already in the index: {clash[:5]}")
    return ids


def check_known_ids(ids, known) -> list[str]:
    """`ids` as a list of str, all of them in `known` (a KeyError names the missing ones)."""
    ids = as_id_list(ids)
    missing = [i for i in ids if i not in known]
    if missing:
        raise KeyError(f"ids not in the index: {missing[:5]}")
    return ids


def check_k(k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties: lower index first)."""
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return candidates[np.lexsort((candidates, -scores[candidates]))]


def best_per_query(score_rows: Iterable[np.ndarray], ids: list[str], k: int, above=-np.inf) -> SearchResult:
    """The search answer from each query's scores of every document ([len(ids)] per query): its k
    best ids, leaving out documents that score `above` or less."""
    found = []
    for scores in score_rows:
        top = top_k_indices(scores, k)
        found.append([(ids[i], float(scores[i])) for i in top[scores[top] > above]])
    return search_result(found, min(k, len(ids)))


def search_allowed(index: Index, queries: Any, k: int, allowed: Collection[str]) -> SearchResult:
    """`index.search`, keeping only the documents in `allowed`: the index is asked for more hits
    until k per query pass, or it has no more to give."""
    check_k(k)
    total = len(index)
    fetch = min(total, max(4 * k, 256))
    while fetch > 0:
        result = index.search(queries, fetch)
        kept = [[(i, s) for i, s in ranking if i in allowed] for ranking in rankings(result)]
        done = [len(row) >= k or len(found) < fetch for row, found in zip(kept, result[0])]
        if all(done) or fetch >= total:
            return search_result([row[:k] for row in kept], min(k, total))
        fetch = min(total, fetch * 4)
    return search_result([[] for _ in range(len(queries))], 0)


def search_result(rankings: Sequence[Sequence[tuple[str, float]]], width: int) -> SearchResult:
    """(id, score) lists, best first, as a search answer: id lists and float32 scores [n, width],
    -inf past the end of a shorter list."""
    scores = np.full((len(rankings), width), -np.inf, dtype=np.float32)
    for row, ranking in zip(scores, rankings):
        row[: len(ranking)] = [score for _, score in ranking[:width]]
    return [[doc_id for doc_id, _ in ranking[:width]] for ranking in rankings], scores


def rankings(result: SearchResult) -> list[list[tuple[str, float]]]:
    """A search answer as (id, score) lists, best first (the -inf padding left out)."""
    ids, scores = result
    return [list(zip(row, map(float, row_scores))) for row, row_scores in zip(ids, scores)]
