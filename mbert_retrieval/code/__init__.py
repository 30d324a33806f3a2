"""Code search: walk a repository, split it into functions / classes / methods, index and search it.

    from mbert_retrieval.code import CodeIndex, build_code_index, load_encoder

    model = load_encoder("path/to/dense-model")
    build_code_index("path/to/repo", "repo-index", model, model_name="path/to/dense-model")
    hits = CodeIndex.load("repo-index").search(model, "parse a json string", k=10)

Names are imported on first use, so the command line stays quick to start.
"""

from __future__ import annotations

from mbert_retrieval.lazy import lazy_attributes

_NAMES = {
    "chunking": ["LANGUAGES", "Chunk", "ChunkSettings", "chunk_file"],
    "encoders": ["ModelNotFoundError", "load_encoder", "load_reranker"],
    "index": ["CodeHit", "CodeIndex", "FusionSettings", "IndexReport", "build_code_index"],
    "walk": ["Scan", "SourceFile", "scan_repository"],
}
__all__ = [name for names in _NAMES.values() for name in names]
__getattr__ = lazy_attributes(__name__, _NAMES)
