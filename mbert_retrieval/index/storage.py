"""Index folders: versioned data, a manifest with checksums, and crash-safe saves.

A saved index is a folder:

    my-index/
        manifest.json          # format version, settings, counts, and the sha256 of every data file
        data-<stamp>/          # the files the manifest lists
            ...

A save writes a complete new `data-*` folder first and only then replaces `manifest.json` (atomically:
temp file, fsync, rename). A crash at any moment therefore leaves either the old manifest pointing at the
old, untouched data, or the new manifest pointing at the complete new data. Old data folders are removed
after the switch.

A save holds an exclusive lock on the folder's `.lock` file (saves to one folder take turns). What a
save killed midway leaves (a `.staging-*` folder, a `.manifest.json.*.tmp` file) is removed by the next
save, or by the next load when no save holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbert_retrieval.files import atomic_write, atomic_write_text, file_sha256, fsync_dir, read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_PREFIX = "data-"
STAGING_PREFIX = ".staging-"
LOCK_FILE = ".lock"

FileWriter = Callable[[Path], None]


class IndexFormatError(ValueError):
    """A saved index that is missing, corrupt, truncated, or does not match what the caller expects."""


def save_index_folder(directory: str | os.PathLike, files: dict[str, FileWriter], manifest: dict[str, Any]):
    """Write `files` (name -> function writing that file) and `manifest` as the new state of `directory`."""
    directory = Path(directory)
    check_writable_target(directory, MANIFEST, (DATA_PREFIX, STAGING_PREFIX, LOCK_FILE, f".{MANIFEST}."))
    directory.mkdir(parents=True, exist_ok=True)
    with folder_lock(directory, wait=True):
        _remove_interrupted_saves(directory)
        entries = {}

        def write_files(staging: Path) -> None:
            for name, write in files.items():
                path = staging / name
                atomic_write(path, write)
                entries[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}

        data_name = publish_folder(directory, DATA_PREFIX, write_files)
        full_manifest = {"format_version": FORMAT_VERSION, **manifest, "data": data_name, "files": entries}
        atomic_write_text(directory / MANIFEST, json.dumps(full_manifest, indent=2) + "\n")
        _remove_stale_data(directory, keep=data_name)


def load_index_folder(
    directory: str | os.PathLike,
    index_type: str,
    expected_model: str | None = None,
    verify_checksums: bool = True,
) -> tuple[dict[str, Any], Path]:
    """Read and check the manifest of a saved index; returns it with the folder holding the data files."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{directory}: index format version {manifest.get('format_version')!r}, "
            f"this library reads version {FORMAT_VERSION}"
        )
    if manifest.get("index_type") != index_type:
        raise IndexFormatError(
            f"{directory} holds a {manifest.get('index_type')!r} index, not a {index_type!r} index"
        )
    if expected_model is not None and manifest.get("model_name") != expected_model:
        raise IndexFormatError(
            f"{directory} was built with model {manifest.get('model_name')!r}, "
            f"but {expected_model!r} was expected: query embeddings would not match the index"
        )
    data_dir = directory / str(manifest.get("data", ""))
    files = manifest.get("files")
    if not isinstance(files, dict) or not manifest.get("data") or not data_dir.is_dir():
        raise IndexFormatError(f"{directory}: manifest.json names no data folder, or it is missing")
    for name, entry in files.items():
        check_file(data_dir / name, entry, verify_checksums)
    clean_interrupted_saves(directory)
    return manifest, data_dir


def clean_interrupted_saves(directory: Path) -> None:
    """Remove what killed saves left behind, unless a save is running now (or the folder is read-only)."""
    if not any(_left_by_a_save(path) for path in directory.iterdir()):
        return
    try:
        with folder_lock(directory, wait=False):
            _remove_interrupted_saves(directory)
    except (SaveInProgress, OSError):
        return


def read_manifest(directory: Path, name: str = MANIFEST, saved: str = "index") -> dict[str, Any]:
    """The JSON object in `directory / name`, the manifest of a saved `saved` (an index, a retriever)."""
    path = directory / name
    if not directory.is_dir():
        raise IndexFormatError(f"{saved} folder {directory} does not exist")
    if not path.is_file():
        raise IndexFormatError(f"{directory} has no {name}: it is not a saved {saved}")
    try:
        return read_json(path, IndexFormatError)
    except IndexFormatError as err:
        raise IndexFormatError(f"{err} (corrupt manifest)") from None


def check_file(path: Path, entry: dict[str, Any], verify_checksum: bool) -> None:
    if not path.is_file():
        raise IndexFormatError(f"index file {path} is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise IndexFormatError(
            f"index file {path} has {size} bytes, the manifest says {entry.get('bytes')}: "
            f"the file is truncated or was changed"
        )
    if verify_checksum and file_sha256(path) != entry.get("sha256"):
        raise IndexFormatError(f"index file {path} does not match its sha256 checksum: the file is corrupt")


def publish_folder(
    directory: Path, prefix: str, write: Callable[[Path], None], staging_prefix: str = STAGING_PREFIX
) -> str:
    """Let `write` fill a new folder, then give it its final name, `prefix` and a unique stamp, in
    `directory` (a rename: readers see the whole folder or none). Call with the folder's lock held."""
    staging = directory / f"{staging_prefix}{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        write(staging)
        fsync_dir(staging)
        name = f"{prefix}{time.time_ns()}-{secrets.token_hex(3)}"
        os.replace(staging, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(directory)
    return name


class SaveInProgress(RuntimeError):
    """Another save holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(directory: Path, wait: bool):
    """The folder's save lock (its `.lock` file), held until the block ends (and released by the OS
    if the process dies). Without `wait`, a lock held elsewhere is a SaveInProgress."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock, so nothing counts as stale
        if not wait:
            raise SaveInProgress(str(directory)) from None
        yield
        return
    with open(directory / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SaveInProgress(f"a save to {directory} is running") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _left_by_a_save(path: Path) -> bool:
    """A staging folder or a manifest temp file: only a running save uses them; the lock tells which."""
    is_manifest_tmp = path.name.startswith(f".{MANIFEST}.") and path.name.endswith(".tmp")
    return path.name.startswith(STAGING_PREFIX) or is_manifest_tmp


def _remove_interrupted_saves(directory: Path) -> None:
    """Call with the save lock held."""
    for path in directory.iterdir():
        if not _left_by_a_save(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_writable_target(
    directory: Path, marker: str, own_prefixes: tuple[str, ...], what: str = "an index"
) -> None:
    """Refuse to turn a folder with unrelated content into `what` (and so to delete that content
    later): a folder without the `marker` file may hold only names that start with `own_prefixes`."""
    if directory.exists() and not directory.is_dir():
        raise IndexFormatError(f"cannot save {what} to {directory}: it is a file")
    if directory.is_dir() and not (directory / marker).exists():
        foreign = [p.name for p in directory.iterdir() if not p.name.startswith(own_prefixes)]
        if foreign:
            raise IndexFormatError(
                f"cannot save {what} to {directory}: the folder is not empty and is not {what} "
                f"(it holds {', '.join(sorted(foreign)[:3])})"
            )


def _remove_stale_data(directory: Path, keep: str) -> None:
    for path in directory.iterdir():
        if path.name != keep and path.is_dir() and path.name.startswith(DATA_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
