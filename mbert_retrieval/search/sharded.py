"""Indexing a corpus in shards: each process (a torchrun rank, on any machine) encodes one contiguous
part of the corpus and writes it to disk; a merge then builds the retriever folder from the shards.

    encode_shard(shards_dir, rank, world_size, ids, texts, model, model_name)   # on every rank
    merge_shards(shards_dir, output, "ivfpq")                                   # once, when all are done

A shard is a folder `shard-<rank>-of-<world size>/` holding documents.jsonl (ids and texts), vectors.bin
(raw float32 vectors: one per document, or one per token for a ColBERT model), lengths.bin (int64 tokens
per document, ColBERT only) and shard.json: what it holds (model name, a digest of the model folder, the
document range and a digest of its documents) and the size and sha256 of each file. It is written in a
hidden temp folder, every file fsynced, and renamed into place: a shard folder is complete or absent. A
rank whose shard is already there, for the same model and documents, keeps it; re-running a killed rank
(or the whole job) redoes only the missing shards.

The merge never holds every float vector in one process: a FAISS index trained on a sample (the rows
a single-process build would take) is filled shard by shard, and a PLAID index fits its centroids on a
sample of documents and compresses the shards' token vectors as it streams through them. Only an exact
index (flat, or MaxSim for ColBERT) keeps all the vectors, because that is what it is.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mbert_retrieval.files import atomic_write, atomic_write_text, file_sha256, fsync_dir
from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.models import encoding

SHARD_FORMAT = 1
SHARD_MANIFEST = "shard.json"
ENCODE_CHUNK_SEGMENTS = 4  # encoder segments (encoding.TOKENIZE_CHUNK documents) per call in a shard
ADD_CHUNK_ROWS = 1 << 18  # vectors handed to a FAISS index per add while merging
# float32 as the model gives them: a merge then builds what a single process builds (float16 shards
# moved PLAID's centroids enough to change 2-3% of a random tiny model's top 10)
VECTOR_DTYPE = np.float32
SHARD_NAME = re.compile(r"^shard-(\d{5})-of-(\d{5})$")


class ShardError(IndexFormatError):
    """A shard that is missing, incomplete, corrupt, or from another model, corpus or run."""


# -- writing a shard ---------------------------------------------------------------------------------


def shard_range(n_documents: int, rank: int, world_size: int) -> tuple[int, int]:
    """The documents [start, end) of shard `rank`: contiguous parts of (nearly) equal size, cut at
    multiples of the encoder's segment (`encoding.TOKENIZE_CHUNK` documents), so each shard is encoded
    in the batches, and to the very vectors, that one process encoding the whole corpus gets."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not between 0 and world size {world_size} - 1")
    segment = encoding.TOKENIZE_CHUNK
    segments = -(-n_documents // segment)
    start, end = (segments * r // world_size * segment for r in (rank, rank + 1))
    return min(start, n_documents), min(end, n_documents)


def shard_folder(shards_dir: Path, rank: int, world_size: int) -> Path:
    return Path(shards_dir) / f"shard-{rank:05d}-of-{world_size:05d}"


def documents_digest(ids: Sequence[str], texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for doc_id, text in zip(ids, texts):
        digest.update(json.dumps([doc_id, text]).encode())
    return digest.hexdigest()


def model_digest(model_dir: Path) -> str:
    """sha256 over the files of a model folder (names and contents): the same model on every machine."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(model_dir)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


@dataclass
class ShardStatus:
    folder: Path
    n_documents: int
    encoded: bool  # False: a finished shard was kept


def encode_shard(
    shards_dir: str | os.PathLike,
    rank: int,
    world_size: int,
    ids: Sequence[str],
    texts: Sequence[str],
    model,
    model_name: str,
    *,
    model_fingerprint: str = "",
    show_progress: bool = True,
    progress_position: int | None = None,
) -> ShardStatus:
    """Encode this rank's part of the corpus (all of `ids` / `texts`, the same on every rank) into its
    shard folder, unless a finished shard for the same model and documents is there already."""
    from mbert_retrieval.search.retriever import is_multi_vector

    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
    n_total = len(ids)
    start, end = shard_range(n_total, rank, world_size)
    ids, texts = list(ids[start:end]), list(texts[start:end])
    folder = shard_folder(shards_dir, rank, world_size)
    identity = {
        "format": SHARD_FORMAT,
        "rank": rank,
        "world_size": world_size,
        "start": start,
        "end": end,
        "n_total": n_total,
        "kind": "multi_vector" if is_multi_vector(model) else "single_vector",
        "model_name": model_name,
        "model_digest": model_fingerprint,
        "documents_digest": documents_digest(ids, texts),
    }
    if _finished(folder, identity):
        return ShardStatus(folder, len(ids), encoded=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".tmp-{folder.name}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        described = _write_vectors(
            staging,
            texts,
            model,
            identity["kind"],
            f"shard {rank + 1}/{world_size}",
            show_progress,
            progress_position,
        )
        _write_documents(staging / "documents.jsonl", ids, texts)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in staging.iterdir()}
        manifest = {**identity, **described, "n_documents": len(ids), "files": files}
        atomic_write_text(staging / SHARD_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ShardStatus(folder, len(ids), encoded=True)


def _finished(folder: Path, identity: dict) -> bool:
    """A complete shard (its files of the recorded sizes) written for the same model and documents."""
    try:
        manifest = json.loads((folder / SHARD_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(key) != value for key, value in identity.items()):
        return False
    files = manifest.get("files") or {}
    return bool(files) and all(
        (folder / name).is_file() and (folder / name).stat().st_size == entry.get("bytes")
        for name, entry in files.items()
    )


def _write_vectors(staging, texts, model, kind, desc, show_progress, position) -> dict:
    """Encode in chunks, appending raw vectors (and token counts) to files; returns their shape."""
    dtype = VECTOR_DTYPE
    progress = tqdm(
        total=len(texts),
        desc=desc,
        unit="doc",
        disable=not show_progress,
        position=position,
    )
    n_vectors, dim = 0, None
    with open(staging / "vectors.bin", "wb") as vectors, open(staging / "lengths.bin", "wb") as lengths:
        per_call = ENCODE_CHUNK_SEGMENTS * encoding.TOKENIZE_CHUNK  # whole segments: see shard_range
        for begin in range(0, len(texts), per_call):
            chunk = texts[begin : begin + per_call]
            if kind == "multi_vector":
                packed = model.encode_documents(chunk, packed=True, show_progress_bar=False)
                matrix = np.asarray(packed.embeddings)
                np.diff(packed.offsets).astype(np.int64).tofile(lengths)
            else:
                matrix = np.asarray(model.encode_documents(chunk, show_progress_bar=False))
            dim = matrix.shape[1]
            np.ascontiguousarray(matrix, dtype=dtype).tofile(vectors)
            n_vectors += len(matrix)
            progress.update(len(chunk))
        for handle in (vectors, lengths):
            handle.flush()
            os.fsync(handle.fileno())
    progress.close()
    if kind == "single_vector":
        (staging / "lengths.bin").unlink()
    return {"dim": dim, "dtype": np.dtype(dtype).name, "n_vectors": n_vectors}


def _write_documents(path: Path, ids, texts) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for doc_id, text in zip(ids, texts):
                handle.write(json.dumps({"_id": doc_id, "text": text}) + "\n")

    atomic_write(path, write)


def _replace_folder(staging: Path, folder: Path) -> None:
    """Move a complete staging folder to `folder`, replacing what is there (an older shard)."""
    if folder.exists():
        old = folder.parent / f".old-{folder.name}-{secrets.token_hex(4)}"
        os.replace(folder, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staging, folder)
    fsync_dir(folder.parent)


# -- reading shards ----------------------------------------------------------------------------------


@dataclass
class Shard:
    folder: Path
    manifest: dict

    @property
    def n_documents(self) -> int:
        return self.manifest["n_documents"]

    def ids(self) -> list[str]:
        return [row["_id"] for row in self.documents()]

    def documents(self) -> Iterator[dict]:
        with open(self.folder / "documents.jsonl", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    def vectors(self) -> np.ndarray:
        """All vectors of the shard, mapped from disk (read as they are used)."""
        shape = (self.manifest["n_vectors"], self.manifest["dim"] or 0)
        if shape[0] == 0:
            return np.zeros(shape, dtype=self.manifest["dtype"])
        return np.memmap(self.folder / "vectors.bin", dtype=self.manifest["dtype"], mode="r", shape=shape)

    def token_offsets(self) -> np.ndarray:
        lengths = np.fromfile(self.folder / "lengths.bin", dtype=np.int64)
        return np.concatenate([[0], np.cumsum(lengths)])


def read_shards(
    shards_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    model_fingerprint: str | None = None,
    corpus: tuple[Sequence[str], Sequence[str]] | None = None,
    verify_checksums: bool = True,
) -> list[Shard]:
    """Every shard of one run, checked: all present, complete, uncorrupted, from one model and covering
    the corpus in order (and, when given, from `model_name` / `model_fingerprint` and over `corpus`,
    the (ids, texts) every rank read)."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise ShardError(f"{shards_dir}: no shards folder (run the sharded index command first)")
    found = {}
    for path in shards_dir.iterdir():
        if match := SHARD_NAME.match(path.name):
            found[(int(match[1]), int(match[2]))] = path
    sizes = sorted({size for _, size in found})
    if not sizes:
        raise ShardError(f"{shards_dir} holds no shards")
    if len(sizes) > 1:
        raise ShardError(
            f"{shards_dir} holds shards of runs with {' and '.join(map(str, sizes))} processes; "
            "remove the ones of the run you do not want"
        )
    world_size = sizes[0]
    missing = [rank for rank in range(world_size) if (rank, world_size) not in found]
    if missing:
        raise ShardError(
            f"{shards_dir}: shard {missing[0]} of {world_size} is missing (re-run rank {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})"
        )
    shards = [_read_shard(found[(rank, world_size)], verify_checksums) for rank in range(world_size)]
    _check_consistent(shards, model_name, model_fingerprint, corpus)
    return shards


def _read_shard(folder: Path, verify_checksums: bool) -> Shard:
    path = folder / SHARD_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{folder} has no {SHARD_MANIFEST}: the shard is incomplete") from None
    except ValueError as err:
        raise ShardError(f"{path} is not valid JSON (corrupt shard): {err}") from None
    if manifest.get("format") != SHARD_FORMAT:
        raise ShardError(
            f"{path}: shard format {manifest.get('format')!r}, this library reads {SHARD_FORMAT}"
        )
    for name, entry in (manifest.get("files") or {}).items():
        file = folder / name
        if not file.is_file():
            raise ShardError(f"shard file {file} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise ShardError(
                f"shard file {file} has {file.stat().st_size} bytes, its manifest says {entry['bytes']}: "
                "the shard is truncated or corrupt; re-run its rank"
            )
        if verify_checksums and file_sha256(file) != entry["sha256"]:
            raise ShardError(f"shard file {file} does not match its sha256 checksum: the shard is corrupt")
    return Shard(folder, manifest)


def _check_consistent(shards: list[Shard], model_name, model_fingerprint, corpus) -> None:
    first = shards[0].manifest
    for shard in shards:
        m = shard.manifest
        for key, what in (("model_name", "model"), ("model_digest", "model folder"), ("kind", "kind")):
            if m[key] != first[key]:
                raise ShardError(
                    f"{shard.folder} was encoded with another {what} ({m[key]!r}) than "
                    f"{shards[0].folder} ({first[key]!r})"
                )
        if m["dim"] != first["dim"] and m["n_documents"] and first["n_documents"]:
            raise ShardError(f"{shard.folder} holds {m['dim']}-dimensional vectors, not {first['dim']}")
    if model_name is not None and first["model_name"] != model_name:
        raise ShardError(
            f"{shards[0].folder} was encoded by model {first['model_name']!r}, not {model_name!r}"
        )
    if model_fingerprint and first["model_digest"] != model_fingerprint:
        raise ShardError(
            f"{shards[0].folder} was encoded by another version of model {first['model_name']!r} "
            "(its files have changed since); re-run every rank"
        )
    expected_start = 0
    for shard in shards:
        if shard.manifest["n_total"] != first["n_total"]:
            raise ShardError(f"{shard.folder} was cut from a corpus of another size than {shards[0].folder}")
        if shard.manifest["start"] != expected_start:
            raise ShardError(
                f"{shard.folder} starts at document {shard.manifest['start']}, not {expected_start}"
            )
        expected_start = shard.manifest["end"]
    if corpus is not None:
        ids, texts = corpus
        if expected_start != len(ids):
            raise ShardError(
                f"the shards hold {expected_start} documents but the corpus has {len(ids)}: "
                "they were encoded from another corpus"
            )
        for shard in shards:
            start, end = shard.manifest["start"], shard.manifest["end"]
            if documents_digest(ids[start:end], texts[start:end]) != shard.manifest["documents_digest"]:
                raise ShardError(
                    f"{shard.folder} holds other documents than the corpus's {start}..{end - 1}: "
                    "the corpus has changed since; re-run that rank"
                )


# -- merging -----------------------------------------------------------------------------------------


class ShardedTokenVectors(Sequence):
    """The token matrices of every document of the shards, in corpus order, read from disk on demand:
    what a PlaidIndex samples its centroids from and streams through."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self.starts = list(itertools.accumulate([s.n_documents for s in shards], initial=0))
        self._vectors = [s.vectors() for s in shards]
        self._offsets = [s.token_offsets() for s in shards]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = bisect.bisect_right(self.starts, i) - 1
        return self._document(shard, i - self.starts[shard])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for shard, n in enumerate(s.n_documents for s in self.shards):
            for j in range(n):
                yield self._document(shard, j)

    def _document(self, shard: int, j: int) -> torch.Tensor:
        offsets = self._offsets[shard]
        return torch.from_numpy(np.array(self._vectors[shard][offsets[j] : offsets[j + 1]]))


def merge_shards(
    shards: list[Shard],
    output: str | os.PathLike,
    index_kind: str,
    *,
    device: str | None = None,
    show_progress: bool = True,
) -> int:
    """Build the retriever folder `output` (as `Retriever.save` writes it) from checked shards, with a
    first stage of `index_kind`. Returns the number of documents."""
    from mbert_retrieval.search.retriever import (
        MULTI_VECTOR_INDEXES,
        SINGLE_VECTOR_INDEXES,
        write_manifest,
    )

    first = shards[0].manifest
    allowed = MULTI_VECTOR_INDEXES if first["kind"] == "multi_vector" else SINGLE_VECTOR_INDEXES
    if index_kind not in allowed:
        what = "ColBERT" if first["kind"] == "multi_vector" else "single-vector"
        raise ValueError(
            f"index {index_kind!r} does not fit the shards' {what} vectors; use {', '.join(allowed)}"
        )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    index = _build_index(shards, index_kind, device, show_progress)
    index.save(output / index.index_type)
    n_documents = _write_merged_documents(shards, output / "documents.jsonl")
    manifest = {
        "index": index_kind,
        "hybrid": False,
        "model": first["model_name"],
        "reranker": None,
        "first_stage_k": 100,
        "dense_weight": _default_dense_weight(),
        "bm25_settings": {},
        "n_documents": n_documents,
        "encoding": {"documents": n_documents, "seconds": 0.0},
        "shards": len(shards),
    }
    write_manifest(output, manifest)
    return n_documents


def _build_index(shards: list[Shard], index_kind: str, device, show_progress):
    first = shards[0].manifest
    model_name = first["model_name"]
    if first["kind"] == "single_vector":
        return _build_faiss(shards, index_kind, model_name, show_progress)
    ids = [doc_id for shard in shards for doc_id in shard.ids()]
    if index_kind == "plaid":
        from mbert_retrieval.index.plaid import PlaidIndex

        return PlaidIndex.build(
            ShardedTokenVectors(shards),
            ids,
            model_name=model_name,
            device=device,
            show_progress=show_progress,
        )
    from mbert_retrieval.index.maxsim import MaxSimIndex

    index = MaxSimIndex(model_name=model_name)
    for shard in shards:  # exhaustive MaxSim keeps every vector: there is nothing to stream into
        if shard.n_documents:
            documents = ShardedTokenVectors([shard])
            index.add(shard.ids(), [documents[j].float() for j in range(len(documents))])
    return index


def _build_faiss(shards: list[Shard], index_kind: str, model_name: str, show_progress: bool):
    """Train on the rows a single-process build of the whole corpus would take, then fill shard by shard."""
    from mbert_retrieval.index.faiss_index import FaissIndex

    dims = [s.manifest["dim"] for s in shards if s.manifest["dim"] is not None]
    if not dims:
        raise ShardError("the shards hold no documents")
    index = FaissIndex(dims[0], kind=index_kind, model_name=model_name)
    starts = list(itertools.accumulate([s.n_documents for s in shards], initial=0))
    rows = index.training_rows(starts[-1])
    if rows is not None:
        index.train(_gather_rows(shards, starts, rows))
    progress = tqdm(total=starts[-1], desc="merging shards", unit="doc", disable=not show_progress)
    for shard in shards:
        ids, vectors = shard.ids(), shard.vectors()
        for begin in range(0, len(ids), ADD_CHUNK_ROWS):
            index.add(ids[begin : begin + ADD_CHUNK_ROWS], np.array(vectors[begin : begin + ADD_CHUNK_ROWS]))
            progress.update(len(ids[begin : begin + ADD_CHUNK_ROWS]))
    progress.close()
    return index


def _gather_rows(shards: list[Shard], starts: list[int], rows: np.ndarray) -> np.ndarray:
    """The vectors at global row numbers `rows` (sorted), read from the shards that hold them."""
    parts = []
    for shard, start, end in zip(shards, starts[:-1], starts[1:]):
        mine = rows[(rows >= start) & (rows < end)] - start
        if len(mine):
            parts.append(np.asarray(shard.vectors()[mine], dtype=np.float32))
    return np.concatenate(parts)


def _write_merged_documents(shards: list[Shard], path: Path) -> int:
    count = [0]

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            for shard in shards:
                with open(shard.folder / "documents.jsonl", encoding="utf-8") as handle:
                    for line in handle:
                        out.write(line)
                        count[0] += 1

    atomic_write(path, write)
    return count[0]


def _default_dense_weight() -> float:
    from mbert_retrieval.search.fusion import DEFAULT_DENSE_WEIGHT

    return DEFAULT_DENSE_WEIGHT
