"""Files on disk: atomic writes (temp file, fsync, rename), JSON reads that name the file, checksums.

Every layer writes through these, so a crash leaves either the old file or the new one, never half of
one. Nothing here knows about models or indexes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp_path)` to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, error: type[Exception] = ValueError, expect: type = dict) -> Any:
    """The JSON value in `path`, which must be of type `expect`; `error` naming the file if not."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise error(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise error(f"{path} cannot be read: {err.strerror or err}") from None
    if not isinstance(value, expect):
        wanted = "an object" if expect is dict else "a list"
        raise error(f"{path} must hold {wanted}, not {json.dumps(value)[:60]}")
    return value


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
