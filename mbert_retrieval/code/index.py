"""A searchable, incrementally updated index of a repository's functions, classes and methods.

    report = build_code_index("path/to/repo", "repo-index", model, model_name="my-model")
    index = CodeIndex.load("repo-index")
    hits = index.search(model, "parse a json string", k=10, path="json/**", language="python")

A code index is a `Retriever` (search/retriever.py) over the repository's chunks, plus what only code
needs: walking and chunking the repository, path and language filters, and snapshots. Its first stage
is hybrid: the model's vectors in a FaissIndex and BM25 over the code (snake_case / camelCase split),
fused by min-max normalised scores with the dense weight (`search.fusion.convex_fusion`), so a hybrid
hit's score is in [0, 1]. `FusionSettings` picks "hybrid", "dense" or "bm25" and the weight; a
search may rerank through the Retriever (e.g. with a CrossEncoder).

On disk an index is a folder of immutable snapshots and a pointer to the live one:

    repo-index/
        CURRENT.json          {"snapshot": "snapshot-...", "index_sha256": ...}, replaced atomically
        snapshot-.../         index.json (settings, files and their sha256), chunks.json, dense/, bm25/

A rebuild writes a new snapshot beside the live one (`index.storage.publish_folder`) and only then
switches the pointer, so a reader always loads a complete snapshot. Rebuilds are incremental: files
whose content hash did not change keep their chunks and vectors; only new or edited files are chunked
and encoded, and deleted files are removed. Each metadata file is pinned by a checksum and validated
at load (`metadata.py`): a damaged or edited index is refused with an `IndexFormatError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pathspec
from tqdm.auto import tqdm

from mbert_retrieval.code.chunking import LANGUAGES, Chunk, ChunkSettings, chunk_file, language_of
from mbert_retrieval.code.metadata import (
    FORMAT_VERSION,
    POINTER,
    SNAPSHOT_PREFIX,
    check_dense,
    checksums,
    read_chunks,
    read_meta,
    read_pointer,
    write_pointer,
)
from mbert_retrieval.code.walk import SourceFile, scan_repository
from mbert_retrieval.files import atomic_write_text
from mbert_retrieval.index.base import rankings
from mbert_retrieval.index.bm25 import BM25Index
from mbert_retrieval.index.faiss_index import FaissIndex
from mbert_retrieval.index.storage import (
    LOCK_FILE,
    IndexFormatError,
    SaveInProgress,
    check_writable_target,
    folder_lock,
    publish_folder,
)
from mbert_retrieval.models.base import TruncationCount
from mbert_retrieval.search.first_stage import FusedIndex, TextIndex
from mbert_retrieval.search.fusion import MODES, FusionSettings
from mbert_retrieval.search.retriever import Retriever

BUILDING_PREFIX = ".building-"
MAX_GLOB_CHARS = 256
ENCODE_BATCH = 32  # chunks per encoding call: the model lock is released between calls, for searches
BM25_SETTINGS = {"split_identifiers": True}
logger = logging.getLogger(__name__)


@dataclass
class CodeHit:
    path: str
    start_line: int
    end_line: int
    symbol: str | None
    kind: str
    language: str
    score: float
    text: str = field(repr=False)

    def record(self, snippet_lines: int | None = None) -> dict:
        """The hit as JSON (search-code --json, the HTTP API): its text as `snippet`, the first
        `snippet_lines` lines of it when given."""
        record = dataclasses.asdict(self)
        text = record.pop("text")
        record["snippet"] = text if snippet_lines is None else "\n".join(text.splitlines()[:snippet_lines])
        return record


@dataclass
class IndexReport:
    """What a build did: file counts by change, chunks encoded (and truncated by the model), files
    skipped (by reason), time."""

    snapshot: str
    full: bool
    files: int
    files_added: int
    files_changed: int
    files_removed: int
    files_unchanged: int
    chunks: int
    chunks_encoded: int
    skipped: dict[str, int]
    seconds: float
    chunks_truncated: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        secrets_note = (
            " (secret-looking files are left out; --include-secrets indexes them)"
            if self.skipped.get("secret")
            else ""
        )
        truncated = f", {self.chunks_truncated} longer than the model reads" if self.chunks_truncated else ""
        return (
            f"{'full build' if self.full else 'incremental update'} in {self.seconds:.1f}s: {self.files} files "
            f"({self.files_added} added, {self.files_changed} changed, {self.files_removed} removed, "
            f"{self.files_unchanged} unchanged), {self.chunks} chunks ({self.chunks_encoded} encoded{truncated}); "
            f"skipped: {skipped}{secrets_note}"
        )


def document_text(chunk: Chunk) -> str:
    """What the model and BM25 see: where the code lives, the definition's name, then the code."""
    name = chunk.symbol if chunk.kind not in ("module", "text") else None  # the path says it already
    return f"{chunk.path} {name or ''}\n{chunk.text}"


