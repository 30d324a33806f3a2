"""The models code search uses, by name: a single-vector encoder (required) and a reranker (optional).
They load through `models/loading.py`, as every search does; this module adds only what code search
asks of them."""

from __future__ import annotations

from mbert_retrieval.modeling.io import CheckpointError
from mbert_retrieval.models.loading import DEFAULT_MODEL, load_reranker, load_search_model
from mbert_retrieval.search.models import canonical_name
from mbert_retrieval.search.retriever import is_multi_vector

__all__ = ["DEFAULT_MODEL", "ModelNotFoundError", "has_default_model", "load_encoder", "load_reranker"]


class ModelNotFoundError(ValueError):
    """No model was given and no default model is installed."""


def load_encoder(model: str | None = None, cpu_backend: str = "auto"):
    """A single-vector model (a `DenseRetriever` for our folders) from a folder or hub id, or the
    default model when `model` is None.

    `cpu_backend` picks how our models run on a machine without a GPU: "torch" (float32), "bf16"
    (bfloat16), "onnx" (onnxruntime with int8 weights, exported on first use) or "auto" (bf16 on CPUs
    with AMX, else onnx when an exported file is there and onnxruntime is installed, else torch); see
    mbert_retrieval.models.cpu_backend.
    """
    from mbert_retrieval.models.cpu_backend import cpu_backend_for, load_dense_encoder, torch_dtype

    if model is None or model == DEFAULT_MODEL:
        if not has_default_model():
            raise ModelNotFoundError(
                "no default code search model is installed: pass --model with a dense model folder "
                "(a DenseRetriever / sentence-transformers folder of a ModernBERT model) or a hub id"
            )
        model = DEFAULT_MODEL
    folder = None if model == DEFAULT_MODEL else model
    backend = cpu_backend_for(folder, cpu_backend)
    if backend == "onnx":
        return load_dense_encoder(folder, cpu_backend="onnx")
    encoder = load_search_model(model, dtype=torch_dtype(backend))
    if is_multi_vector(encoder):
        raise CheckpointError(f"{model} is a ColBERT model: code search needs a single-vector (dense) model")
    return encoder


def has_default_model() -> bool:
    from mbert_retrieval.models.dense import default_model_dir

    return default_model_dir() is not None


def model_name(model: str | None) -> str:
    """The name an index records for `model`: an absolute folder path, a hub id, or "default"."""
    return DEFAULT_MODEL if model is None else canonical_name(model)
