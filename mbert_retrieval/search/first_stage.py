"""The first stage of a Retriever: an index over texts, or two of them fused.

    TextIndex(index, model)        the model encodes texts into what `index` stores (vectors, token
                                   matrices); without a model the index reads the texts (BM25Index)
    FusedIndex(first, second, w)   both searched, their rankings fused by `fusion.convex_fusion`,
                                   `w` the first one's share

Both take texts where an `Index` takes items and queries: `add(ids, texts)`, `search(queries, k)`,
`delete(ids)`, `len()`, `ids`, and answer a search as every index does. Saved inside a Retriever's
folder, each index stands in a subfolder named after its type (`faiss/`, `plaid/`, `maxsim/`,
`bm25/`); `restore` reads them back into a first stage built with the same settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mbert_retrieval.index.base import Index, SearchResult, rankings, search_result
from mbert_retrieval.search.fusion import DEFAULT_DENSE_WEIGHT, convex_fusion


class TextIndex:
    def __init__(self, index: Index, model=None, show_progress: bool = False):
        self.index = index
        self.model = model
        self.show_progress = show_progress

    @property
    def parts(self) -> list[TextIndex]:
        return [self]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> list[str]:
        return self.index.ids

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        items = texts
        if self.model is not None:
            items = self.model.encode_documents(list(texts), show_progress_bar=self.show_progress)
        self.index.add(ids, items)

    def search(self, queries: Sequence[str], k: int) -> SearchResult:
        if self.model is not None:
            queries = self.model.encode_queries(list(queries), show_progress_bar=self.show_progress)
        return self.index.search(queries, k)

    def delete(self, ids: Sequence[str]) -> None:
        self.index.delete(ids)

    def save(self, directory: Path) -> None:
        self.index.save(directory / self.index.index_type)

    def restore(self, directory: Path, expected_model: str | None, device: str | None) -> None:
        """Replace the index with the one of its type saved in `directory`."""
        folder = directory / self.index.index_type
        self.index = type(self.index).load(folder, expected_model=expected_model, device=device)


class FusedIndex:
    def __init__(self, first: TextIndex, second: TextIndex, first_weight: float = DEFAULT_DENSE_WEIGHT):
        if not 0 <= first_weight <= 1:
            raise ValueError(f"the first ranking's weight must be between 0 and 1, got {first_weight}")
        self.first, self.second = first, second
        self.weights = [first_weight, 1 - first_weight]

    @property
    def parts(self) -> list[TextIndex]:
        return [self.first, self.second]

    def __len__(self) -> int:
        return len(self.first)

    @property
    def ids(self) -> list[str]:
        return self.first.ids

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        self.first.add(ids, texts)
        try:
            self.second.add(ids, texts)
        except Exception:
            self.first.delete(ids)  # both indexes hold the same documents, or neither does
            raise

    def search(self, queries: Sequence[str], k: int) -> SearchResult:
        """The top k of each query after fusing both indexes' top k."""
        first, second = (rankings(part.search(queries, k)) for part in self.parts)
        fused = [convex_fusion([a, b], self.weights)[:k] for a, b in zip(first, second)]
        return search_result(fused, min(k, len(self)))

    def delete(self, ids: Sequence[str]) -> None:
        for part in self.parts:
            part.delete(ids)

    def save(self, directory: Path) -> None:
        for part in self.parts:
            part.save(directory)

    def restore(self, directory: Path, expected_model: str | None, device: str | None) -> None:
        for part in self.parts:
            part.restore(directory, expected_model, device)