class CodeEncoder:
    """The model as a code index calls it: `encode_queries(texts)` and `encode_documents(texts)`, with
    no options (any object with those two methods will do). Documents are encoded in batches with
    `lock` held around each call, and `truncated` counts the texts the model cut to its length."""

    def __init__(self, model, lock: contextlib.AbstractContextManager | None = None, show_progress=False):
        self.model = model
        self.lock = lock or contextlib.nullcontext()
        self.show_progress = show_progress
        self.truncated = 0

    @property
    def dim(self) -> int:
        dim = getattr(self.model, "dim", None)
        return int(dim) if dim else int(np.asarray(self.encode_queries(["dimension"])).shape[-1])

    def encode_queries(self, texts: list[str], **_) -> np.ndarray:
        with self.lock:
            return np.asarray(self.model.encode_queries(texts), dtype=np.float32)

    def encode_documents(self, texts: list[str], **_) -> np.ndarray:
        parts = []
        batches = range(0, len(texts), ENCODE_BATCH)
        for start in tqdm(
            batches, desc="Encoding", unit="batch", disable=not self.show_progress or not texts
        ):
            with self.lock, counting_truncations(self.model) as count:
                vectors = self.model.encode_documents(texts[start : start + ENCODE_BATCH])
            parts.append(np.asarray(vectors, dtype=np.float32))
            self.truncated += count.texts
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)


def counting_truncations(model) -> contextlib.AbstractContextManager[TruncationCount]:
    """The model's count of the texts it truncates (`EncoderModel.counting_truncations`); a count
    that stays 0 for a model that keeps none."""
    counting = getattr(model, "counting_truncations", None)
    return counting() if counting is not None else contextlib.nullcontext(TruncationCount())


def snapshot_retriever(
    model, dense: FaissIndex, bm25: BM25Index, documents: dict[str, str], fusion: FusionSettings, model_name
) -> Retriever:
    """The Retriever of a snapshot: its dense and BM25 indexes fused, over the chunks' texts. `model`
    may be None for searches that bring their own."""
    first_stage = FusedIndex(TextIndex(dense, model), TextIndex(bm25), fusion.dense_weight)
    return Retriever(
        model,
        dense.kind,
        hybrid=True,
        first_stage_k=fusion.depth,
        dense_weight=fusion.dense_weight,
        bm25_settings=bm25.settings,
        model_name=model_name,
        first_stage=first_stage,
        documents=documents,
    )


# ------------------------------------------------------------------------------------------- searching


