"""Retriever: a model, one first stage (an index, or two fused) -> an optional rerank.

    retriever = Retriever(DenseRetriever.from_pretrained("dense"), index="hnsw",
                          reranker=CrossEncoder.from_pretrained("cross"), first_stage_k=100)
    retriever.add(ids, texts)
    hits = retriever.search("how to sort a list", k=10)        # [Hit(id, score, text), ...]
    batch = retriever.search(["query one", "query two"], k=10)  # one list of hits per query
    retriever.save("my-index"); retriever = Retriever.load("my-index")

First stages, by `index` (`new_first_stage` makes them; search/first_stage.py holds the pieces):
    flat | hnsw | ivfpq   a single-vector model (DenseRetriever or any sentence-transformers model) in a FaissIndex
    flat | plaid          a ColBERT model: a MaxSimIndex (exact, against every document), or a PlaidIndex
    bm25                  no model: a BM25Index (bm25s)
`hybrid=True` adds BM25 to a model's first stage and fuses both rankings by their min-max normalised
scores, `dense_weight` the model's share (`search.fusion.convex_fusion`; hybrid scores are in [0, 1]).
A reranker (a CrossEncoder, or a ColBERT scoring by MaxSim) re-scores the first `first_stage_k` hits.

A saved retriever is a folder: retriever.json (settings, model names), documents.jsonl, and each index
of the first stage in a subfolder named after its type. The models are not saved, only their names.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mbert_retrieval.files import atomic_write_text
from mbert_retrieval.index import storage
from mbert_retrieval.index.base import Index, rankings
from mbert_retrieval.index.bm25 import BM25Index
from mbert_retrieval.index.faiss_index import FaissIndex
from mbert_retrieval.index.maxsim import MaxSimIndex
from mbert_retrieval.index.plaid import PlaidIndex
from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.models.loading import load_reranker, load_search_model
from mbert_retrieval.search.first_stage import FusedIndex, TextIndex
from mbert_retrieval.search.fusion import DEFAULT_DENSE_WEIGHT

SINGLE_VECTOR_INDEXES = ("flat", "hnsw", "ivfpq")
MULTI_VECTOR_INDEXES = ("flat", "plaid")
MANIFEST = "retriever.json"
FORMAT_VERSION = 2
LEGACY_MAXSIM_VECTORS = "colbert_vectors.safetensors"  # format 1: exhaustive-MaxSim vectors, document order


@dataclass
class Hit:
    id: str
    score: float
    text: str = field(repr=False, default="")


@dataclass
class EncodingStats:
    """Time spent turning documents into the first stage's index (encoding and indexing)."""

    documents: int = 0
    seconds: float = 0.0

    @property
    def documents_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds > 0 else float("nan")


def is_multi_vector(model) -> bool:
    """A ColBERT-style model (one vector per token, scored by MaxSim)."""
    from mbert_retrieval.models.colbert import ColBERT

    return isinstance(model, ColBERT)


