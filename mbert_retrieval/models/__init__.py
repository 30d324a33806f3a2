"""Retrieval heads on the ModernBERT encoder: dense, ColBERT and cross-encoder."""

from mbert_retrieval.models.colbert import ColBERT, PackedEmbeddings
from mbert_retrieval.models.cross_encoder import CrossEncoder
from mbert_retrieval.models.dense import ChunkEmbeddings, DenseRetriever
from mbert_retrieval.models.encoding import Chunking, PackedBatch

__all__ = [
    "ChunkEmbeddings",
    "Chunking",
    "ColBERT",
    "CrossEncoder",
    "DenseRetriever",
    "PackedBatch",
    "PackedEmbeddings",
]
