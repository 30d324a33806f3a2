"""Indexes, all following the `Index` protocol (base.py): FaissIndex (single vectors), PlaidIndex and
MaxSimIndex (multi-vector, ColBERT: approximate and exact), BM25Index (texts)."""

from __future__ import annotations

import importlib

from mbert_retrieval.index.base import Index
from mbert_retrieval.index.storage import IndexFormatError

_LAZY = {  # imported on first use: faiss, torch and bm25s are heavy or optional
    "FaissIndex": "mbert_retrieval.index.faiss_index",
    "PlaidIndex": "mbert_retrieval.index.plaid",
    "MaxSimIndex": "mbert_retrieval.index.maxsim",
    "BM25Index": "mbert_retrieval.index.bm25",
}

__all__ = ["BM25Index", "FaissIndex", "Index", "IndexFormatError", "MaxSimIndex", "PlaidIndex"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mbert_retrieval.index' has no attribute {name!r}")
