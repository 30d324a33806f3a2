"""Code search: walk a repository, split it into functions / classes / methods, index and search it.

    from mbert_retrieval.code import CodeIndex, build_code_index, load_encoder

    model = load_encoder("path/to/dense-model")
    build_code_index("path/to/repo", "repo-index", model, model_name="path/to/dense-model")
    hits = CodeIndex.load("repo-index").search(model, "parse a json string", k=10)

Names are imported on first use, so the command line stays quick to start.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LANGUAGES": "mbert_retrieval.code.chunking",
    "Chunk": "mbert_retrieval.code.chunking",
    "ChunkSettings": "mbert_retrieval.code.chunking",
    "chunk_file": "mbert_retrieval.code.chunking",
    "ModelNotFoundError": "mbert_retrieval.code.encoders",
    "load_encoder": "mbert_retrieval.code.encoders",
    "load_reranker": "mbert_retrieval.code.encoders",
    "CodeHit": "mbert_retrieval.code.index",
    "CodeIndex": "mbert_retrieval.code.index",
    "FusionSettings": "mbert_retrieval.code.index",
    "IndexReport": "mbert_retrieval.code.index",
    "build_code_index": "mbert_retrieval.code.index",
    "Scan": "mbert_retrieval.code.walk",
    "SourceFile": "mbert_retrieval.code.walk",
    "scan_repository": "mbert_retrieval.code.walk",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mbert_retrieval.code' has no attribute {name!r}")