class CodeIndex:
    """One loaded snapshot. It is never modified: a rebuild produces a new snapshot to load."""

    def __init__(
        self, directory: Path, snapshot: str, meta: dict, ids: list[str], chunks: list[Chunk], retriever
    ):
        self.directory = directory
        self.snapshot = snapshot
        self.meta = meta
        self.ids = ids
        self.chunks = chunks
        self.retriever: Retriever = retriever
        self.fusion = FusionSettings(**meta["fusion"])
        self._position = {chunk_id: i for i, chunk_id in enumerate(ids)}
        self._paths = [c.path for c in chunks]
        self._languages = np.array([c.language for c in chunks], dtype=object)

    def entries(self) -> list[tuple[str, Chunk]]:
        return list(zip(self.ids, self.chunks))

    @property
    def dense(self) -> FaissIndex:
        return self.retriever.index.first.index

    @property
    def bm25(self) -> BM25Index:
        return self.retriever.index.second.index

    @property
    def root(self) -> Path:
        return Path(self.meta["root"])

    @property
    def model_name(self) -> str:
        return self.meta["model_name"]

    @property
    def files(self) -> dict[str, dict]:
        return self.meta["files"]

    def __len__(self) -> int:
        return len(self.chunks)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CodeIndex:
        """Load the live snapshot, checking every file against its checksum (see metadata.py)."""
        directory = Path(directory)
        pointer = read_pointer(directory)
        for _ in range(3):
            try:
                return cls._load_snapshot(directory, pointer)
            except IndexFormatError:
                newer = read_pointer(directory)
                if newer == pointer:
                    raise
                pointer = newer  # a rebuild removed the snapshot while it was being read: load the new one
        return cls._load_snapshot(directory, pointer)

    @classmethod
    def _load_snapshot(cls, directory: Path, pointer) -> CodeIndex:
        folder = directory / pointer.snapshot
        meta = read_meta(directory, pointer)
        ids, chunks = read_chunks(folder, meta)
        try:
            dense, bm25 = FaissIndex.load(folder / "dense"), BM25Index.load(folder / "bm25")
        except IndexFormatError:
            raise
        except (KeyError, TypeError, ValueError) as err:  # a manifest value the loaders reject
            raise IndexFormatError(f"{folder}: unreadable dense or BM25 manifest: {err!r}") from None
        check_dense(folder, dense)
        if (
            len(dense) != len(ids)
            or len(bm25) != len(ids)
            or not set(dense.ids) == set(bm25.ids) == set(ids)
            or dense.dim != meta["dim"]
        ):
            raise IndexFormatError(f"{folder}: the chunk list, vectors and BM25 index disagree")
        if not Path(meta["root"]).is_dir():
            logger.warning(
                "%s: the indexed folder %s is gone; search works, reindexing will not", folder, meta["root"]
            )
        documents = {chunk_id: document_text(chunk) for chunk_id, chunk in zip(ids, chunks)}
        fusion = FusionSettings(**meta["fusion"])
        retriever = snapshot_retriever(None, dense, bm25, documents, fusion, meta["model_name"])
        return cls(directory, pointer.snapshot, meta, ids, chunks, retriever)

    def search(
        self,
        model,
        query: str,
        k: int = 10,
        *,
        path: str | None = None,
        language: str | None = None,
        mode: str | None = None,
        reranker=None,
        rerank_depth: int = 50,
    ) -> list[CodeHit]:
        """The k best chunks for `query`, best first.

        `path` is a glob over repository-relative paths with .gitignore rules ("*.py", "src/**/io/*",
        "tests/"); `language` one of `LANGUAGES`. Scores: cosine similarity ("dense"), BM25 ("bm25"),
        the fused normalised score in [0, 1] ("hybrid"; 1 is first in both rankings), or the
        reranker's score when one is given (it re-scores the first `rerank_depth` candidates, e.g. a
        CrossEncoder).
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        mode = mode or self.fusion.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        allowed = self._allowed(path, language)
        depth = max(self.fusion.depth, k, rerank_depth if reranker is not None else 0)
        stage = self._first_stage(mode)
        [ranking] = rankings(stage.search([query], depth, allowed=allowed, model=CodeEncoder(model)))
        if reranker is not None and ranking:
            [ranking] = self.retriever.rerank([query], [ranking], reranker=reranker, depth=rerank_depth)
        return [self._hit(chunk_id, score) for chunk_id, score in ranking[:k]]

    def _first_stage(self, mode: str) -> FusedIndex | TextIndex:
        """The retriever's fused first stage for "hybrid", or the part a single ranking comes from."""
        fused = self.retriever.index
        return {"hybrid": fused, "dense": fused.first, "bm25": fused.second}[mode]

    def _allowed(self, path: str | None, language: str | None) -> set[str] | None:
        """The ids of the chunks a search may return (None: all). Globs only ever match indexed paths."""
        if path is None and language is None:
            return None
        allowed = np.ones(len(self.chunks), dtype=bool)
        if language is not None:
            if language not in LANGUAGES:
                raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
            allowed &= self._languages == language
        if path is not None:
            spec = compile_path_glob(path)
            matching = {p for p in self.files if spec.match_file(p)}
            allowed &= np.fromiter((p in matching for p in self._paths), dtype=bool, count=len(self._paths))
        return {self.ids[i] for i in np.flatnonzero(allowed)}

    def _hit(self, chunk_id: str, score: float) -> CodeHit:
        c = self.chunks[self._position[chunk_id]]
        return CodeHit(c.path, c.start_line, c.end_line, c.symbol, c.kind, c.language, float(score), c.text)


def compile_path_glob(glob: str) -> pathspec.PathSpec:
    """A .gitignore-style glob over repository-relative paths; refuses anything pointing outside."""
    if not isinstance(glob, str) or not glob.strip():
        raise ValueError("path glob must be a non-empty string")
    if len(glob) > MAX_GLOB_CHARS:
        raise ValueError(f"path glob is longer than {MAX_GLOB_CHARS} characters")
    if "\0" in glob or "\\" in glob:
        raise ValueError("path glob must not contain NUL or backslash characters")
    if glob.startswith(("/", "~", "!")) or (len(glob) > 1 and glob[1] == ":"):
        raise ValueError(f"path glob {glob!r} must be relative to the repository root (no /, ~, !, C:)")
    if ".." in glob.split("/"):
        raise ValueError(
            f"path glob {glob!r} must not contain '..': it matches paths inside the repository only"
        )
    try:
        return pathspec.GitIgnoreSpec.from_lines([glob])
    except Exception as err:  # pathspec raises several error types for malformed patterns
        raise ValueError(f"invalid path glob {glob!r}: {err}") from err


