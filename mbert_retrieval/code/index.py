"""A searchable, incrementally updated index of a repository's functions, classes and methods.

    report = build_code_index("path/to/repo", "repo-index", model, model_name="my-model")
    index = CodeIndex.load("repo-index")
    hits = index.search(model, "parse a json string", k=10, path="json/**", language="python")

Search is hybrid by default: a dense ranking (the model's vectors in a FaissIndex) and a lexical one
(BM25 over the code, with snake_case / camelCase split), each min-max normalised and mixed with the
dense weight (`search.fusion.convex_fusion`), so a hit's score is in [0, 1]. `FusionSettings` picks
"dense", "bm25" or "hybrid" and the weight.

On disk an index is a folder of immutable snapshots and a pointer to the live one:

    repo-index/
        CURRENT.json          {"snapshot": "snapshot-...", "index_sha256": ...}, replaced atomically
        snapshot-.../         index.json (settings, files and their sha256), chunks.json, dense/, bm25/

A rebuild writes a new snapshot beside the live one and only then switches the pointer, so a reader
always loads a complete snapshot. Rebuilds are incremental: files whose content hash did not change
keep their chunks and vectors; only new or edited files are chunked and encoded, and deleted files
are removed. Each metadata file is pinned by a checksum and validated at load (`metadata.py`): a
damaged or edited index is refused with an `IndexFormatError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
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
from mbert_retrieval.index.faiss_index import FaissIndex
from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.models.encoding import TRUNCATION_MESSAGE
from mbert_retrieval.search.bm25 import BM25Index, top_k_indices
from mbert_retrieval.search.fusion import DEFAULT_DENSE_WEIGHT, convex_fusion

BUILDING_PREFIX = ".building-"
LOCK_FILE = ".lock"
MODES = ("hybrid", "dense", "bm25")
MAX_GLOB_CHARS = 256
ENCODE_BATCH = 32  # chunks per encoding call: the model lock is released between calls, for searches
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionSettings:
    mode: str = "hybrid"  # "hybrid" | "dense" | "bm25"
    dense_weight: float = DEFAULT_DENSE_WEIGHT  # hybrid score: w * dense + (1 - w) * BM25, normalised
    depth: int = 100  # candidates taken from each ranking before fusing

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"fusion mode must be one of {MODES}, got {self.mode!r}")
        if self.depth <= 0:
            raise ValueError("fusion depth must be positive")
        if not 0 <= self.dense_weight <= 1:
            raise ValueError(f"fusion dense_weight must be between 0 and 1, got {self.dense_weight}")


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


@dataclass
class IndexReport:
    """What a build did: file counts by change, chunks encoded, files skipped (by reason), time."""

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

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        secrets_note = (
            " (secret-looking files are left out; --include-secrets indexes them)"
            if self.skipped.get("secret")
            else ""
        )
        return (
            f"{'full build' if self.full else 'incremental update'} in {self.seconds:.1f}s: {self.files} files "
            f"({self.files_added} added, {self.files_changed} changed, {self.files_removed} removed, "
            f"{self.files_unchanged} unchanged), {self.chunks} chunks ({self.chunks_encoded} encoded); "
            f"skipped: {skipped}{secrets_note}"
        )


def document_text(chunk: Chunk) -> str:
    """What the model and BM25 see: where the code lives, the definition's name, then the code."""
    name = chunk.symbol if chunk.kind not in ("module", "text") else None  # the path says it already
    return f"{chunk.path} {name or ''}\n{chunk.text}"


# ------------------------------------------------------------------------------------------- searching


