"""Indexes, all following the `Index` protocol (base.py): FaissIndex (single vectors), PlaidIndex and
MaxSimIndex (multi-vector, ColBERT: approximate and exact), BM25Index (texts)."""

from __future__ import annotations

from mbert_retrieval.index.base import Index
from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.lazy import lazy_attributes

# imported on first use: faiss, torch and bm25s are heavy or optional
__getattr__ = lazy_attributes(
    __name__,
    {
        "faiss_index": ["FaissIndex"],
        "plaid": ["PlaidIndex"],
        "maxsim": ["MaxSimIndex"],
        "bm25": ["BM25Index"],
    },
)

__all__ = ["BM25Index", "FaissIndex", "Index", "IndexFormatError", "MaxSimIndex", "PlaidIndex"]
