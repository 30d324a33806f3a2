"""The checked metadata of a code index: the pointer, `index.json` and `chunks.json`.

Every file of a snapshot is pinned by a sha256 recorded one level up, so that a damaged or edited
byte anywhere is refused at load with an `IndexFormatError` naming the file:

    CURRENT.json          {"format_version", "snapshot", "index_sha256"}: pins index.json
    snapshot-.../
        index.json        settings, root, files and "checksums": pins chunks.json and the manifests
        chunks.json
        dense/manifest.json, bm25/manifest.json   (index/storage.py): pin their data files

The values are checked as well: `root` must be an absolute, normalised path; every file and chunk
path relative, normalised and inside the root (no "..", no absolute path); the dense index must use
the inner-product metric the code index is built with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mbert_retrieval.code.chunking import LANGUAGES, Chunk, ChunkSettings
from mbert_retrieval.files import atomic_write_text, file_sha256
from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.search.fusion import FusionSettings

FORMAT_VERSION = 2  # 1: the release before checksums
POINTER = "CURRENT.json"
SNAPSHOT_PREFIX = "snapshot-"
META_FILE = "index.json"
CHUNKS_FILE = "chunks.json"
PINNED_FILES = (CHUNKS_FILE, "dense/manifest.json", "bm25/manifest.json")
DENSE_METRIC = "ip"  # vectors are L2-normalised: inner product is cosine similarity
CHUNK_KINDS = frozenset({"function", "method", "class", "type", "module", "text"})
MAX_POINTER_BYTES = 4096
SHA256 = re.compile(r"[0-9a-f]{64}")
META_TYPES = {
    "format_version": int,
    "root": str,
    "model_name": str,
    "dim": int,
    "chunk_settings": dict,
    "fusion": dict,
    "skipped": dict,
    "files": dict,
    "checksums": dict,
}
CHUNK_TYPES = {
    "id": str,
    "path": str,
    "language": str,
    "symbol": (str, type(None)),
    "kind": str,
    "start_line": int,
    "end_line": int,
    "text": str,
}


@dataclass(frozen=True)
class Pointer:
    snapshot: str
    index_sha256: str | None  # None: written by the release before checksums


def rebuild_hint(directory: Path, root: str | None = None) -> str:
    return f"rebuild it with `mbert-retrieval index-code {root or 'REPO'} --index {directory} --full`"


# --------------------------------------------------------------------------------------------- reading


def read_pointer(directory: Path) -> Pointer:
    """The live snapshot named by `directory/CURRENT.json`."""
    path = directory / POINTER
    if not path.is_file():
        raise IndexFormatError(
            f"{directory} is not a code index (no {POINTER}); build one with "
            f"`mbert-retrieval index-code REPO --index {directory}`"
        )
    pointer = _read_json(path, limit=MAX_POINTER_BYTES)
    if not isinstance(pointer, dict):
        raise IndexFormatError(f"{path} is corrupt: not a JSON object")
    name = pointer.get("snapshot")
    if not isinstance(name, str) or not name.startswith(SNAPSHOT_PREFIX) or "/" in name or "\0" in name:
        raise IndexFormatError(f"{path} names an invalid snapshot {name!r}")
    if pointer.get("format_version", 1) == 1 and set(pointer) <= {"format_version", "snapshot"}:
        return Pointer(name, None)
    if set(pointer) != {"format_version", "snapshot", "index_sha256"}:
        raise IndexFormatError(f"{path} is corrupt: unexpected keys {sorted(pointer)}")
    if pointer["format_version"] != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: code index format {pointer['format_version']!r} is not supported "
            f"(this release reads format {FORMAT_VERSION})"
        )
    if not isinstance(pointer["index_sha256"], str) or not SHA256.fullmatch(pointer["index_sha256"]):
        raise IndexFormatError(f"{path} is corrupt: 'index_sha256' is not a sha256 checksum")
    return Pointer(name, pointer["index_sha256"])


def read_meta(directory: Path, pointer: Pointer) -> dict:
    """The snapshot's index.json, checked against the pointer's checksum and validated."""
    folder = directory / pointer.snapshot
    if not folder.is_dir():
        raise IndexFormatError(f"{folder}: snapshot named by {POINTER} is missing")
    if pointer.index_sha256 is None:
        raise IndexFormatError(
            f"{directory}: this code index was written by an earlier release, without checksums; "
            + rebuild_hint(directory, _unchecked_root(folder))
        )
    meta = _read_json(folder / META_FILE, sha256=pointer.index_sha256, recorded_in=directory / POINTER)
    _check_meta(folder / META_FILE, meta)
    return meta


def read_chunks(folder: Path, meta: dict) -> tuple[list[str], list[Chunk]]:
    """The ids and chunks of chunks.json; the dense and BM25 manifests are checked on the way."""
    recorded_in = folder / META_FILE
    for name in PINNED_FILES[1:]:
        _check_sha256(folder / name, meta["checksums"][name], recorded_in)
    rows = _read_json(folder / CHUNKS_FILE, sha256=meta["checksums"][CHUNKS_FILE], recorded_in=recorded_in)
    if not isinstance(rows, list):
        raise IndexFormatError(f"{folder / CHUNKS_FILE}: not a JSON list of chunks")
    ids, chunks = [], []
    for number, row in enumerate(rows):
        problem = _chunk_problem(row, meta["files"])
        if problem:
            raise IndexFormatError(f"{folder / CHUNKS_FILE}: chunk {number} {problem}")
        fields = dict(row)
        ids.append(fields.pop("id"))
        chunks.append(Chunk(**fields))
    if len(set(ids)) != len(ids):
        raise IndexFormatError(f"{folder / CHUNKS_FILE}: chunk ids are not unique")
    return ids, chunks


def check_dense(folder: Path, dense) -> None:
    if dense.metric != DENSE_METRIC:
        raise IndexFormatError(
            f"{folder / 'dense' / 'manifest.json'}: metric {dense.metric!r} is not {DENSE_METRIC!r}, "
            f"the one code indexes are built with"
        )


def is_clean_relative_path(path: object) -> bool:
    """A "/"-separated path inside the root: not absolute, no "", "." or ".." parts, no NUL."""
    if not isinstance(path, str) or not path or "\0" in path or path.startswith(("/", "\\")):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/")) and ".." not in re.split(
        r"[\\/]", path
    )


# --------------------------------------------------------------------------------------------- writing


def checksums(folder: Path) -> dict[str, str]:
    """What index.json records: the sha256 of the snapshot's other metadata files."""
    return {name: file_sha256(folder / name) for name in PINNED_FILES}