class Retriever:
    def __init__(
        self,
        model=None,
        index: str = "flat",
        *,
        hybrid: bool = False,
        reranker=None,
        first_stage_k: int = 100,
        dense_weight: float = DEFAULT_DENSE_WEIGHT,
        bm25_settings: dict | None = None,
        model_name: str | None = None,
        reranker_name: str | None = None,
        show_progress: bool = False,
        first_stage: TextIndex | FusedIndex | None = None,
        documents: dict[str, str] | None = None,
    ):
        """`model_name` / `reranker_name`: where the models load from, recorded by `save` so that
        `Retriever.load` can bring them back (and refuse an index built by a different model).

        `first_stage` and `documents`: indexes made already and the texts they hold (a code index's
        snapshot, say), in place of an empty first stage of the kind `index` and `hybrid` name."""
        if first_stage is None:
            check_first_stage(model, index, hybrid)
        if first_stage_k <= 0:
            raise ValueError(f"first_stage_k must be positive, got {first_stage_k}")
        self.model = model
        self.index_kind = index
        self.hybrid = hybrid
        self.reranker = reranker
        self.first_stage_k = first_stage_k
        if not 0 <= dense_weight <= 1:
            raise ValueError(f"dense_weight must be between 0 and 1, got {dense_weight}")
        self.dense_weight = dense_weight
        self.bm25_settings = dict(bm25_settings or {})
        self.model_name = model_name
        self.reranker_name = reranker_name
        self.show_progress = show_progress
        self.stats = EncodingStats()
        self.documents: dict[str, str] = dict(documents or {})
        self.index = first_stage or new_first_stage(
            model, index, hybrid, dense_weight, self.bm25_settings, model_name, show_progress
        )

    @property
    def uses_bm25(self) -> bool:
        return self.index_kind == "bm25" or self.hybrid

    @property
    def ids(self) -> list[str]:
        return list(self.documents)

    def __len__(self) -> int:
        return len(self.documents)

    def describe(self) -> str:
        first = (
            "bm25"
            if self.model is None
            else f"{self.model_name or type(self.model).__name__} [{self.index_kind}]"
        )
        if self.hybrid:
            first = f"hybrid(bm25 + {first})"
        if self.reranker is not None:
            first += (
                f" -> rerank {self.reranker_name or type(self.reranker).__name__} top {self.first_stage_k}"
            )
        return first

    # -------------------------------------------------------------------------------------- indexing

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        """Encode and index documents."""
        ids, texts = [str(i) for i in ids], list(texts)
        check_documents(ids, texts, self.documents)
        if not ids:
            return
        start = time.perf_counter()
        self.index.add(ids, texts)
        self.documents.update(zip(ids, texts))
        self.stats.documents += len(ids)
        self.stats.seconds += time.perf_counter() - start

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents from the index and the stored texts."""
        ids = [str(i) for i in ids]
        missing = [i for i in ids if i not in self.documents]
        if missing:
            raise KeyError(f"ids not in the retriever: {missing[:5]}")
        self.index.delete(ids)
        for doc_id in ids:
            del self.documents[doc_id]

    # ---------------------------------------------------------------------------------------- search

    def search(self, queries: str | Sequence[str], k: int = 10) -> list[Hit] | list[list[Hit]]:
        """The top k hits for one query (a list of Hit) or for each of several (a list of lists)."""
        single = isinstance(queries, str)
        queries = [queries] if single else list(queries)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if not self.documents:
            raise ValueError("the retriever holds no documents: add some first")
        if not all(isinstance(q, str) for q in queries):
            raise TypeError("queries must be strings")
        # a rerank or a fusion looks at the first stage's top first_stage_k, not only the top k
        depth = max(k, self.first_stage_k) if self.reranker is not None or self.hybrid else k
        candidates = self.first_stage(queries, depth)
        if self.reranker is not None:
            candidates = self.rerank(queries, candidates)
        hits = [[Hit(i, s, self.documents[i]) for i, s in ranking[:k]] for ranking in candidates]
        return hits[0] if single else hits

    def first_stage(self, queries: list[str], depth: int) -> list[list[tuple[str, float]]]:
        """(id, score) lists, best first, from the first stage."""
        return rankings(self.index.search(queries, depth))

    def rerank(
        self,
        queries: list[str],
        candidates: list[list[tuple[str, float]]],
        *,
        reranker=None,
        depth: int | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Re-score each query's first `depth` candidates (`first_stage_k`) with `reranker` (the
        retriever's), best first. Deeper candidates follow in first-stage order, scored below every
        reranked one."""
        reranker = self.reranker if reranker is None else reranker
        heads = [ranking[: depth or self.first_stage_k] for ranking in candidates]
        if is_multi_vector(reranker):
            scores = self._maxsim_rerank(reranker, queries, heads)
        else:
            pairs = [(q, self.documents[i]) for q, ranking in zip(queries, heads) for i, _ in ranking]
            flat = np.asarray(reranker.predict(pairs, show_progress_bar=self.show_progress), dtype=np.float32)
            scores = np.split(flat.reshape(len(pairs), -1)[:, 0], np.cumsum([len(h) for h in heads])[:-1])
        reranked = []
        for ranking, head, row in zip(candidates, heads, scores):
            order = sorted(range(len(head)), key=lambda j: -row[j])
            result = [(head[j][0], float(row[j])) for j in order]
            floor = min((score for _, score in result), default=0.0)
            result += [(doc_id, floor - 1.0 - n) for n, (doc_id, _) in enumerate(ranking[len(head) :])]
            reranked.append(result)
        return reranked

    def _maxsim_rerank(self, reranker, queries, candidates) -> list[np.ndarray]:
        """ColBERT MaxSim over the candidates; each distinct document is encoded once."""
        unique = list(dict.fromkeys(i for ranking in candidates for i, _ in ranking))
        position = {doc_id: n for n, doc_id in enumerate(unique)}
        documents = reranker.encode_documents(
            [self.documents[i] for i in unique], show_progress_bar=self.show_progress
        )
        encoded = reranker.encode_queries(queries, show_progress_bar=self.show_progress)
        return [
            np.asarray(
                reranker.score(encoded[q], [documents[position[i]] for i, _ in ranking]),
                dtype=np.float32,
            )
            for q, ranking in enumerate(candidates)
        ]

    # ----------------------------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> None:
        """Save the documents and indexes (not the models: their names are recorded and reloaded)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.index.save(directory)
        rows = "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in self.documents.items())
        atomic_write_text(directory / "documents.jsonl", rows)
        manifest = {
            "index": self.index_kind,
            "hybrid": self.hybrid,
            "model": self.model_name,
            "reranker": self.reranker_name,
            "first_stage_k": self.first_stage_k,
            "dense_weight": self.dense_weight,
            "bm25_settings": self.bm25_settings,
            "n_documents": len(self),
            "encoding": {"documents": self.stats.documents, "seconds": self.stats.seconds},
        }
        write_manifest(directory, manifest)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        model=None,
        reranker=None,
        *,
        reranker_name: str | None = None,
        device: str | None = None,
        show_progress: bool = False,
    ) -> Retriever:
        """Load a saved retriever. The model is loaded from the recorded name unless given; the reranker
        is the one given (or the recorded one when `reranker` is None and one was saved)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if model is None and manifest["model"] is not None:
            model = load_search_model(manifest["model"], device=device)
        if reranker is None and reranker_name is None and manifest.get("reranker"):
            reranker_name = manifest["reranker"]
        if reranker is None and reranker_name is not None:
            reranker = load_reranker(reranker_name, device=device)
        retriever = cls(
            model,
            manifest["index"],
            hybrid=manifest["hybrid"],
            reranker=reranker,
            first_stage_k=manifest["first_stage_k"],
            dense_weight=manifest.get("dense_weight", DEFAULT_DENSE_WEIGHT),  # older: reciprocal rank
            bm25_settings=manifest["bm25_settings"],
            model_name=manifest["model"],
            reranker_name=reranker_name,
            show_progress=show_progress,
        )
        retriever._load_parts(directory, manifest, device)
        return retriever

    def _load_parts(self, directory: Path, manifest: dict, device: str | None) -> None:
        self.documents = read_documents(directory / "documents.jsonl")
        self.stats = EncodingStats(**manifest.get("encoding", {}))
        if len(self.documents) != manifest["n_documents"]:
            raise IndexFormatError(
                f"{directory}: documents.jsonl does not hold the {manifest['n_documents']} documents"
            )
        for part in self.index.parts:
            if isinstance(part.index, MaxSimIndex) and manifest.get("format_version", 1) == 1:
                legacy = directory / LEGACY_MAXSIM_VECTORS
                part.index = MaxSimIndex.from_vectors_file(legacy, self.ids, self.model_name)
            else:
                part.restore(directory, self.model_name, device)
        if set(self.index.ids) != set(self.documents):
            raise IndexFormatError(f"{directory}: the index and documents.jsonl hold different documents")