class CodeIndex:
    """One loaded snapshot. It is never modified: a rebuild produces a new snapshot to load."""

    def __init__(
        self, directory: Path, snapshot: str, meta: dict, ids: list[str], chunks: list[Chunk], dense, bm25
    ):
        self.directory = directory
        self.snapshot = snapshot
        self.meta = meta
        self.ids = ids
        self.chunks = chunks
        self.dense: FaissIndex = dense
        self.bm25: BM25Index = bm25
        self.fusion = FusionSettings(**meta["fusion"])
        self._position = {chunk_id: i for i, chunk_id in enumerate(ids)}
        self._paths = [c.path for c in chunks]
        self._languages = np.array([c.language for c in chunks], dtype=object)

    def entries(self) -> list[tuple[str, Chunk]]:
        return list(zip(self.ids, self.chunks))

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
            or set(dense.ids) != set(ids)
            or bm25.ids != ids
            or dense.dim != meta["dim"]
        ):
            raise IndexFormatError(f"{folder}: the chunk list, vectors and BM25 index disagree")
        if not Path(meta["root"]).is_dir():
            logger.warning(
                "%s: the indexed folder %s is gone; search works, reindexing will not", folder, meta["root"]
            )
        return cls(directory, pointer.snapshot, meta, ids, chunks, dense, bm25)

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
        allowed = self._filter(path, language)
        depth = max(self.fusion.depth, k, rerank_depth if reranker is not None else 0)
        rankings, weights = [], []
        if mode in ("hybrid", "dense"):
            rankings.append(self._dense_ranking(model.encode_queries([query]), depth, allowed))
            weights.append(self.fusion.dense_weight)
        if mode in ("hybrid", "bm25"):
            rankings.append(self._bm25_ranking(query, depth, allowed))
            weights.append(1 - self.fusion.dense_weight)
        if mode == "hybrid":  # no BM25 term in the query ("the", "?!"): the dense ranking alone
            fused = convex_fusion(rankings, weights)
        else:
            fused = rankings[0]
        if reranker is not None and fused:
            fused = self._rerank(reranker, query, [p for p, _ in fused[:rerank_depth]])
        return [self._hit(position, score) for position, score in fused[:k]]

    def _dense_ranking(self, query_vector, depth: int, allowed) -> list[tuple[int, float]]:
        """Nearest chunks, best first; with a filter, fetch more until `depth` pass it or none are left."""
        total = len(self.dense)
        fetch = min(total, depth if allowed is None else max(4 * depth, 256))
        while fetch > 0:
            ids, scores = self.dense.search(np.asarray(query_vector, dtype=np.float32), fetch)
            ranked = [(self._position[i], float(s)) for i, s in zip(ids[0], scores[0])]
            if allowed is not None:
                ranked = [(p, s) for p, s in ranked if allowed[p]]
            if len(ranked) >= depth or fetch >= total:
                return ranked[:depth]
            fetch = min(total, fetch * 4)
        return []

    def _bm25_ranking(self, query: str, depth: int, allowed) -> list[tuple[int, float]]:
        scores = self.bm25.scores(query)
        if allowed is not None:
            scores = np.where(allowed, scores, 0.0)
        top = top_k_indices(scores, depth)
        return [(int(p), float(scores[p])) for p in top if scores[p] > 0]

    def _rerank(self, reranker, query: str, positions: list[int]) -> list[tuple[int, float]]:
        pairs = [(query, document_text(self.chunks[p])) for p in positions]
        scores = np.asarray(reranker.predict(pairs), dtype=np.float32).reshape(len(positions), -1)[:, 0]
        order = np.argsort(-scores, kind="stable")
        return [(positions[i], float(scores[i])) for i in order]

    def _filter(self, path: str | None, language: str | None) -> np.ndarray | None:
        """Which chunks a search may return (None: all). Globs only ever match indexed paths."""
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
        return allowed

    def _hit(self, position: int, score: float) -> CodeHit:
        c = self.chunks[position]
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
    encode_lock = encode_lock or contextlib.nullcontext()
    with _build_lock(directory):
        scan = scan_repository(root, max_file_bytes=max_file_bytes, include_secrets=include_secrets)
        if not scan.files:
            raise ValueError(
                f"no indexable source files under {root} (skipped: {dict(scan.skipped) or 'none'})"
            )
        previous = None if full else _previous_for(directory, root, model_name, chunk_settings)
        fusion = fusion or (FusionSettings(**previous.meta["fusion"]) if previous else FusionSettings())

        old_files = previous.files if previous else {}
        unchanged = {p for p, f in scan.files.items() if old_files.get(p, {}).get("sha256") == f.sha256}
        changed = [p for p in scan.files if p in old_files and p not in unchanged]
        added = [p for p in scan.files if p not in old_files]
        removed = [p for p in old_files if p not in scan.files]

        entries = [] if previous is None else [e for e in previous.entries() if e[1].path in unchanged]
        new_entries = _chunk_files(
            [scan.files[p] for p in changed + added], chunk_settings, show_progress, scan.skipped
        )
        vectors = _encode(model, [document_text(c) for _, c in new_entries], encode_lock, show_progress)

        if previous is None:
            dense = FaissIndex(_dim(model, vectors), kind=faiss_kind, model_name=model_name)
        else:  # `previous` was loaded from disk for this build: changing it touches no live snapshot
            dense = previous.dense
            stale = set(changed) | set(removed)
            dense.delete([i for i, c in previous.entries() if c.path in stale])
        if new_entries:
            dense.add([i for i, _ in new_entries], vectors)
        entries = sorted(entries + new_entries, key=lambda e: (e[1].path, e[1].start_line, e[1].end_line))
        bm25 = BM25Index.build(
            [i for i, _ in entries], [document_text(c) for _, c in entries], split_identifiers=True
        )

        meta = {
            "format_version": FORMAT_VERSION,
            "root": str(root),
            "model_name": model_name,
            "dim": dense.dim,
            "chunk_settings": dataclasses.asdict(chunk_settings),
            "fusion": dataclasses.asdict(fusion),
            "created": time.time(),
            "skipped": dict(scan.skipped),
            "files": {
                p: {"sha256": scan.files[p].sha256, "language": language_of(p)} for p in sorted(scan.files)
            },
        }
        snapshot = _write_snapshot(directory, meta, entries, dense, bm25)
    return IndexReport(
        snapshot=snapshot,
        full=previous is None,
        files=len(scan.files),
        files_added=len(added),
        files_changed=len(changed),
        files_removed=len(removed),
        files_unchanged=len(unchanged),
        chunks=len(entries),
        chunks_encoded=len(new_entries),
        skipped=dict(scan.skipped),
        seconds=time.perf_counter() - started,
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


def _encode(model, texts: list[str], lock, show_progress: bool) -> np.ndarray:
    parts = []
    batches = range(0, len(texts), ENCODE_BATCH)
    with _truncations_counted() as truncated:
        for start in tqdm(batches, desc="Encoding", unit="batch", disable=not show_progress or not texts):
            with lock:
                parts.append(
                    np.asarray(model.encode_documents(texts[start : start + ENCODE_BATCH]), dtype=np.float32)
                )
    if truncated[0]:
        logger.info(
            "%d of %d chunks were longer than the model reads and were truncated", truncated[0], len(texts)
        )
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


@contextlib.contextmanager
def _truncations_counted():
    """Count the encoder's per-call truncation warnings instead of printing one per batch."""
    counted = [0]

    def count(record: logging.LogRecord) -> bool:
        if record.msg is TRUNCATION_MESSAGE:
            counted[0] += int(record.args[0])
            return False
        return True

    encoding_logger = logging.getLogger("mbert_retrieval")  # where log_truncation writes
    encoding_logger.addFilter(count)
    try:
        yield counted
    finally:
        encoding_logger.removeFilter(count)


def _dim(model, vectors: np.ndarray) -> int:
    if len(vectors):
        return vectors.shape[1]
    return int(np.asarray(model.encode_documents(["x"])).shape[-1])


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One build at a time per index folder, across processes (a CLI run beside a server's reindex)."""
    _check_target(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        yield
        return
    with open(directory / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another build of {directory} is running") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_target(directory: Path) -> None:
    """Refuse to turn a folder with unrelated content into an index (and later delete that content)."""
    if directory.exists() and not directory.is_dir():
        raise IndexFormatError(f"cannot write an index to {directory}: it is a file")
    if directory.is_dir() and not (directory / POINTER).exists():
        ours = (SNAPSHOT_PREFIX, BUILDING_PREFIX, LOCK_FILE, f".{POINTER}.")
        foreign = sorted(p.name for p in directory.iterdir() if not p.name.startswith(ours))
        if foreign:
            raise IndexFormatError(
                f"cannot write an index to {directory}: the folder is not empty and is not a code index "
                f"(it holds {', '.join(foreign[:3])})"
            )


def _write_snapshot(directory: Path, meta: dict, entries, dense: FaissIndex, bm25: BM25Index) -> str:
    """Write a complete snapshot beside the live one, then switch the pointer to it atomically."""
    building = directory / f"{BUILDING_PREFIX}{secrets.token_hex(6)}"
    building.mkdir()
    try:
        rows = [{"id": chunk_id, **dataclasses.asdict(chunk)} for chunk_id, chunk in entries]
        atomic_write_text(building / "chunks.json", json.dumps(rows))
        dense.save(building / "dense")
        bm25.save(building / "bm25")
        meta = {**meta, "checksums": checksums(building)}
        atomic_write_text(building / "index.json", json.dumps(meta, indent=1))
        name = f"{SNAPSHOT_PREFIX}{time.time_ns()}-{secrets.token_hex(3)}"
        os.replace(building, directory / name)
    finally:
        shutil.rmtree(building, ignore_errors=True)
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
