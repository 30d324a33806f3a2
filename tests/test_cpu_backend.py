"""The CPU backends of dense models: bfloat16 gives float32's embeddings to bfloat16 rounding, "auto"
picks it where the CPU has matrix units for it, and the code commands run on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from code_search_repo import STDLIB, index_and_search_json
from typer.testing import CliRunner

from mbert_retrieval.cli import app
from mbert_retrieval.code.encoders import load_encoder
from mbert_retrieval.models import cpu_backend
from mbert_retrieval.models.cpu_backend import cpu_backend_for, load_dense_encoder
from mbert_retrieval.models.dense import DenseRetriever, default_model_dir

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(default_model_dir() is None, reason="no shipped model in this installation"),
]


def stdlib_functions(limit: int = 40) -> list[str]:
    source = (STDLIB / "json" / "decoder.py").read_text() + (STDLIB / "textwrap.py").read_text()
    return ["x", *("def " + piece for piece in source.split("\ndef ")[1:limit])]


def test_bf16_backend_gives_float32_embeddings_to_bf16_rounding():
    texts = stdlib_functions()
    reference = DenseRetriever.from_pretrained(device="cpu", dtype=torch.float32)
    model = load_dense_encoder(cpu_backend="bf16")
    assert next(model.encoder.parameters()).dtype == torch.bfloat16
    ours, expected = model.encode_documents(texts), reference.encode_documents(texts)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    cosines = (ours * expected).sum(axis=1)  # both normalised
    # bfloat16 rounding moves each embedding far less than these bounds; int8 moves it more.
    assert cosines.min() > 0.999 and (1 - cosines).mean() < 2e-4
    queries = ["decode a json document", "wrap text to a width"]
    query_cosines = (model.encode_queries(queries) * reference.encode_queries(queries)).sum(axis=1)
    assert query_cosines.min() > 0.999


def test_auto_picks_bf16_only_on_cpus_with_matrix_units(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu_backend, "has_bf16_matrix_units", lambda: True)
    assert cpu_backend_for(None, "auto") == "bf16"
    monkeypatch.setattr(cpu_backend, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(cpu_backend, "has_bf16_matrix_units", lambda: False)
    assert cpu_backend_for(None, "auto") == "torch"
    for explicit in ("torch", "bf16", "onnx"):
        assert cpu_backend_for(None, explicit) == explicit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_backend, "has_bf16_matrix_units", lambda: True)
    assert cpu_backend_for(None, "auto") == "torch"  # a GPU runs the model in bfloat16 anyway
    with pytest.raises(ValueError, match="cpu backend must be one of auto, torch, bf16, onnx"):
        cpu_backend_for(None, "int4")


def test_the_amx_check_never_fails(monkeypatch):
    def broken():
        raise RuntimeError("no cpuinfo in this build")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert cpu_backend.has_bf16_matrix_units() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert cpu_backend.has_bf16_matrix_units() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_backend.has_bf16_matrix_units() is True


def test_code_search_loads_and_runs_the_bf16_backend(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_backend, "has_bf16_matrix_units", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    encoder = load_encoder(None, cpu_backend="auto")
    assert isinstance(encoder, DenseRetriever) and next(encoder.parameters()).dtype == torch.bfloat16

    runner = CliRunner()
    assert "json/" in index_and_search_json(runner, app, tmp_path, "bf16")
    refused = runner.invoke(app, ["search-code", str(tmp_path / "index"), "json", "--cpu-backend", "int4"])
    assert refused.exit_code != 0 and "cpu backend must be one of" in refused.output
