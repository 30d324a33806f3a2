"""HTTP code search for IDE plugins: `create_app(CodeSearchService(...))`, run with uvicorn.

Names are imported on first use: the `serve` command (server/cli.py) registers without FastAPI.
"""

from __future__ import annotations

from mbert_retrieval.lazy import lazy_attributes

_LAZY = {
    "app": ["Limits", "create_app"],
    "run": ["BackgroundServer", "serve", "start_in_thread"],
    "service": ["CodeSearchService", "ReindexRunning"],
}
__all__ = [name for names in _LAZY.values() for name in names]

__getattr__ = lazy_attributes(__name__, _LAZY)