def new_first_stage(
    model, kind: str, hybrid: bool, dense_weight: float, bm25_settings: dict, model_name, show_progress
) -> TextIndex | FusedIndex:
    """An empty first stage: the model's index (or BM25 when there is no model), fused with BM25
    when `hybrid`."""
    lexical = TextIndex(BM25Index(**bm25_settings)) if model is None or hybrid else None
    if model is None:
        return lexical
    neural = TextIndex(new_model_index(model, kind, model_name), model, show_progress)
    return FusedIndex(neural, lexical, dense_weight) if hybrid else neural


def new_model_index(model, kind: str, model_name: str | None) -> Index:
    """An empty index for the model's embeddings: FAISS for single vectors, PLAID or exhaustive MaxSim
    for a ColBERT's token vectors."""
    if not is_multi_vector(model):
        return FaissIndex(model.dim, kind=kind, model_name=model_name)
    if kind == "plaid":
        return PlaidIndex(model_name=model_name)
    return MaxSimIndex(model_name=model_name)


# ---------------------------------------------------------------------------------------------- checks


def check_first_stage(model, index: str, hybrid: bool) -> None:
    if index == "bm25":
        if model is not None or hybrid:
            raise ValueError("index='bm25' takes no model (for BM25 plus a model, use hybrid=True)")
        return
    if model is None:
        raise ValueError(f"index={index!r} needs a model (or use index='bm25')")
    allowed = MULTI_VECTOR_INDEXES if is_multi_vector(model) else SINGLE_VECTOR_INDEXES
    if index not in allowed:
        what = "a ColBERT" if is_multi_vector(model) else "a single-vector"
        raise ValueError(f"index={index!r} does not fit {what} model; choose one of {', '.join(allowed)}")


def check_documents(ids: list[str], texts: list, existing: dict) -> None:
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("document texts must be strings")
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique")
    present = [i for i in ids if i in existing]
    if present:
        raise ValueError(f"ids already in the retriever: {present[:5]}")


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write retriever.json (the last file of a save: a folder with it is complete)."""
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    manifest = storage.read_manifest(directory, MANIFEST, "retriever")
    missing = {"index", "hybrid", "model", "first_stage_k", "bm25_settings", "n_documents"} - set(manifest)
    if missing:
        raise IndexFormatError(f"{path} lacks {', '.join(sorted(missing))} (corrupt manifest)")
    if manifest.get("format_version", 1) > FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: retriever format version {manifest['format_version']} is newer than this library "
            f"reads ({FORMAT_VERSION}); upgrade mbert-retrieval"
        )
    return manifest


def read_documents(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise IndexFormatError(f"{path} is missing")
    documents = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            documents[row["_id"]] = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise IndexFormatError(f"{path}: line {number} is corrupt ({err})") from err
    return documents
