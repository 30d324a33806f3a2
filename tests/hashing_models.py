"""Tiny deterministic stand-ins for a dense model and a ColBERT model: every word maps to a fixed
random unit vector (seeded by its crc32), so the same text gives the same embeddings on any machine
and in any version of the library. Used to write and read the saved-retriever fixtures."""

from __future__ import annotations

import re
import zlib

import numpy as np
from torch import nn

from mbert_retrieval.models.colbert import ColBERT

DIM = 8
QUERY_LENGTH = 6


def word_vectors(text: str) -> np.ndarray:
    """One unit vector per word of `text` ([n_words, DIM] float32; a text without words gives one)."""
    words = re.findall(r"\w+", text.lower()) or [""]
    rows = [np.random.default_rng(zlib.crc32(w.encode())).standard_normal(DIM) for w in words]
    vectors = np.asarray(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class HashingEncoder:
    """A single-vector model: the normalised mean of a text's word vectors."""

    dim = DIM

    def encode_documents(self, texts, show_progress_bar=None, **kwargs) -> np.ndarray:
        means = np.asarray([word_vectors(t).mean(0) for t in texts], dtype=np.float32)
        return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-6)

    encode_queries = encode_documents


class HashingColBERT(ColBERT):
    """A multi-vector model: one word vector per token; queries padded with zeros to QUERY_LENGTH."""

    def __init__(self):
        nn.Module.__init__(self)

    @property
    def dim(self) -> int:
        return DIM

    def encode_documents(self, texts, show_progress_bar=None, **kwargs) -> list[np.ndarray]:
        return [word_vectors(t) for t in texts]

    def encode_queries(self, texts, show_progress_bar=None, **kwargs) -> np.ndarray:
        out = np.zeros((len(texts), QUERY_LENGTH, DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            vectors = word_vectors(text)[:QUERY_LENGTH]
            out[row, : len(vectors)] = vectors
        return out
