"""PlaidIndex: multi-vector (ColBERT) search in plain torch, on CPU or CUDA.

    index = PlaidIndex(nbits=2, device="cuda")          # trains its centroids on the first add
    index.add(ids, doc_embeddings)                       # one [n_tokens_i, dim] matrix per document
    ids, scores = index.search(query_embeddings, k=10)   # [n_q, q_len, dim]
    index.save("my-plaid"); index = PlaidIndex.load("my-plaid", device="cuda")

It follows the `Index` protocol (index/base.py). `PlaidIndex.build(doc_embeddings, ids, ...)` does
the first two lines in one call.

Layout (all documents packed end to end, one row per token):
    codes       [n_tokens]              nearest centroid of each token
    residuals   [n_tokens, dim*nbits/8] the token minus its centroid, quantized (see codec.py)
    doc_offsets [n_docs + 1]            where each document's tokens start
    ivf         centroid -> the documents holding a token of that centroid (packed lists + offsets)

Search, for a batch of queries (the stages of PLAID, Santhanam et al. 2022):
    1. candidates: every document in the lists of the probed centroids, which are each query token's
       `n_probe` best plus the `n_query_probe` best for the query as a whole (score summed over its
       tokens). ColBERT query tokens are redundant (the [MASK] expansion tokens nearly coincide), so
       per-token probing alone reaches few distinct centroids; the summed score spreads the probes over
       the centroids whose documents score high on MaxSim.
    2. centroid interaction: each candidate's MaxSim computed with centroid scores instead of its tokens,
       counting only centroids that score >= `centroid_score_threshold` with some query token (pruning).
    3. exact MaxSim on the decompressed tokens of the `n_candidates` best, and the top k of those.
All stages run on packed tensors with offsets (scatter/segment reductions), never a Python loop over
documents.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mbert_retrieval.index.base import (
    Index,
    ListedIds,
    SearchResult,
    as_id_list,
    check_k,
    check_known_ids,
    check_new_ids,
)
from mbert_retrieval.index.codec import NBITS, ResidualCodec
from mbert_retrieval.index.kmeans import train_kmeans
from mbert_retrieval.index.storage import IndexFormatError, save_index_folder

SHARD_TOKENS = 1 << 20  # tokens encoded at once while building
OLD_ADD_ORDER = "PlaidIndex.add(embeddings, ids) is deprecated: pass ids first, add(ids, embeddings)"


class PlaidIndex(ListedIds, Index):
    index_type = "plaid"

    def __init__(
        self,
        codec: ResidualCodec | None = None,
        model_name: str | None = None,
        *,
        nbits: int = 2,
        n_centroids: int | None = None,
        kmeans_iters: int = 4,
        kmeans_sample_docs: int | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
    ):
        """An index around a fitted `codec`, or one that fits its codec on its first `add`.

        The first add runs k-means on a sample of its documents (`kmeans_sample_docs`, from anywhere
        in a sequence; the first ones of an iterator) and fits `nbits` residual buckets; later adds
        use those centroids. `n_centroids` defaults to PLAID's 2**floor(log2(16 * sqrt(n_tokens))).
        """
        if nbits not in NBITS:
            raise ValueError(f"nbits must be one of {NBITS}, got {nbits}")
        self.model_name = model_name
        self.settings = dict(
            nbits=nbits,
            n_centroids=n_centroids,
            kmeans_iters=kmeans_iters,
            kmeans_sample_docs=kmeans_sample_docs,
            seed=seed,
        )
        self.codec = None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dim = self.n_centroids = None
        self._set_ids([])
        if codec is not None:
            self._use_codec(codec)

    def _use_codec(self, codec: ResidualCodec) -> None:
        """Take a fitted codec, with empty storage on its device."""
        self.codec = codec
        self.device = codec.centroids.device
        self.dim = codec.dim
        self.n_centroids = len(codec.centroids)
        # Centroid ids fit in 16 bits for up to 65536 centroids; stored as int16 bit patterns.
        self._code_dtype = torch.int16 if self.n_centroids <= 1 << 16 else torch.int32
        self.codes = torch.zeros(0, dtype=self._code_dtype, device=self.device)
        self.residuals = torch.zeros(0, codec.bytes_per_token, dtype=torch.uint8, device=self.device)
        self.doc_lengths = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._refresh_layout()

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        doc_embeddings: Sequence | Iterable,
        ids: Sequence[str],
        *,
        show_progress: bool = True,
        **settings,
    ) -> PlaidIndex:
        """Build from one `[n_tokens_i, dim]` array (numpy or torch) per document, in the order of `ids`:
        `PlaidIndex(**settings)` (nbits, n_centroids, device, model_name, ...), then `add`.

        `doc_embeddings` may be a lazy sequence or a one-pass iterator: documents are read in shards, so
        the corpus need not fit in memory.
        """
        ids = as_id_list(ids)
        if not ids:
            raise ValueError("cannot build an index from an empty corpus")
        index = cls(**settings)
        index.add(ids, doc_embeddings, show_progress=show_progress)
        return index

    def add(self, ids: Sequence[str], embeddings: Sequence | Iterable, show_progress: bool = False) -> None:
        """Add documents: one [n_tokens_i, dim] array each, a sequence or a one-pass iterator. The first
        add fits the centroids; later ones compress with them (no retraining)."""
        if _looks_like_ids(embeddings) and not _looks_like_ids(ids):
            warnings.warn(OLD_ADD_ORDER, DeprecationWarning, stacklevel=2)
            ids, embeddings = embeddings, ids
        ids = check_new_ids(ids, existing=self._position)
        if not ids:
            return
        documents = self._fit_codec(embeddings, len(ids)) if self.codec is None else iter(embeddings)
        self._append(documents, ids, show_progress)

    def _fit_codec(self, embeddings, n_docs: int) -> Iterator:
        """Fit centroids and residual buckets on a sample of the documents; returns an iterator over
        all of them (each read at most twice)."""
        nbits, n_centroids, seed = self.settings["nbits"], self.settings["n_centroids"], self.settings["seed"]
        n_sample = self.settings["kmeans_sample_docs"] or min(n_docs, 1 + int(16 * math.sqrt(120 * n_docs)))
        sample_docs, stream = _sample_and_stream(embeddings, n_docs, n_sample, seed)
        sample = torch.cat([_as_doc_tensor(doc, None, "document") for doc in sample_docs]).to(self.device)
        if n_centroids is None:
            estimated_tokens = len(sample) / len(sample_docs) * n_docs
            n_centroids = 2 ** math.floor(math.log2(16 * math.sqrt(estimated_tokens)))
        n_centroids = min(n_centroids, len(sample))
        centroids = train_kmeans(sample.float(), n_centroids, self.settings["kmeans_iters"], seed)
        centroids = torch.nn.functional.normalize(centroids, dim=-1)
        self._use_codec(ResidualCodec.fit(centroids, _residual_sample(sample, seed), nbits))
        return stream

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents: their tokens are dropped and the inverted lists rebuilt."""
        ids = check_known_ids(ids, self._position)
        if not ids:
            return
        keep_docs = torch.ones(len(self._ids), dtype=torch.bool)
        keep_docs[[self._position[i] for i in ids]] = False
        keep_tokens = torch.repeat_interleave(keep_docs.to(self.device), self.doc_lengths)
        self.codes = self.codes[keep_tokens]
        self.residuals = self.residuals[keep_tokens]
        self.doc_lengths = self.doc_lengths[keep_docs.to(self.device)]
        self._ids = [doc_id for doc_id, keep in zip(self._ids, keep_docs.tolist()) if keep]
        self._refresh_layout()

    def _append(self, documents: Iterator, ids: list[str], show_progress: bool) -> None:
        codes, residuals, lengths = [self.codes], [self.residuals], [self.doc_lengths]
        progress = tqdm(total=len(ids), desc="compressing documents", unit="doc", disable=not show_progress)
        shard, shard_tokens, position = [], 0, 0
        for doc in itertools.chain(documents, [None]):
            if doc is not None:
                if position + len(shard) >= len(ids):
                    raise ValueError(f"got more documents than the {len(ids)} ids")
                shard.append(_as_doc_tensor(doc, self.dim, f"document {ids[position + len(shard)]!r}"))
                shard_tokens += len(shard[-1])
            if shard and (doc is None or shard_tokens >= SHARD_TOKENS):
                tokens = torch.cat(shard)
                if not torch.isfinite(tokens).all():
                    raise ValueError("document embeddings contain NaN or infinite values")
                shard_codes, shard_residuals = self.codec.encode(tokens)
                codes.append(shard_codes.to(self._code_dtype))
                residuals.append(shard_residuals)
                lengths.append(torch.tensor([len(d) for d in shard], device=self.device))
                position += len(shard)
                progress.update(len(shard))
                shard, shard_tokens = [], 0
        progress.close()
        if position != len(ids):
            raise ValueError(f"got {position} documents for {len(ids)} ids")
        self.codes, self.residuals = torch.cat(codes), torch.cat(residuals)
        self.doc_lengths = torch.cat(lengths)
        self._ids.extend(ids)
        self._refresh_layout()

    def _refresh_layout(self) -> None:
        """Recompute the derived tables: id positions, document offsets and the inverted lists."""
        self._set_ids(self._ids)
        n_docs = len(self._ids)
        self.doc_offsets = torch.nn.functional.pad(self.doc_lengths.cumsum(0), (1, 0))
        doc_of_token = torch.repeat_interleave(torch.arange(n_docs, device=self.device), self.doc_lengths)
        # One entry per distinct (centroid, document) pair, sorted by centroid then document.
        pairs = torch.unique(self._centroid_ids(self.codes) * max(n_docs, 1) + doc_of_token)
        self.ivf_docs = (pairs % max(n_docs, 1)).to(torch.int32)
        list_lengths = torch.bincount(pairs // max(n_docs, 1), minlength=self.n_centroids)
        self.ivf_offsets = torch.nn.functional.pad(list_lengths.cumsum(0), (1, 0))

    def _centroid_ids(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.long()
        return codes & 0xFFFF if self._code_dtype == torch.int16 else codes

    # ---------------------------------------------------------------------------------------- contents

    @property
    def n_tokens(self) -> int:
        return 0 if self.codec is None else len(self.codes)

    def memory_bytes(self) -> int:
        """Bytes of the tensors searching needs (codes, residuals, layout, inverted lists, codec)."""
        if self.codec is None:
            return 0
        tensors = [self.codes, self.residuals, self.doc_lengths, self.doc_offsets, self.ivf_docs]
        tensors += [self.ivf_offsets, *self.codec.state().values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def document_embeddings(self, doc_id: str) -> torch.Tensor:
        """The decompressed token embeddings of one document, float32 [n_tokens, dim]."""
        if doc_id not in self._position:
            raise KeyError(f"id {doc_id!r} is not in the index")
        i = self._position[doc_id]
        start, end = self.doc_offsets[i].item(), self.doc_offsets[i + 1].item()
        return self.codec.decode(self._centroid_ids(self.codes[start:end]), self.residuals[start:end])

    # ------------------------------------------------------------------------------------------ search

    @torch.inference_mode()
    def search(
        self,
        query_embeddings,
        k: int = 10,
        n_probe: int = 4,
        n_query_probe: int = 64,
        centroid_score_threshold: float = 0.4,
        n_candidates: int = 512,
        batch_size: int = 32,
    ) -> SearchResult:
        """Top-k documents by MaxSim for each query: (ids, scores float32 [n_q, k]).

        `query_embeddings`: [n_q, q_len, dim] (numpy or torch), or a list of [q_len_i, dim] arrays.
        `n_probe`: centroids per query token whose lists give the candidates, and `n_query_probe`:
        centroids for the whole query (best summed score over its tokens); `centroid_score_threshold`:
        centroids scoring below it with every query token are left out of the centroid interaction;
        `n_candidates`: documents re-scored exactly. `k` is capped at the number of documents; a query
        with fewer than k candidates gets a shorter id list and -inf scores in the missing places.
        """
        queries = self._as_queries(query_embeddings)
        check_k(k)
        if n_probe <= 0 or n_candidates <= 0 or batch_size <= 0 or n_query_probe < 0:
            raise ValueError("n_probe, n_candidates and batch_size must be positive, n_query_probe >= 0")
        k = min(k, len(self))
        all_ids, all_scores = [], []
        for batch in queries.split(batch_size):
            if k == 0:
                all_ids += [[] for _ in batch]
                all_scores.append(torch.zeros(len(batch), 0))
                continue
            docs, scores = self._search_batch(
                batch, k, n_probe, n_query_probe, centroid_score_threshold, max(n_candidates, k)
            )
            scores = scores.float().cpu()
            for row, row_scores in zip(docs.tolist(), scores.tolist()):
                all_ids.append([self._ids[d] for d, s in zip(row, row_scores) if s > -math.inf])
            all_scores.append(scores)
        return all_ids, torch.cat(all_scores).numpy()

    def _search_batch(self, queries, k, n_probe, n_query_probe, threshold, n_candidates):
        _, shortlist, valid = self._shortlist(queries, n_probe, n_query_probe, threshold, n_candidates)
        exact = self._maxsim(queries, shortlist, valid)
        scores, best = exact.topk(min(k, exact.shape[1]), dim=1)
        return shortlist.gather(1, best), scores

    def _shortlist(self, queries, n_probe, n_query_probe, threshold, n_candidates):
        """Stages 1 and 2: the candidates ([B, n_docs] mask) and the `n_candidates` best of them by
        centroid interaction (columns [B, n'] and their validity, as `_top_per_row` gives them)."""
        centroid_scores = queries @ self.codec.centroids.to(queries.dtype).T  # [B, L, n_centroids]
        candidates = self._probe(centroid_scores, n_probe, n_query_probe)
        approximate = self._centroid_interaction(centroid_scores, candidates, threshold)
        return candidates, *_top_per_row(candidates, approximate, n_candidates)

    def _probe(self, centroid_scores: torch.Tensor, n_probe: int, n_query_probe: int = 0) -> torch.Tensor:
        """Stage 1: a [B, n_docs] mask of the documents in the lists of each query token's `n_probe`
        best centroids and of the query's `n_query_probe` best by summed score."""
        batch = len(centroid_scores)
        probed = torch.zeros(batch, self.n_centroids, dtype=torch.bool, device=self.device)
        per_token = centroid_scores.topk(min(n_probe, self.n_centroids), dim=-1).indices
        probed.scatter_(1, per_token.flatten(1), True)
        if n_query_probe:
            summed = centroid_scores.float().sum(1)  # [B, n_centroids]
            probed.scatter_(1, summed.topk(min(n_query_probe, self.n_centroids), dim=-1).indices, True)
        query_of_cell, cell = probed.nonzero().unbind(1)
        docs, owner = self._expand_lists(cell)
        candidates = torch.zeros(batch, len(self), dtype=torch.bool, device=self.device)
        candidates[query_of_cell[owner], docs] = True
        return candidates

    def _centroid_interaction(self, centroid_scores, candidates, threshold) -> torch.Tensor:
        """Stage 2: approximate MaxSim of every candidate (in `candidates.nonzero()` order).

        For each candidate and query token: the best score of a centroid that holds one of the
        document's tokens and passes the threshold (0 if none). Walking the kept centroids' lists finds
        exactly those (document, centroid) pairs.
        """
        kept_query, kept_cell = (centroid_scores.amax(1) >= threshold).nonzero().unbind(1)
        docs, owner = self._expand_lists(kept_cell)
        query = kept_query[owner]
        slot = (candidates.flatten().cumsum(0) - 1).view_as(candidates)  # row of each candidate
        is_candidate = candidates[query, docs]
        rows = slot[query, docs][is_candidate]
        cell_scores = centroid_scores.transpose(1, 2)[query[is_candidate], kept_cell[owner[is_candidate]]]
        per_token = torch.zeros(
            int(candidates.sum()), centroid_scores.shape[1], device=self.device, dtype=centroid_scores.dtype
        )
        per_token.scatter_reduce_(0, rows[:, None].expand_as(cell_scores), cell_scores, "amax")
        return per_token.sum(1)

    def _maxsim(self, queries, shortlist, valid) -> torch.Tensor:
        """Stage 3: exact MaxSim of the shortlisted documents on their decompressed tokens."""
        batch, width = shortlist.shape
        lengths = torch.where(valid, self.doc_lengths[shortlist], 0).flatten()
        owner = torch.repeat_interleave(torch.arange(batch * width, device=self.device), lengths)
        token_starts = self.doc_offsets[shortlist.flatten()] - (lengths.cumsum(0) - lengths)
        tokens = torch.arange(len(owner), device=self.device) + token_starts[owner]
        embeddings = self.codec.decode(
            self._centroid_ids(self.codes[tokens]), self.residuals[tokens], queries.dtype
        )

        # Pad each query's tokens into one row of a batch so a single bmm scores them all.
        per_query = lengths.view(batch, width).sum(1)
        query_of_token = owner // width
        position = (
            torch.arange(len(owner), device=self.device) - (per_query.cumsum(0) - per_query)[query_of_token]
        )
        padded = torch.zeros(batch, int(per_query.max()), self.dim, dtype=queries.dtype, device=self.device)
        padded[query_of_token, position] = embeddings
        similarities = torch.bmm(padded, queries.transpose(1, 2))[query_of_token, position]  # [tokens, L]

        best = torch.full(
            (batch * width, queries.shape[1]), -math.inf, dtype=queries.dtype, device=self.device
        )
        best.scatter_reduce_(0, owner[:, None].expand_as(similarities), similarities, "amax")
        scores = best.float().sum(1).view(batch, width)
        return scores.masked_fill(~valid, -math.inf)

    def _expand_lists(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The documents of each given centroid's list, packed, with the position of their centroid."""
        starts, ends = self.ivf_offsets[cells], self.ivf_offsets[cells + 1]
        lengths = ends - starts
        owner = torch.repeat_interleave(torch.arange(len(cells), device=self.device), lengths)
        offsets_in_list = torch.arange(len(owner), device=self.device) - (lengths.cumsum(0) - lengths)[owner]
        return self.ivf_docs[starts[owner] + offsets_in_list].long(), owner

    def _as_queries(self, query_embeddings) -> torch.Tensor:
        if isinstance(query_embeddings, (list, tuple)):
            rows = [_as_doc_tensor(q, self.dim, "query") for q in query_embeddings]
            if not rows:
                raise ValueError("no queries given")
            queries = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        else:
            queries = query_embeddings
            if not torch.is_tensor(queries):
                queries = torch.from_numpy(np.asarray(queries))
            if queries.ndim == 2:
                queries = queries[None]
            if queries.ndim != 3 or queries.shape[-1] != (self.dim or queries.shape[-1]):
                raise ValueError(
                    f"query_embeddings must have shape [n_q, q_len, {self.dim}], got {tuple(queries.shape)}"
                )
        if not torch.isfinite(queries).all():
            raise ValueError("query_embeddings contain NaN or infinite values")
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        return queries.to(self.device, dtype)

    # ------------------------------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> None:
        """Save as a folder (manifest.json + data); a crash mid-save leaves the previous save loadable."""
        from safetensors.torch import save_file

        def tensors(**named):
            return {name: t.detach().contiguous().cpu() for name, t in named.items()}

        files = {"ids.json": lambda path: path.write_text(json.dumps(self._ids))}
        if self.codec is not None:  # an index that has not seen a document has no centroids yet
            codec = tensors(**self.codec.state())
            documents = tensors(codes=self.codes, residuals=self.residuals, doc_lengths=self.doc_lengths)
            files["codec.safetensors"] = lambda path: save_file(codec, str(path))
            files["documents.safetensors"] = lambda path: save_file(documents, str(path))
        manifest = {
            "index_type": self.index_type,
            "model_name": self.model_name,
            "dim": self.dim,
            "metric": "maxsim",
            "nbits": self.settings["nbits"] if self.codec is None else self.codec.nbits,
            "n_centroids": self.n_centroids,
            "n_documents": len(self),
            "n_tokens": self.n_tokens,
            "settings": self.settings,
        }
        save_index_folder(directory, files, manifest)

    @classmethod
    def from_folder(
        cls, manifest: dict, data_dir: Path, device: str | torch.device | None = None
    ) -> PlaidIndex:
        from safetensors.torch import load_file

        directory = data_dir.parent
        settings = {"nbits": manifest.get("nbits", 2), **manifest.get("settings", {})}
        index = cls(model_name=manifest.get("model_name"), device=device, **settings)
        if "codec.safetensors" not in manifest["files"]:
            return index
        try:
            codec = load_file(str(data_dir / "codec.safetensors"), device=str(index.device))
            documents = load_file(str(data_dir / "documents.safetensors"), device=str(index.device))
            ids = json.loads((data_dir / "ids.json").read_text())
            index._use_codec(ResidualCodec(**codec))
        except Exception as err:  # safetensors and json raise their own error types
            raise IndexFormatError(f"{directory}: unreadable index data: {err}") from err
        index.codes = documents["codes"].to(index._code_dtype)
        index.residuals, index.doc_lengths = documents["residuals"], documents["doc_lengths"]
        index._ids = ids
        if len(ids) != len(index.doc_lengths) or int(index.doc_lengths.sum()) != len(index.codes):
            raise IndexFormatError(f"{directory}: ids, document lengths and token codes disagree in size")
        index._refresh_layout()
        return index


# ------------------------------------------------------------------------------------------ helpers


def _top_per_row(mask: torch.Tensor, values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of the n largest `values` in each row of `mask` (values given in mask.nonzero() order).

    Returns (columns [B, n'], valid [B, n']) with n' = min(n, the most entries in a row); rows with fewer
    entries are padded with column 0, marked invalid.
    """
    rows, columns = mask.nonzero().unbind(1)
    per_row = mask.sum(1)
    first = per_row.cumsum(0) - per_row
    longest = max(1, int(per_row.max()))
    padded = torch.full((len(mask), longest), -math.inf, dtype=values.dtype, device=mask.device)
    padded[rows, torch.arange(len(rows), device=mask.device) - first[rows]] = values
    top = padded.topk(min(n, longest), dim=1).indices
    valid = top < per_row[:, None]
    if len(columns) == 0:
        return torch.zeros_like(top), valid
    picked = columns[(first[:, None] + top).clamp(max=len(columns) - 1)]
    return torch.where(valid, picked, 0), valid


def _sample_and_stream(documents, n_docs: int, n_sample: int, seed: int):
    """A k-means sample of documents and an iterator over all of them (reading each at most twice)."""
    if isinstance(documents, Sequence) or (
        hasattr(documents, "__len__") and hasattr(documents, "__getitem__")
    ):
        if len(documents) != n_docs:
            raise ValueError(f"got {len(documents)} documents for {n_docs} ids")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n_docs, generator=generator)[:n_sample].sort().values.tolist()
        return [documents[i] for i in chosen], iter(documents)
    iterator = iter(documents)
    head = list(itertools.islice(iterator, n_sample))
    if not head:
        raise ValueError("cannot build an index from an empty corpus")
    return head, itertools.chain(head, iterator)


def _residual_sample(sample: torch.Tensor, seed: int, limit: int = 1 << 15) -> torch.Tensor:
    if len(sample) <= limit:
        return sample
    generator = torch.Generator().manual_seed(seed + 1)
    return sample[torch.randperm(len(sample), generator=generator)[:limit].to(sample.device)]


def _as_doc_tensor(array, dim: int | None, what: str) -> torch.Tensor:
    tensor = array.detach() if torch.is_tensor(array) else torch.from_numpy(np.asarray(array))
    if tensor.ndim != 2 or (dim is not None and tensor.shape[1] != dim):
        raise ValueError(f"{what} must have shape [n_tokens, {dim or 'dim'}], got {tuple(tensor.shape)}")
    if len(tensor) == 0:
        raise ValueError(f"{what} has no token embeddings")
    if not tensor.is_floating_point():
        raise ValueError(f"{what} must hold floats, got {tensor.dtype}")
    return tensor


def _looks_like_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(i, str) for i in value)
