"""Turn a model folder (or hub id) into the right model object: a head, or an adapter for another
sentence-transformers model.

    load_search_model("path/to/dense")        -> DenseRetriever            (sentence-transformers folder over ModernBERT)
    load_search_model("path/to/colbert")      -> ColBERT                   (PyLate folder)
    load_search_model("path/to/minilm")       -> SentenceTransformerEncoder (any other sentence-transformers model)
    load_reranker("path/to/cross-encoder")    -> CrossEncoder              (ours, or sentence-transformers' for others)

A "kind:" prefix (dense:, colbert:, st:, cross:) skips the detection. "default" names the dense
model shipped inside the package (mbert_retrieval/default_model), never a hub id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mbert_retrieval.modeling.io import CheckpointError, read_json, resolve_model_dir

KINDS = ("dense", "colbert", "st", "cross")
DEFAULT_MODEL = "default"


class SentenceTransformerEncoder:
    """Any sentence-transformers model behind the `encode_queries` / `encode_documents` interface of
    DenseRetriever: float32 numpy [n, dim], L2-normalised."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None) -> SentenceTransformerEncoder:
        from sentence_transformers import SentenceTransformer

        return cls(SentenceTransformer(str(path), device=device))

    @property
    def dim(self) -> int:
        get_dimension = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return int(get_dimension())

    def encode_queries(self, texts, show_progress_bar: bool | None = None, **kwargs) -> np.ndarray:
        return self._encode(self.model.encode_query, texts, show_progress_bar)

    def encode_documents(self, texts, show_progress_bar: bool | None = None, **kwargs) -> np.ndarray:
        return self._encode(self.model.encode_document, texts, show_progress_bar)

    def _encode(self, encode, texts, show_progress_bar) -> np.ndarray:
        vectors = encode(
            texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=bool(show_progress_bar)
        )
        return np.asarray(vectors, dtype=np.float32)


def split_kind(spec: str) -> tuple[str | None, str]:
    """'colbert:path' -> ('colbert', 'path'); 'path' -> (None, 'path')."""
    kind, sep, rest = str(spec).partition(":")
    if sep and kind in KINDS:
        return kind, rest
    return None, str(spec)


def detect_kind(model_dir: Path) -> str:
    """dense, colbert, st or cross, from the files of a model folder."""
    config = read_config(model_dir)
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        if "pylate" in modules_file.read_text():
            return "colbert"
        return "dense" if config.get("model_type") == "modernbert" else "st"
    architectures = " ".join(config.get("architectures") or [])
    if "SequenceClassification" in architectures:
        return "cross"
    if config.get("model_type") == "modernbert":
        return "dense"
    raise CheckpointError(
        f"{model_dir}: not a model folder this library can search with (expected a sentence-transformers, "
        f"PyLate or ModernBERT folder; found {', '.join(sorted(p.name for p in model_dir.iterdir())[:6])})"
    )


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        return {}
    return read_json(path)


def resolve(spec: str) -> tuple[str, Path]:
    kind, path = split_kind(spec)
    model_dir = shipped_model_dir() if path == DEFAULT_MODEL else resolve_model_dir(path)
    if not model_dir.is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    return kind or detect_kind(model_dir), model_dir


def shipped_model_dir() -> Path:
    """The folder of the model shipped inside the package, which the name "default" stands for."""
    from mbert_retrieval.models.dense import default_model_dir

    model_dir = default_model_dir()
    if model_dir is None:
        raise CheckpointError(
            f"{DEFAULT_MODEL!r} names the model shipped with mbert-retrieval, but this installation has "
            "none; pass a model folder or hub id"
        )
    return model_dir


def load_search_model(spec: str, device: str | None = None, dtype=None):
    """A first-stage model: DenseRetriever, ColBERT or SentenceTransformerEncoder. `dtype` (a
    torch dtype) applies to our own models; None keeps their default for the device."""
    kind, model_dir = resolve(spec)
    if kind == "cross":
        raise CheckpointError(f"{spec} is a cross-encoder: it can rerank (--rerank) but not index documents")
    return load_kind(kind, model_dir, device, dtype)


def load_reranker(spec: str, device: str | None = None):
    """A reranker: CrossEncoder (ours for ModernBERT, sentence-transformers' otherwise) or ColBERT."""
    kind, model_dir = resolve(spec)
    if kind in ("colbert", "cross"):
        return load_kind(kind, model_dir, device)
    raise CheckpointError(f"{spec} is a {kind} model: rerank needs a cross-encoder or a ColBERT model")


def load_kind(kind: str, model_dir: Path, device: str | None, dtype=None):
    if kind == "dense":
        from mbert_retrieval.models.dense import DenseRetriever

        return DenseRetriever.from_pretrained(model_dir, device=device, dtype=dtype)
    if kind == "colbert":
        from mbert_retrieval.models.colbert import ColBERT

        return ColBERT.from_pretrained(model_dir, device=device, dtype=dtype)
    if kind == "st":
        return SentenceTransformerEncoder.from_pretrained(model_dir, device=device)
    if read_config(model_dir).get("model_type") == "modernbert":
        from mbert_retrieval.models.cross_encoder import CrossEncoder

        return CrossEncoder.from_pretrained(model_dir, device=device)
    from sentence_transformers import CrossEncoder as SentenceTransformersCrossEncoder

    return SentenceTransformersCrossEncoder(str(model_dir), device=device)
