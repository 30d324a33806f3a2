"""The first stage of a Retriever: an index over texts, or two of them fused.

    TextIndex(index, model)        the model encodes texts into what `index` stores (vectors, token
                                   matrices); without a model the index reads the texts (BM25Index)
    FusedIndex(first, second, w)   both searched, their rankings fused by `fusion.convex_fusion`,
                                   `w` the first one's share

Both take texts where an `Index` takes items and queries: `add(ids, texts)`, `search(queries, k)`,
`delete(ids)`, `len()`, `ids`, and answer a search as every index does. A search may keep to some
documents (`allowed`: their ids) and encode its queries with a model of its own (`model`: the same
model behind a lock, say, or the one a loaded index is searched with). `save(directory)` puts each
index in a subfolder named after its type (`faiss/`, `plaid/`, `maxsim/`, `bm25/`: a Retriever's
folder holds them), and `restore(directory, ...)` reads them back into a first stage made with the
same settings.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from mbert_retrieval.index.base import Index, SearchResult, rankings, search_allowed, search_result
from mbert_retrieval.search.fusion import DEFAULT_DENSE_WEIGHT, convex_fusion


class FirstStage:
    """What both kinds share: they keep their indexes in `parts` (TextIndexes over the same documents)."""

    parts: list[TextIndex]

    def __len__(self) -> int:
        return len(self.parts[0].index)

    @property
    def ids(self) -> list[str]:
        return self.parts[0].index.ids

    def delete(self, ids: Sequence[str]) -> None:
        for part in self.parts:
            part.index.delete(ids)

    def save(self, directory: Path) -> None:
        for part in self.parts:
            part.index.save(directory / part.index.index_type)

    def restore(self, directory: Path, model_name: str | None, device: str | None) -> None:
        """Replace each index with the one of its type saved in `directory` (by the model `model_name`,
        where a model encodes for it)."""
        for part in self.parts:
            expected_model = None if part.index.reads_texts else model_name
            folder = directory / part.index.index_type
            part.index = type(part.index).load(folder, expected_model=expected_model, device=device)


class TextIndex(FirstStage):
    """`model` encodes texts for an index that does not read them (it may be None for a loaded index
    whose searches bring their own)."""

    def __init__(self, index: Index, model=None, show_progress: bool = False):
        self.index = index
        self.model = model
        self.show_progress = show_progress
        self.parts = [self]

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        items = texts
        if not self.index.reads_texts:
            encoder = self._encoder(None)
            items = encoder.encode_documents(list(texts), show_progress_bar=self.show_progress)
        self.index.add(ids, items)

    def search(
        self, queries: Sequence[str], k: int, *, allowed: Collection[str] | None = None, model=None
    ) -> SearchResult:
        if not self.index.reads_texts:
            encoder = self._encoder(model)
            queries = encoder.encode_queries(list(queries), show_progress_bar=self.show_progress)
        if allowed is None:
            return self.index.search(queries, k)
        return search_allowed(self.index, queries, k, allowed)

    def _encoder(self, model):
        encoder = self.model if model is None else model
        if encoder is None:
            raise ValueError(f"the {self.index.index_type} index needs a model to encode texts")
        return encoder


class FusedIndex(FirstStage):
    def __init__(self, first: TextIndex, second: TextIndex, first_weight: float = DEFAULT_DENSE_WEIGHT):
        if not 0 <= first_weight <= 1:
            raise ValueError(f"the first ranking's weight must be between 0 and 1, got {first_weight}")
        self.first, self.second = first, second
        self.weights = [first_weight, 1 - first_weight]
        self.parts = [first, second]

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        self.first.add(ids, texts)
        try:
            self.second.add(ids, texts)
        except Exception:
            self.first.delete(ids)  # both indexes hold the same documents, or neither does
            raise

    def search(
        self, queries: Sequence[str], k: int, *, allowed: Collection[str] | None = None, model=None
    ) -> SearchResult:
        """The top k of each query after fusing both indexes' top k."""
        first, second = (
            rankings(part.search(queries, k, allowed=allowed, model=model)) for part in self.parts
        )
        fused = [convex_fusion([a, b], self.weights)[:k] for a, b in zip(first, second)]
        return search_result(fused, min(k, len(self)))
