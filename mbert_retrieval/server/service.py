"""The code search service behind the HTTP API: a live index snapshot, the model, and reindexing.

Searches read `service.index` once and use that snapshot to the end of the request. A reindex
builds a new snapshot on disk beside the live one (`build_code_index`, in a low-priority worker
process: see reindex_worker.py), loads it, and only then replaces the reference, so no reader ever
sees a half-built index and none waits for a rebuild.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbert_retrieval.code.index import CodeHit, CodeIndex, IndexReport
from mbert_retrieval.server.reindex_worker import ReindexFailed, ReindexWorker

logger = logging.getLogger(__name__)


class ReindexRunning(RuntimeError):
    """A reindex was asked for while another one is running."""


@dataclass
class ReindexState:
    running: bool = False
    completed: int = 0
    last_report: IndexReport | None = None
    last_error: str | None = None


class Serialized:
    """Calls into a torch model one at a time: a tokenizer or model is not safe to share across threads."""

    def __init__(self, model, lock: threading.Lock):
        self._model = model
        self._lock = lock

    def encode_queries(self, texts, **options):
        with self._lock:
            return self._model.encode_queries(texts, **options)

    def predict(self, pairs, **options):
        with self._lock:
            return self._model.predict(pairs, **options)


class CodeSearchService:
    def __init__(
        self,
        index_dir: str | Path,
        model,
        *,
        model_name: str,
        reranker=None,
        rerank_depth: int = 50,
        reindex_threads: int | None = None,
    ):
        """`reindex_threads`: torch threads of the reindex process (default: half the cores)."""
        self.index_dir = Path(index_dir)
        self.model = model
        self.model_name = model_name
        self.reranker = reranker
        self.rerank_depth = rerank_depth
        self._model_lock = threading.Lock()
        self._reindex_lock = threading.Lock()
        self._worker = ReindexWorker(model, threads=reindex_threads)
        self._index = CodeIndex.load(self.index_dir)
        self.state = ReindexState()
        self._check_model(self._index)

    @property
    def index(self) -> CodeIndex:
        """The live snapshot (replaced by a reindex, never modified)."""
        return self._index

    def _check_model(self, index: CodeIndex) -> None:
        dim = np.asarray(self.model.encode_queries(["x"])).shape[-1]
        if dim != index.meta["dim"]:
            raise ValueError(
                f"the model gives {dim}-dimensional vectors but the index at {self.index_dir} holds "
                f"{index.meta['dim']}-dimensional ones (built with {index.model_name!r}); pass that model"
            )
        if index.model_name != self.model_name:
            logger.warning(
                "index built with %r, served with %r: the next reindex re-encodes everything",
                index.model_name,
                self.model_name,
            )

    def search(
        self,
        query: str,
        k: int,
        *,
        path: str | None = None,
        language: str | None = None,
        mode: str | None = None,
        rerank: bool | None = None,
    ) -> tuple[CodeIndex, list[CodeHit]]:
        """Hits from one snapshot, returned with it. `rerank=None` reranks when a reranker is loaded."""
        index = self._index
        use_reranker = self.reranker is not None and rerank is not False
        if rerank and self.reranker is None:
            raise ValueError("rerank was asked for but the server runs without a reranker")
        hits = index.search(
            Serialized(self.model, self._model_lock),
            query,
            k,
            path=path,
            language=language,
            mode=mode,
            reranker=Serialized(self.reranker, self._model_lock) if use_reranker else None,
            rerank_depth=self.rerank_depth,
        )
        return index, hits

    def reindex(self, full: bool = False, wait: bool = False) -> threading.Thread:
        """Rebuild the index of the repository it was built from, in a background thread."""
        if not self._reindex_lock.acquire(blocking=False):
            raise ReindexRunning("a reindex is already running")
        self.state.running = True
        thread = threading.Thread(target=self._reindex, args=(full,), name="reindex", daemon=True)
        thread.start()
        if wait:
            thread.join()
        return thread

    def close(self) -> None:
        """Stop the reindex process (started by the first reindex, then kept for the next ones)."""
        self._worker.close()

    def _reindex(self, full: bool) -> None:
        started = time.perf_counter()
        try:
            report = self._worker.build(
                self._index.root, self.index_dir, model_name=self.model_name, full=full
            )
            fresh = CodeIndex.load(self.index_dir)
            self._index = fresh  # the swap: requests already running keep the snapshot they hold
            self.state.last_report, self.state.last_error = report, None
            self.state.completed += 1
            logger.info("reindex done in %.1fs: %s", time.perf_counter() - started, report.summary())
        except ReindexFailed as err:  # the build's own error, from the worker process
            self.state.last_error = str(err)
            logger.error("reindex failed (%s); still serving snapshot %s", err, self._index.snapshot)
        except Exception as err:  # the live index stays as it was; the error is reported by /health
            self.state.last_error = f"{type(err).__name__}: {err}"
            logger.exception("reindex failed; still serving snapshot %s", self._index.snapshot)
        finally:
            self.state.running = False
            self._reindex_lock.release()
