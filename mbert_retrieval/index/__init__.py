"""Indexes: FaissIndex for single vectors, PlaidIndex for multi-vector (ColBERT) embeddings."""

from mbert_retrieval.index.storage import IndexFormatError

__all__ = ["FaissIndex", "IndexFormatError", "PlaidIndex"]


def __getattr__(name: str):
    if name == "FaissIndex":
        from mbert_retrieval.index.faiss_index import FaissIndex

        return FaissIndex
    if name == "PlaidIndex":
        from mbert_retrieval.index.plaid import PlaidIndex

        return PlaidIndex
    raise AttributeError(f"module 'mbert_retrieval.index' has no attribute {name!r}")
