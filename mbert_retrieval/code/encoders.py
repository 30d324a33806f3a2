"""Load the models code search uses: a dense encoder (required) and a reranker (optional)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "default"


class ModelNotFoundError(ValueError):
    """No model was given and no default model is installed."""


def load_encoder(model: str | None = None, cpu_backend: str = "auto"):
    """A `DenseRetriever` from a folder or hub id, or the default model when `model` is None.

    `cpu_backend` picks how it runs on a machine without a GPU: "torch", "onnx" (onnxruntime with
    int8 weights, exported on first use) or "auto" (onnx when an exported file is there and
    onnxruntime is installed); see mbert_retrieval.models.onnx_backend.
    """
    from mbert_retrieval.models.onnx_backend import load_dense_encoder

    if model is None or model == DEFAULT_MODEL:
        if not has_default_model():
            raise ModelNotFoundError(
                "no default code search model is installed: pass --model with a dense model folder "
                "(a DenseRetriever / sentence-transformers folder of a ModernBERT model) or a hub id"
            )
        return load_dense_encoder(None, cpu_backend=cpu_backend)
    return load_dense_encoder(model, cpu_backend=cpu_backend)


def has_default_model() -> bool:
    from mbert_retrieval.models.dense import default_model_dir

    return default_model_dir() is not None


def model_name(model: str | None) -> str:
    """The name an index records for `model`: an absolute folder path, a hub id, or "default"."""
    if model is None:
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def load_reranker(model: str):
    """A `CrossEncoder` that re-scores the first-stage candidates."""
    from mbert_retrieval.models.cross_encoder import CrossEncoder

    return CrossEncoder.from_pretrained(model)
