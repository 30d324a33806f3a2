"""FaissIndex: single-vector search (flat, HNSW, IVF-PQ or any faiss factory string) with string ids.

    index = FaissIndex(dim=768, kind="hnsw", model_name="my-dense-model")
    index.add(["doc-1", "doc-2"], vectors, metadata=[{"title": "a"}, {"title": "b"}])
    ids, scores = index.search(queries, k=10)   # ids[i]: list of str; scores: float32 [n_q, k]
    index.save("my-index")
    index = FaissIndex.load("my-index", expected_model="my-dense-model")

It follows the `Index` protocol (index/base.py): items are vectors [n, dim], queries [n_q, dim].

faiss works with int64 labels; this class keeps the mapping between them and the caller's string ids, plus
one metadata dict per id. Scores are "higher is better": inner products, or negative squared distances for
metric="l2". Indexes that faiss cannot delete from (HNSW) hide deleted vectors with a search-time filter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mbert_retrieval.index.base import Index, KeyedIds, SearchResult, as_id_list, check_k, check_known_ids
from mbert_retrieval.index.storage import IndexFormatError, save_index_folder

try:
    import faiss
except ImportError:  # pragma: no cover - faiss is an optional extra
    faiss = None

KINDS = ("flat", "hnsw", "ivfpq")
METRICS = ("ip", "l2")
TRAINING_POINTS_PER_CENTROID = 256  # faiss's own cap; more points barely change the centroids


class FaissIndex(KeyedIds, Index):
    index_type = "faiss"

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        metric: str = "ip",
        model_name: str | None = None,
        nlist: int | None = None,
        pq_m: int | None = None,
        pq_bits: int = 8,
        hnsw_m: int = 32,
        ef_search: int = 128,
        nprobe: int = 16,
        use_gpu: bool | None = None,
    ):
        """`kind`: "flat" (exact), "hnsw", "ivfpq", or a faiss factory string such as "IVF256,SQ8".

        IVF indexes are trained on the first `add`; `nlist` defaults to about 4 * sqrt(n) lists then.
        `use_gpu=None` searches on the GPU when faiss was built with GPU support and the index type has
        a GPU version.
        """
        _require_faiss()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dim = dim
        self.kind = kind
        self.metric = metric
        self.model_name = model_name
        self.nlist = nlist
        self.pq_m = pq_m if pq_m is not None else _default_pq_m(dim)
        self.pq_bits = pq_bits
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.nprobe = nprobe
        self.use_gpu = faiss_has_gpu() if use_gpu is None else use_gpu
        if kind == "ivfpq" and dim % self.pq_m:
            raise ValueError(f"pq_m={self.pq_m} must divide dim={dim}")

        self._index = None if kind == "ivfpq" and nlist is None else self._new_faiss_index(nlist)
        self._gpu_index = None
        self._label_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._metadata: dict[str, dict[str, Any]] = {}
        self._hidden: set[int] = set()  # deleted labels still inside an index that can't remove them
        self._next_label = 0

    # ----------------------------------------------------------------------------------------- contents

    def _id_table(self) -> dict[str, int]:
        return self._label_of

    def metadata(self, doc_id: str) -> dict[str, Any]:
        if doc_id not in self._label_of:
            raise KeyError(f"id {doc_id!r} is not in the index")
        return self._metadata.get(doc_id, {})

    def add(self, ids: Sequence[str], vectors, metadata: Sequence[dict[str, Any]] | None = None) -> None:
        """Add new documents; an id already in the index is an error (use `update`)."""
        ids, vectors, metadata = self._check_batch(ids, vectors, metadata)
        existing = [i for i in ids if i in self._label_of]
        if existing:
            raise ValueError(f"ids already in the index (use update): {existing[:5]}")
        if not ids:
            return
        if self._index is None or not self._index.is_trained:
            rows = self.training_rows(len(vectors))
            if rows is not None:
                self.train(vectors[rows])
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
        self._index.add_with_ids(vectors, labels)
        self._next_label += len(ids)
        for doc_id, label, meta in zip(ids, labels.tolist(), metadata):
            self._label_of[doc_id] = label
            self._id_of[label] = doc_id
            if meta:
                self._metadata[doc_id] = dict(meta)
        self._gpu_index = None

    def delete(self, ids: Sequence[str]) -> None:
        ids = check_known_ids(ids, self._label_of)
        labels = np.array([self._label_of[i] for i in ids], dtype=np.int64)
        if len(labels) and not self._try_remove(labels):
            self._hidden.update(labels.tolist())
        for doc_id in ids:
            label = self._label_of.pop(doc_id)
            self._id_of.pop(label)
            self._metadata.pop(doc_id, None)
        self._gpu_index = None

    def update(self, ids: Sequence[str], vectors, metadata: Sequence[dict[str, Any]] | None = None) -> None:
        """Replace the vectors (and metadata) of documents; ids not yet in the index are added."""
        ids, vectors, metadata = self._check_batch(ids, vectors, metadata)
        self.delete([i for i in ids if i in self._label_of])
        self.add(ids, vectors, metadata)

    # ------------------------------------------------------------------------------------------- search

    def search(self, queries, k: int = 10) -> SearchResult:
        """Top-k documents per query: (ids, scores), ids[i] a list of str, scores float32 [n_q, k].

        `k` is capped at the number of documents. If an approximate index finds fewer than k hits for
        a query, ids[i] is shorter and the missing scores are -inf.
        """
        queries = _as_matrix(queries, self.dim, "queries")
        check_k(k)
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(len(queries))], np.zeros((len(queries), 0), dtype=np.float32)
        distances, labels = self._search_faiss(queries, k)
        scores = -distances if self.metric == "l2" else distances
        scores = np.where(labels >= 0, scores, -np.inf).astype(np.float32)
        ids = [[self._id_of[label] for label in row if label >= 0] for row in labels.tolist()]
        return ids, scores

    def _search_faiss(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._hidden:
            hidden = faiss.IDSelectorBatch(np.fromiter(self._hidden, dtype=np.int64))
            params = self._search_parameters(faiss.IDSelectorNot(hidden))
            return self._index.search(queries, k, params=params)
        self._set_search_parameters(self._index)
        index = self._gpu_search_index() or self._index
        return index.search(queries, k)

    def _search_parameters(self, selector):
        if self._ivf() is not None:
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
        if self._hnsw() is not None:
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
        return faiss.SearchParameters(sel=selector)

    def _set_search_parameters(self, index) -> None:
        if (ivf := self._ivf()) is not None:
            ivf.nprobe = self.nprobe
        if (hnsw := self._hnsw()) is not None:
            hnsw.hnsw.efSearch = self.ef_search

    def _gpu_search_index(self):
        """A GPU copy of the index for searching, made once per change; None where faiss can't."""
        if not self.use_gpu or not faiss_has_gpu():
            return None
        if self._gpu_index is None:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            except (RuntimeError, AttributeError):  # index type without a GPU version (HNSW)
                self.use_gpu = False
                return None
        return self._gpu_index

    # -------------------------------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> None:
        """Save as a folder (manifest.json + data); a crash mid-save leaves the previous save loadable."""
        state = {
            "ids": list(self._label_of),
            "labels": list(self._label_of.values()),
            "metadata": self._metadata,
            "hidden_labels": sorted(self._hidden),
            "next_label": self._next_label,
        }
        try:
            state_json = json.dumps(state)
        except TypeError as err:
            raise ValueError(f"document metadata must be JSON-serialisable: {err}") from err
        files = {"ids.json": lambda path: path.write_text(state_json)}
        if self._index is not None:
            files["index.faiss"] = lambda path: faiss.write_index(self._index, str(path))
        manifest = {
            "index_type": self.index_type,
            "model_name": self.model_name,
            "dim": self.dim,
            "metric": self.metric,
            "kind": self.kind,
            "n_documents": len(self),
            "settings": {
                "nlist": self.nlist or (self._ivf().nlist if self._ivf() is not None else None),
                "pq_m": self.pq_m,
                "pq_bits": self.pq_bits,
                "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search,
                "nprobe": self.nprobe,
            },
        }
        save_index_folder(directory, files, manifest)

    @classmethod
    def from_folder(
        cls,
        manifest: dict,
        data_dir: Path,
        device: str | None = None,
        mmap: bool = False,
        use_gpu: bool | None = None,
    ) -> FaissIndex:
        """`FaissIndex.load(directory, mmap=True)` maps the vectors from disk instead of reading them
        into memory (faiss IO_FLAG_MMAP; the index is then read-only). `device` "cpu" or "cuda" decides
        `use_gpu` when that is not given."""
        _require_faiss()
        if use_gpu is None and device is not None:
            use_gpu = str(device).startswith("cuda")
        settings = manifest.get("settings", {})
        index = cls(
            dim=manifest["dim"],
            kind=manifest["kind"],
            metric=manifest["metric"],
            model_name=manifest.get("model_name"),
            nlist=settings.get("nlist"),
            pq_m=settings.get("pq_m"),
            pq_bits=settings.get("pq_bits", 8),
            hnsw_m=settings.get("hnsw_m", 32),
            ef_search=settings.get("ef_search", 128),
            nprobe=settings.get("nprobe", 16),
            use_gpu=use_gpu,
        )
        if "index.faiss" in manifest["files"]:
            index._index = _read_faiss(data_dir / "index.faiss", mmap)
        state = json.loads((data_dir / "ids.json").read_text())
        index._label_of = dict(zip(state["ids"], state["labels"]))
        index._id_of = {label: doc_id for doc_id, label in index._label_of.items()}
        index._metadata = state["metadata"]
        index._hidden = set(state["hidden_labels"])
        index._next_label = state["next_label"]
        if index._index is not None and index._index.ntotal != len(index) + len(index._hidden):
            raise IndexFormatError(
                f"{data_dir.parent}: the faiss index holds {index._index.ntotal} vectors but the id table "
                f"{len(index) + len(index._hidden)}"
            )
        return index

    # ---------------------------------------------------------------------------------------- internals

    def _new_faiss_index(self, nlist: int | None):
        factory = self.factory_string(nlist)
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(self.dim, factory, metric)
        except RuntimeError as err:
            raise ValueError(f"faiss cannot build index {factory!r} for dim {self.dim}: {err}") from err
        quantized = faiss.downcast_index(faiss.try_extract_index_ivf(index) or index)
        if getattr(quantized, "do_polysemous_training", False):
            # Only polysemous search uses it, and it makes PQ training a hundred times slower.
            quantized.do_polysemous_training = False
        if faiss.try_extract_index_ivf(index) is None:  # IVF indexes take ids natively
            index = faiss.IndexIDMap2(index)
        return index

    def factory_string(self, nlist: int | None = None) -> str:
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        if self.kind == "ivfpq":
            return f"IVF{nlist or self.nlist},PQ{self.pq_m}x{self.pq_bits}"
        return self.kind

    def training_rows(self, n_vectors: int) -> np.ndarray | None:
        """Which rows of a first add of `n_vectors` vectors train the index (sorted), or None when it
        needs no training. Makes the faiss index first (its default nlist follows `n_vectors`).

        A first add trains on these rows itself; a build that adds in parts (from shards) passes the
        same rows of the whole corpus to `train` first, and so gets the same index."""
        if self._index is None:
            self._index = self._new_faiss_index(self.nlist or _default_nlist(n_vectors))
        if self._index.is_trained:
            return None
        n_centroids = self._training_centroids()
        if n_vectors < n_centroids:
            raise ValueError(
                f"index {self.factory_string()!r} must be trained on its first add, which needs at least "
                f"{n_centroids} vectors (got {n_vectors}); add more documents at once or pick a "
                f"smaller nlist"
            )
        sample_size = min(n_vectors, TRAINING_POINTS_PER_CENTROID * n_centroids)
        return np.sort(np.random.default_rng(0).choice(n_vectors, size=sample_size, replace=False))

    def train(self, vectors) -> None:
        """Train the index (IVF lists, PQ codebooks) on `vectors` [n, dim] before the first add."""
        vectors = _as_matrix(vectors, self.dim, "training vectors")
        if self._index is None:
            self._index = self._new_faiss_index(self.nlist or _default_nlist(len(vectors)))
        try:
            self._index.train(vectors)
        except RuntimeError as err:
            raise ValueError(f"training faiss index {self.factory_string()!r} failed: {err}") from err

    def _training_centroids(self) -> int:
        """The largest k-means the training runs: IVF lists, or 2**bits codewords per PQ sub-vector."""
        counts = [1]
        if (ivf := self._ivf()) is not None:
            counts.append(ivf.nlist)
        if self.kind == "ivfpq":
            counts.append(2**self.pq_bits)
        return max(counts)

    def _try_remove(self, labels: np.ndarray) -> bool:
        try:
            self._index.remove_ids(faiss.IDSelectorBatch(labels))
        except RuntimeError:  # e.g. HNSW: faiss has no removal
            return False
        return True

    def _ivf(self):
        return None if self._index is None else faiss.try_extract_index_ivf(self._index)

    def _hnsw(self):
        if self._index is None:
            return None
        inner = self._index.index if isinstance(self._index, faiss.IndexIDMap) else self._index
        inner = faiss.downcast_index(inner)
        return inner if isinstance(inner, faiss.IndexHNSW) else None

    def _check_batch(self, ids, vectors, metadata):
        ids = as_id_list(ids)
        vectors = _as_matrix(vectors, self.dim, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors")
        if len(set(ids)) != len(ids):
            raise ValueError("ids within one call must be unique")
        if metadata is None:
            metadata = [None] * len(ids)
        elif len(metadata) != len(ids):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(ids)} ids")
        return ids, vectors, list(metadata)


def faiss_has_gpu() -> bool:
    return faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _require_faiss() -> None:
    if faiss is None:
        raise ImportError("FaissIndex needs faiss: pip install 'mbert-retrieval[faiss]' (or faiss-gpu)")


def _read_faiss(path: Path, mmap: bool):
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        raise IndexFormatError(f"faiss cannot read {path}: {err}") from err


def _as_matrix(vectors, dim: int, name: str) -> np.ndarray:
    if hasattr(vectors, "detach"):  # a torch tensor
        vectors = vectors.detach().float().cpu().numpy()
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim == 1 and array.size == dim:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def _default_nlist(n_vectors: int) -> int:
    """About 4 * sqrt(n) lists (a power of two), keeping >= 39 training points per list."""
    target = min(4 * math.sqrt(n_vectors), n_vectors / 39)
    return 2 ** max(0, math.floor(math.log2(max(target, 1))))


def _default_pq_m(dim: int) -> int:
    """The most sub-quantizers <= min(64, dim / 2) that divide dim."""
    return max(m for m in range(1, max(1, min(64, dim // 2)) + 1) if dim % m == 0)
