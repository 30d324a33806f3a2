"""HTTP code search for IDE plugins: `create_app(CodeSearchService(...))`, run with uvicorn.

Names are imported on first use: the `serve` command (server/cli.py) registers without FastAPI.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Limits": "mbert_retrieval.server.app",
    "create_app": "mbert_retrieval.server.app",
    "BackgroundServer": "mbert_retrieval.server.run",
    "serve": "mbert_retrieval.server.run",
    "start_in_thread": "mbert_retrieval.server.run",
    "CodeSearchService": "mbert_retrieval.server.service",
    "ReindexRunning": "mbert_retrieval.server.service",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mbert_retrieval.server' has no attribute {name!r}")
