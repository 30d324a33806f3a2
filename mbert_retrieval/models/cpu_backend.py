"""How a dense model runs on a machine without a GPU: PyTorch in float32 or bfloat16, or the ONNX
graph with int8 linear layers (`onnx_backend.py`).

    cpu_backend_for("path/to/dense-model")         # "bf16", "onnx" or "torch" on this machine
    model = load_dense_encoder("path/to/dense-model", cpu_backend="auto")

"auto" picks, in this order:
- "bf16" on CPUs with bfloat16 matrix units (Intel AMX: Xeon of the 4th generation and later), where
  oneDNN runs torch's bfloat16 products on them: on 2 such cores 2.4x float32 and faster than the
  int8 graph, with nDCG@10 closer to float32's than int8's (benchmarks/NOTES.md, CPU path);
- "onnx" where onnxruntime is installed and an export exists (beside the model or in the user cache);
- "torch" (float32) otherwise, and whenever a GPU is present.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from mbert_retrieval.modeling.io import CheckpointError
from mbert_retrieval.models.dense import DenseRetriever, default_model_dir

logger = logging.getLogger("mbert_retrieval")

CPU_BACKENDS = ("auto", "torch", "bf16", "onnx")


def check_cpu_backend(cpu_backend: str) -> None:
    if cpu_backend not in CPU_BACKENDS:
        raise ValueError(f"cpu backend must be one of {', '.join(CPU_BACKENDS)}, got {cpu_backend!r}")


def has_bf16_matrix_units() -> bool:
    """Whether this CPU has AMX tiles (every such CPU multiplies bfloat16 matrices on them). torch
    asks its cpuinfo library, which also checks that the OS lets programs use the tiles."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: absent in some builds
    try:
        return bool(check is not None and check())
    except RuntimeError:  # a build without the check's backend: no bf16 by default, never an error
        return False


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def cpu_backend_for(model: str | os.PathLike | None = None, cpu_backend: str = "auto") -> str:
    """The backend `cpu_backend` means for `model` (None: the shipped one) on this machine: itself
    unless it is "auto" (see the module's docstring)."""
    check_cpu_backend(cpu_backend)
    if cpu_backend != "auto":
        return cpu_backend
    if torch.cuda.is_available():
        return "torch"
    if has_bf16_matrix_units():
        return "bf16"
    if onnxruntime_available():
        from mbert_retrieval.models.onnx_backend import existing_onnx_file

        if existing_onnx_file(model_dir(model)) is not None:
            return "onnx"
    return "torch"


def torch_dtype(backend: str) -> torch.dtype | None:
    """The dtype a PyTorch backend loads our models in: bfloat16 for "bf16", else None (the
    device's default: float32 on the CPU)."""
    return torch.bfloat16 if backend == "bf16" else None


def load_dense_encoder(
    model: str | os.PathLike | None = None, *, cpu_backend: str = "auto", threads: int | None = None
) -> DenseRetriever:
    """A DenseRetriever for `model` (None: the shipped one), run by `cpu_backend` (`cpu_backend_for`).
    "onnx" exports the model into the user cache on first use when no file exists; `threads` is
    onnxruntime's (see `OnnxDenseRetriever.from_pretrained`)."""
    backend = cpu_backend_for(model, cpu_backend)
    folder = model_dir(model)
    if backend != "onnx":
        return DenseRetriever.from_pretrained(folder, dtype=torch_dtype(backend))
    from mbert_retrieval.models.onnx_backend import (
        OnnxDenseRetriever,
        cache_file,
        existing_onnx_file,
        export_onnx,
    )

    onnx_file = existing_onnx_file(folder)
    if onnx_file is None:
        onnx_file = cache_file(folder)
        logger.warning("exporting %s to ONNX once, into %s", folder, onnx_file)
        export_onnx(folder, onnx_file)
    return OnnxDenseRetriever.from_pretrained(folder, onnx_file=onnx_file, threads=threads)


def model_dir(model: str | os.PathLike | None) -> Path:
    if model is None:
        folder = default_model_dir()
        if folder is None:
            raise CheckpointError("no default model is shipped with this installation: pass a model folder")
        return folder
    return DenseRetriever.resolve(model)
