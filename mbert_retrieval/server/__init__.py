"""HTTP code search for IDE plugins: `create_app(CodeSearchService(...))`, run with uvicorn.

Names are imported on first use: the `serve` command (server/cli.py) registers without FastAPI.
"""

from __future__ import annotations

from mbert_retrieval.lazy_imports import lazy_attributes

_LAZY = {
    "mbert_retrieval.server.app": ["Limits", "create_app"],
    "mbert_retrieval.server.run": ["BackgroundServer", "serve", "start_in_thread"],
    "mbert_retrieval.server.service": ["CodeSearchService", "ReindexRunning"],
}
__all__ = [name for names in _LAZY.values() for name in names]

__getattr__ = lazy_attributes(__name__, _LAZY)