def write_pointer(directory: Path, snapshot: str) -> None:
    """Make `snapshot` the live one, pinning its index.json (atomic: temp file, fsync, rename)."""
    pointer = {
        "format_version": FORMAT_VERSION,
        "snapshot": snapshot,
        "index_sha256": file_sha256(directory / snapshot / META_FILE),
    }
    atomic_write_text(directory / POINTER, json.dumps(pointer) + "\n")


# ------------------------------------------------------------------------------------------- internals


def _read_json(
    path: Path,
    *,
    sha256: str | None = None,
    recorded_in: Path | None = None,
    limit: int | None = None,
):
    try:
        with open(path, "rb") as handle:
            data = handle.read() if limit is None else handle.read(limit + 1)
    except OSError as err:
        raise IndexFormatError(f"{path} is missing or unreadable: {err.strerror}") from None
    if limit is not None and len(data) > limit:
        raise IndexFormatError(f"{path} is corrupt: larger than {limit} bytes")
    if sha256 is not None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise _checksum_error(path, recorded_in)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise IndexFormatError(f"{path} is corrupt: not valid JSON ({err})") from None


def _check_sha256(path: Path, expected: str, recorded_in: Path) -> None:
    try:
        actual = file_sha256(path)
    except OSError as err:
        raise IndexFormatError(f"{path} is missing or unreadable: {err.strerror}") from None
    if actual != expected:
        raise _checksum_error(path, recorded_in)


def _checksum_error(path: Path, recorded_in: Path | None) -> IndexFormatError:
    return IndexFormatError(
        f"{path} does not match the sha256 checksum recorded in {recorded_in}: "
        f"the file is corrupt or was edited"
    )


def _check_meta(path: Path, meta) -> None:
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{path}: not a JSON object")
    for key, kind in META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise IndexFormatError(f"{path}: '{key}' is missing or not a {kind.__name__}")
    if meta["format_version"] != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: code index format {meta['format_version']!r} is not supported")
    root = meta["root"]
    if "\0" in root or not os.path.isabs(root) or os.path.normpath(root) != root:
        raise IndexFormatError(f"{path}: 'root' {root!r} is not an absolute, normalised path")
    if meta["dim"] <= 0:
        raise IndexFormatError(f"{path}: 'dim' must be positive, got {meta['dim']}")
    if sorted(meta["checksums"]) != sorted(PINNED_FILES) or not all(
        isinstance(v, str) and SHA256.fullmatch(v) for v in meta["checksums"].values()
    ):
        raise IndexFormatError(f"{path}: 'checksums' must give the sha256 of {', '.join(PINNED_FILES)}")
    for name, entry in meta["files"].items():
        if not is_clean_relative_path(name):
            raise IndexFormatError(f"{path}: file path {name!r} is not a relative path inside the root")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise IndexFormatError(f"{path}: the entry of {name!r} has no sha256")
    _check_settings(path, meta)


def _check_settings(path: Path, meta: dict) -> None:
    for key, settings in (("chunk_settings", ChunkSettings), ("fusion", FusionSettings)):
        try:
            settings(**meta[key])
        except (TypeError, ValueError) as err:
            raise IndexFormatError(f"{path}: invalid '{key}': {err}") from None


def _chunk_problem(row, files: dict) -> str | None:
    """What is wrong with one row of chunks.json, or None."""
    if not isinstance(row, dict) or set(row) != set(CHUNK_TYPES):
        return f"must be an object with the keys {', '.join(CHUNK_TYPES)}"
    for key, kind in CHUNK_TYPES.items():
        if not isinstance(row[key], kind) or isinstance(row[key], bool):
            return f"has a '{key}' of the wrong type"
    if not is_clean_relative_path(row["path"]):
        return f"has path {row['path']!r}, which is not a relative path inside the root"
    if row["path"] not in files:
        return f"has path {row['path']!r}, which is not among the indexed files"
    if row["language"] not in LANGUAGES or row["kind"] not in CHUNK_KINDS:
        return f"has an unknown language {row['language']!r} or kind {row['kind']!r}"
    if not 1 <= row["start_line"] <= row["end_line"]:
        return f"has invalid lines {row['start_line']}-{row['end_line']}"
    return None


def _unchecked_root(folder: Path) -> str | None:
    """The root an old snapshot recorded, only to show in the rebuild command."""
    try:
        root = json.loads((folder / META_FILE).read_text(encoding="utf-8")).get("root")
    except (OSError, ValueError, AttributeError):
        return None
    return root if isinstance(root, str) and os.path.isabs(root) else None
