"""Indexes, all following the `Index` protocol (base.py): FaissIndex (single vectors), PlaidIndex and
MaxSimIndex (multi-vector, ColBERT: approximate and exact), BM25Index (texts)."""

from __future__ import annotations

from mbert_retrieval.index.base import Index
from mbert_retrieval.index.storage import IndexFormatError
from mbert_retrieval.lazy_imports import lazy_attributes

_LAZY = {  # imported on first use: faiss, torch and bm25s are heavy or optional
    "mbert_retrieval.index.faiss_index": ["FaissIndex"],
    "mbert_retrieval.index.plaid": ["PlaidIndex"],
    "mbert_retrieval.index.maxsim": ["MaxSimIndex"],
    "mbert_retrieval.index.bm25": ["BM25Index"],
}

__all__ = ["BM25Index", "FaissIndex", "Index", "IndexFormatError", "MaxSimIndex", "PlaidIndex"]

__getattr__ = lazy_attributes(__name__, _LAZY)
