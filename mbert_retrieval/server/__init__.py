"""HTTP code search for IDE plugins: `create_app(CodeSearchService(...))`, run with uvicorn."""

from mbert_retrieval.server.app import Limits, create_app
from mbert_retrieval.server.run import BackgroundServer, serve, start_in_thread
from mbert_retrieval.server.service import CodeSearchService, ReindexRunning

__all__ = [
    "BackgroundServer",
    "CodeSearchService",
    "Limits",
    "ReindexRunning",
    "create_app",
    "serve",
    "start_in_thread",
]
