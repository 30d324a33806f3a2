"""Index builds for the service, run in a separate low-priority process so that searches keep the CPU.

A build in the server's own process slowed every search down to its own pace: encoding competes for
the model lock, for the GIL (chunking, BM25 and JSON work are pure Python) and for the cores (torch
runs its threads on all of them). The worker is a child process (`serve_builds`) holding its own
copy of the model, with fewer torch threads and a higher nice value, so the operating system runs
searches first and gives the build what they leave. It starts at the first build and is kept for
the next ones.

The two processes exchange pickles over the worker's stdin and stdout: the model first, then one
request and one reply per build. The worker's own prints go to stderr.
"""

from __future__ import annotations

import _thread
import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

from mbert_retrieval.code.index import IndexReport

logger = logging.getLogger(__name__)

WORKER_MAIN = (
    "import sys; from mbert_retrieval.server.reindex_worker import serve_builds; serve_builds(*sys.argv[1:])"
)
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
        self._process: subprocess.Popen | None = None

    def build(self, root: Path, directory: Path, *, model_name: str, full: bool) -> IndexReport:
        """Build (or update) the index at `directory` and return the report; raises ReindexFailed."""
        request = {"root": str(root), "directory": str(directory), "model_name": model_name, "full": full}
        with self._lock:
            process = self._running_worker()
            try:
                pickle.dump(request, process.stdin)
                process.stdin.flush()
                status, value = pickle.load(process.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                self._discard()
                raise ReindexFailed(
                    f"the reindex process stopped unexpectedly (exit code {process.returncode})"
                ) from None
        if status != "ok":
            raise ReindexFailed(value)
        return value

    def close(self) -> None:
        """Stop the worker (a build in progress is abandoned; the next build cleans up after it)."""
        if not self._lock.acquire(blocking=False):  # a build is running: end it
            if self._process is not None:
                self._process.terminate()
            self._lock.acquire()
        try:
            self._discard()
        finally:
            self._lock.release()

    def _running_worker(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._discard()
        model = model_bytes(self._model)
        # The model's classes must import in the worker as they do here.
        path = os.pathsep.join(entry for entry in sys.path if entry)
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER_MAIN, str(self.threads), str(self.niceness)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
            start_new_session=True,  # Ctrl-C on the server's terminal is for the server
        )
        self._process = process
        try:
            process.stdin.write(model)
            process.stdin.flush()
        except OSError:
            self._discard()
            raise ReindexFailed(
                f"the reindex process stopped while loading (exit code {process.returncode})"
            ) from None
        logger.info("reindex process %d started (%d torch threads)", process.pid, self.threads)
        return process

    def _discard(self) -> None:
        """Close the worker's stdin (an idle worker then exits by itself) and wait for it."""
        process, self._process = self._process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


def serve_builds(threads: str, niceness: str) -> None:
    """The worker: read the model, then one build per request, answered with ("ok", report) or
    ("error", message), until the server closes the pipe."""
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never into the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):
        os.nice(int(niceness))

    import torch

    from mbert_retrieval.code.index import build_code_index

    torch.set_num_threads(int(threads))
    try:
        encoder = pickle.load(requests)
    except EOFError:
        return
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:  # the server closed the pipe or exited
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
            reply = ("ok", report)
        except Exception as err:
            reply = ("error", f"{type(err).__name__}: {err}")
        try:
            pickle.dump(reply, replies)
            replies.flush()
        except OSError:  # the server is gone
            return
