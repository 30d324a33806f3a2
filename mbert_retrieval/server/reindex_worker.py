"""Index builds for the service, run in a separate low-priority process so that searches keep the CPU.

A build in the server's own process slowed every search down to its own pace: encoding competes for
the model lock, for the GIL (chunking, BM25 and JSON work are pure Python) and for the cores (torch
runs its threads on all of them). The worker is a spawned process holding its own copy of the model,
with fewer torch threads and a higher nice value, so the operating system runs searches first and
gives the build what they leave. It starts at the first build and is kept for the next ones.
"""

from __future__ import annotations

import _thread
import io
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from pathlib import Path

from mbert_retrieval.code.index import IndexReport

logger = logging.getLogger(__name__)

NICENESS = 10  # added to the worker's nice value: its CPU share shrinks to about a tenth under contention


class ReindexFailed(RuntimeError):
    """The build failed in the worker (its message is the worker's error) or the worker died."""


class ReindexWorker:
    """Runs `build_code_index` with `model` in a child process, one build at a time."""

    def __init__(self, model, *, threads: int | None = None, niceness: int = NICENESS):
        self._model = model
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.niceness = niceness
        self._lock = threading.Lock()
        self._process = None
        self._connection = None

    def build(self, root: Path, directory: Path, *, model_name: str, full: bool) -> IndexReport:
        """Build (or update) the index at `directory` and return the report; raises ReindexFailed."""
        request = {"root": str(root), "directory": str(directory), "model_name": model_name, "full": full}
        with self._lock:
            connection = self._running_worker()
            try:
                connection.send(request)
                status, value = connection.recv()
            except (EOFError, OSError):
                code = self._process.exitcode if self._process is not None else None
                self._discard()
                raise ReindexFailed(f"the reindex process stopped unexpectedly (exit code {code})") from None
        if status != "ok":
            raise ReindexFailed(value)
        return value

    def close(self) -> None:
        """Stop the worker (a build in progress is abandoned; the next build cleans up after it)."""
        process = self._process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(10)
        with self._lock:
            self._discard()

    def _running_worker(self):
        if self._process is not None and self._process.is_alive():
            return self._connection
        self._discard()
        context = multiprocessing.get_context("spawn")  # forking a process with threads is unsafe
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=serve_builds,
            args=(child_end, model_bytes(self._model), self.threads, self.niceness),
            name="mbert-retrieval-reindex",
            daemon=True,  # ends with the server
        )
        process.start()
        child_end.close()
        self._process, self._connection = process, parent_end
        logger.info("reindex process %d started (%d torch threads)", process.pid, self.threads)
        return parent_end

    def _discard(self) -> None:
        if self._connection is not None:
            self._connection.close()
        if self._process is not None:
            self._process.join(1)
        self._process = self._connection = None


def model_bytes(model) -> bytes:
    """The model pickled for the worker. Models hold locks, which cannot be pickled: the copy gets
    new ones (a lock only guards the object it belongs to)."""
    buffer = io.BytesIO()
    try:
        _LockReplacingPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(model)
    except Exception as err:
        raise ReindexFailed(f"the model cannot be sent to the reindex process: {err}") from err
    return buffer.getvalue()


class _LockReplacingPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj) is _thread.LockType:
            return threading.Lock, ()
        if type(obj) is _thread.RLock:
            return threading.RLock, ()
        return NotImplemented


def serve_builds(connection, model: bytes, threads: int, niceness: int) -> None:
    """The worker's loop: one build per request, answered with ("ok", report) or ("error", message)."""
    import torch

    from mbert_retrieval.code.index import build_code_index

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops this process
    if hasattr(os, "nice"):
        os.nice(niceness)
    torch.set_num_threads(threads)
    encoder = pickle.loads(model)
    while True:
        try:
            request = connection.recv()
        except EOFError:  # the server closed its end or exited
            return
        try:
            report = build_code_index(
                request["root"],
                request["directory"],
                encoder,
                model_name=request["model_name"],
                full=request["full"],
                show_progress=False,
            )
            connection.send(("ok", report))
        except Exception as err:
            connection.send(("error", f"{type(err).__name__}: {err}"))
