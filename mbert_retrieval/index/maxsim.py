"""MaxSim, the ColBERT score, and MaxSimIndex: exact (exhaustive) MaxSim over every stored document.

    index = MaxSimIndex(model_name="my-colbert")
    index.add(ids, doc_embeddings)                       # one [n_tokens_i, dim] matrix per document
    ids, scores = index.search(query_embeddings, k=10)   # [n_q, q_len, dim]

It follows the `Index` protocol (index/base.py). The token vectors are kept in float16 on the CPU and
every query is scored against every document: exact, and the reference PlaidIndex approximates, but
its cost grows with the corpus. `maxsim` is the scoring function `ColBERT.score` uses too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

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

MAXSIM_CHUNK_ELEMENTS = 1 << 26  # similarity entries computed at once when scoring
QUERY_BATCH = 64  # queries scored together in a search


def maxsim(queries, documents) -> np.ndarray | torch.Tensor:
    """MaxSim of queries [n, Lq, d] against documents -> [n, m]: for each query token the best dot
    product with any token of the document, summed over the query tokens.

    `documents` is a list of [n_i, d] matrices (or anything with a `to_list()` giving one, such as
    ColBERT's PackedEmbeddings); one query [Lq, d] gives [m]. numpy queries give numpy scores.
    """
    as_numpy = isinstance(queries, np.ndarray)
    q = torch.as_tensor(queries).float()
    single = q.dim() == 2
    if single:
        q = q[None]
    if q.dim() != 3:
        raise ValueError(f"queries must be [n, query_length, dim], got shape {tuple(q.shape)}")
    docs = documents.to_list() if hasattr(documents, "to_list") else list(documents)
    docs = [torch.as_tensor(d).float() for d in docs]
    for i, d in enumerate(docs):
        if d.dim() != 2 or d.shape[-1] != q.shape[-1]:
            raise ValueError(f"documents[{i}] has shape {tuple(d.shape)}; expected [n_tokens, {q.shape[-1]}]")
    scores = torch.zeros(q.shape[0], len(docs))
    if docs:
        longest = max(max(len(d) for d in docs), 1)
        step = max(1, MAXSIM_CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * longest))
        for start in range(0, len(docs), step):
            chunk = docs[start : start + step]
            padded = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)  # [m, Ld, d]
            lengths = torch.tensor([len(d) for d in chunk])
            valid = torch.arange(padded.shape[1])[None, :] < lengths[:, None]  # [m, Ld]
            sims = torch.einsum("qid,mjd->qmij", q, padded)
            sims = sims.masked_fill(~valid[None, :, None, :], float("-inf"))
            best = sims.max(dim=-1).values
            scores[:, start : start + len(chunk)] = torch.where(best.isinf(), 0.0, best).sum(dim=-1)
    scores = scores[0] if single else scores
    return scores.numpy() if as_numpy else scores


class MaxSimIndex(ListedIds, Index):
    index_type = "maxsim"

    def __init__(self, model_name: str | None = None):
        self.model_name = model_name
        self._set_ids([])
        self._vectors: list[torch.Tensor] = []  # one float16 [n_tokens, dim] per document

    @property
    def dim(self) -> int | None:
        return self._vectors[0].shape[1] if self._vectors else None

    def add(self, ids: Sequence[str], embeddings: Sequence) -> None:
        """Add documents: one [n_tokens_i, dim] array (numpy or torch) each."""
        ids, embeddings = check_new_ids(ids, existing=self._position), list(embeddings)
        if len(ids) != len(embeddings):
            raise ValueError(f"got {len(embeddings)} documents for {len(ids)} ids")
        vectors = [_as_token_matrix(e, self.dim, f"document {i!r}") for i, e in zip(ids, embeddings)]
        self._vectors += vectors
        self._set_ids(self._ids + ids)

    def delete(self, ids: Sequence[str]) -> None:
        gone = set(check_known_ids(ids, self._position))
        keep = [n for n, doc_id in enumerate(self._ids) if doc_id not in gone]
        self._vectors = [self._vectors[n] for n in keep]
        self._set_ids([self._ids[n] for n in keep])

    def search(self, query_embeddings, k: int = 10) -> SearchResult:
        """Top-k documents by exact MaxSim: (ids, scores float32 [n_q, min(k, n_docs)]).

        `query_embeddings`: [n_q, q_len, dim] (numpy or torch), or one query [q_len, dim]."""
        check_k(k)
        queries = np.asarray(torch.as_tensor(query_embeddings).float())
        queries = queries[None] if queries.ndim == 2 else queries
        batches = (queries[start : start + QUERY_BATCH] for start in range(0, len(queries), QUERY_BATCH))
        rows = (row for batch in batches for row in maxsim(batch, self._vectors))
        return best_per_query(rows, self._ids, k)

    # ------------------------------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = flat_vectors(self._vectors)
        files = {
            "vectors.safetensors": lambda path: save_file(tensors, str(path)),
            "ids.json": lambda path: path.write_text(json.dumps(self._ids)),
        }
        manifest = {
            "index_type": self.index_type,
            "model_name": self.model_name,
            "dim": self.dim,
            "metric": "maxsim",
            "n_documents": len(self),
        }
        save_index_folder(directory, files, manifest)

    @classmethod
    def from_folder(cls, manifest: dict, data_dir: Path, device: str | None = None) -> MaxSimIndex:
        """(It searches on the CPU, whatever the `device`.)"""
        try:
            ids = json.loads((data_dir / "ids.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IndexFormatError(f"{data_dir.parent}: unreadable id list: {err}") from err
        return cls.from_vectors_file(data_dir / "vectors.safetensors", ids, manifest.get("model_name"))

    @classmethod
    def from_vectors_file(cls, path, ids: list[str], model_name: str | None = None) -> MaxSimIndex:
        """An index from a safetensors file of all token vectors end to end ("vectors") and the
        number of tokens of each document ("lengths"), in the order of `ids`."""
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            vectors, lengths = tensors["vectors"], tensors["lengths"].tolist()
        except Exception as err:  # safetensors raises its own error types
            raise IndexFormatError(f"{path}: unreadable ColBERT vectors: {err}") from err
        if len(lengths) != len(ids) or sum(lengths) != len(vectors):
            raise IndexFormatError(f"{path}: the vectors do not match the {len(ids)} documents")
        index = cls(model_name)
        index._vectors = list(torch.split(vectors, lengths))
        index._set_ids(list(ids))
        return index


def flat_vectors(documents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Documents' token matrices end to end, with their lengths (the layout `from_vectors_file` reads)."""
    lengths = torch.tensor([len(d) for d in documents], dtype=torch.int64)
    vectors = torch.cat(documents) if documents else torch.zeros(0, 0, dtype=torch.float16)
    return {"vectors": vectors.contiguous(), "lengths": lengths}


def _as_token_matrix(array, dim: int | None, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array.detach().cpu())
    if tensor.ndim != 2 or (dim is not None and tensor.shape[1] != dim):
        raise ValueError(f"{what} must have shape [n_tokens, {dim or 'dim'}], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise ValueError(f"{what} must hold finite floats")
    return tensor.to(torch.float16)
