"""BM25Index moved to `mbert_retrieval.index.bm25`; these names stay importable from here."""

from mbert_retrieval.index.base import top_k_indices
from mbert_retrieval.index.bm25 import IDENTIFIER_BOUNDARY, BM25Index, copier, import_bm25s

__all__ = ["IDENTIFIER_BOUNDARY", "BM25Index", "copier", "import_bm25s", "top_k_indices"]