# -------------------------------------------------------------------------------------------- building


def build_code_index(
    root: str | os.PathLike,
    directory: str | os.PathLike,
    model,
    *,
    model_name: str,
    full: bool = False,
    chunk_settings: ChunkSettings | None = None,
    fusion: FusionSettings | None = None,
    faiss_kind: str = "flat",
    max_file_bytes: int = 1_000_000,
    encode_lock: contextlib.AbstractContextManager | None = None,
    show_progress: bool = True,
    include_secrets: bool = False,
) -> IndexReport:
    """Index the repository at `root` into `directory` and make it the live snapshot.

    `model` has `encode_documents(texts) -> float32 [n, dim]` (a `DenseRetriever`); `model_name` is
    recorded so the index is searched with the same model. When `directory` already holds an index
    of this repository, model and chunk settings, only new and changed files are encoded (unless
    `full`). `encode_lock` is held around each call to the model (a server shares it with searches).
    Secret-looking files (`.env`, private keys, credentials, ...) are left out and counted in the
    report's `skipped["secret"]` unless `include_secrets`.
    """
    started = time.perf_counter()
    root = Path(root).resolve()
    directory = Path(directory)
    chunk_settings = chunk_settings or ChunkSettings()
    with _build_lock(directory):
        scan = scan_repository(root, max_file_bytes=max_file_bytes, include_secrets=include_secrets)
        if not scan.files:
            raise ValueError(
                f"no indexable source files under {root} (skipped: {dict(scan.skipped) or 'none'})"
            )
        previous = None if full else _previous_for(directory, root, model_name, chunk_settings)
        fusion = fusion or (previous.fusion if previous else FusionSettings())
        changes = FileChanges.between(previous.files if previous else {}, scan.files)
        new_entries = _chunk_files(
            [scan.files[p] for p in changes.changed + changes.added],
            chunk_settings,
            show_progress,
            scan.skipped,
        )

        encoder = CodeEncoder(model, encode_lock, show_progress)
        if previous is None:
            dense = FaissIndex(encoder.dim, kind=faiss_kind, model_name=model_name)
            retriever = snapshot_retriever(encoder, dense, BM25Index(**BM25_SETTINGS), {}, fusion, model_name)
            entries = []
        else:  # `previous` was loaded from disk for this build: changing it touches no live snapshot
            retriever = snapshot_retriever(
                encoder, previous.dense, previous.bm25, previous.retriever.documents, fusion, model_name
            )
            stale = set(changes.changed) | set(changes.removed)
            retriever.delete([i for i, c in previous.entries() if c.path in stale])
            entries = [e for e in previous.entries() if e[1].path in changes.unchanged]
        retriever.add([i for i, _ in new_entries], [document_text(c) for _, c in new_entries])

        entries = sorted(entries + new_entries, key=lambda e: (e[1].path, e[1].start_line, e[1].end_line))
        meta = _snapshot_meta(root, scan, model_name, retriever.index.first.index.dim, chunk_settings, fusion)
        snapshot = _write_snapshot(directory, meta, entries, retriever)
    return IndexReport(
        snapshot=snapshot,
        full=previous is None,
        files=len(scan.files),
        files_added=len(changes.added),
        files_changed=len(changes.changed),
        files_removed=len(changes.removed),
        files_unchanged=len(changes.unchanged),
        chunks=len(entries),
        chunks_encoded=len(new_entries),
        skipped=dict(scan.skipped),
        seconds=time.perf_counter() - started,
        chunks_truncated=encoder.truncated,
    )


