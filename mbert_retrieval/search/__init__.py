"""Search: the retrieve -> rerank pipeline (Retriever and its first stages), fusion, and search systems by name."""

from mbert_retrieval.search.bm25 import BM25Index
from mbert_retrieval.search.fusion import reciprocal_rank_fusion
from mbert_retrieval.search.models import (
    SentenceTransformerEncoder,
    build_retriever,
    load_reranker,
    load_search_model,
)
from mbert_retrieval.search.retriever import Hit, Retriever

__all__ = [
    "BM25Index",
    "Hit",
    "Retriever",
    "SentenceTransformerEncoder",
    "build_retriever",
    "load_reranker",
    "load_search_model",
    "reciprocal_rank_fusion",
]
