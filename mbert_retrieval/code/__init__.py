"""Code search: walk a repository, split it into functions / classes / methods, index and search it.

from mbert_retrieval.code import CodeIndex, build_code_index, load_encoder

model = load_encoder("path/to/dense-model")
build_code_index("path/to/repo", "repo-index", model, model_name="path/to/dense-model")
hits = CodeIndex.load("repo-index").search(model, "parse a json string", k=10)
"""

from mbert_retrieval.code.chunking import LANGUAGES, Chunk, ChunkSettings, chunk_file
from mbert_retrieval.code.encoders import ModelNotFoundError, load_encoder, load_reranker
from mbert_retrieval.code.index import CodeHit, CodeIndex, FusionSettings, IndexReport, build_code_index
from mbert_retrieval.code.walk import Scan, SourceFile, scan_repository

__all__ = [
    "LANGUAGES",
    "Chunk",
    "ChunkSettings",
    "CodeHit",
    "CodeIndex",
    "FusionSettings",
    "IndexReport",
    "ModelNotFoundError",
    "Scan",
    "SourceFile",
    "build_code_index",
    "chunk_file",
    "load_encoder",
    "load_reranker",
    "scan_repository",
]