@dataclass
class FileChanges:
    """How the files of a repository changed since the last snapshot, by their content hash."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: set[str]

    @classmethod
    def between(cls, old_files: dict[str, dict], files: dict[str, SourceFile]) -> FileChanges:
        unchanged = {p for p, f in files.items() if old_files.get(p, {}).get("sha256") == f.sha256}
        return cls(
            added=[p for p in files if p not in old_files],
            changed=[p for p in files if p in old_files and p not in unchanged],
            removed=[p for p in old_files if p not in files],
            unchanged=unchanged,
        )


def _previous_for(directory: Path, root: Path, model_name: str, chunk_settings: ChunkSettings):
    """The live snapshot, loaded afresh, when an update can build on it; else None (full build)."""
    if not (directory / POINTER).exists():
        return None
    try:
        previous = CodeIndex.load(directory)
    except IndexFormatError as err:  # an old or damaged index: a full build replaces it
        logger.warning("building %s afresh: %s", directory, err)
        return None
    if not previous.bm25.changeable:
        logger.warning("building %s afresh: its BM25 index was saved without its documents' terms", directory)
        return None
    same = (
        previous.meta["root"] == str(root)
        and previous.model_name == model_name
        and previous.meta["chunk_settings"] == dataclasses.asdict(chunk_settings)
    )
    return previous if same else None


def _chunk_files(files: Sequence[SourceFile], settings: ChunkSettings, show_progress: bool, skipped):
    """(id, chunk) pairs; an id is the path and the chunk's number within its file. A file the
    chunker fails on is counted in `skipped` and left out: one file never stops a build."""
    entries = []
    for source in tqdm(files, desc="Chunking", unit="file", disable=not show_progress or not files):
        try:
            chunks = chunk_file(source.path, source.text, settings)
        except Exception as err:  # a chunker bug on one odd file; logged so that it gets fixed
            logger.warning("%s could not be chunked and is left out: %r", source.path, err)
            skipped["unchunkable"] += 1
            continue
        entries += [(f"{source.path}#{n}", chunk) for n, chunk in enumerate(chunks)]
    return entries


def _snapshot_meta(root: Path, scan, model_name: str, dim: int, chunk_settings, fusion) -> dict:
    """What index.json records (its checksums are added when the snapshot is written)."""
    return {
        "format_version": FORMAT_VERSION,
        "root": str(root),
        "model_name": model_name,
        "dim": dim,
        "chunk_settings": dataclasses.asdict(chunk_settings),
        "fusion": dataclasses.asdict(fusion),
        "created": time.time(),
        "skipped": dict(scan.skipped),
        "files": {
            p: {"sha256": scan.files[p].sha256, "language": language_of(p)} for p in sorted(scan.files)
        },
    }


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One build at a time per index folder, across processes (a CLI run beside a server's reindex)."""
    own = (SNAPSHOT_PREFIX, BUILDING_PREFIX, LOCK_FILE, f".{POINTER}.")
    check_writable_target(directory, POINTER, own, what="a code index")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(directory, wait=False):
            yield
    except SaveInProgress:
        raise RuntimeError(f"another build of {directory} is running") from None


def _write_snapshot(directory: Path, meta: dict, entries, retriever: Retriever) -> str:
    """Write a complete snapshot beside the live one, then switch the pointer to it atomically."""

    def write(folder: Path) -> None:
        rows = [{"id": chunk_id, **dataclasses.asdict(chunk)} for chunk_id, chunk in entries]
        atomic_write_text(folder / "chunks.json", json.dumps(rows))
        retriever.index.first.index.save(folder / "dense")
        retriever.index.second.index.save(folder / "bm25")
        pinned = {**meta, "checksums": checksums(folder)}
        atomic_write_text(folder / "index.json", json.dumps(pinned, indent=1))

    name = publish_folder(directory, SNAPSHOT_PREFIX, write, staging_prefix=BUILDING_PREFIX)
    write_pointer(directory, name)
    _remove_old_snapshots(directory, keep=2)
    return name


def _remove_old_snapshots(directory: Path, keep: int) -> None:
    """Keep the live snapshot and the one before it (a reader may still be loading it)."""
    live = read_pointer(directory).snapshot
    snapshots = sorted(p.name for p in directory.iterdir() if p.name.startswith(SNAPSHOT_PREFIX))
    old = [n for n in snapshots if n != live][: max(0, len(snapshots) - keep)]
    for name in old:
        shutil.rmtree(directory / name, ignore_errors=True)
    for path in directory.iterdir():
        if path.name.startswith(BUILDING_PREFIX):  # left by a build that crashed (we hold the lock)
            shutil.rmtree(path, ignore_errors=True)


def read_index_settings(directory: str | os.PathLike) -> dict:
    """The live snapshot's settings (root, model name, dim, ...) without loading its data."""
    directory = Path(directory)
    meta = read_meta(directory, read_pointer(directory))
    return {key: value for key, value in meta.items() if key != "files"}
