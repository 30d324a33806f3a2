"""The CPU backend: the shipped model exported to ONNX and run by onnxruntime gives our embeddings
(float32: within float tolerance; int8: the same directions), and the code commands use it."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from code_search_repo import STDLIB, index_and_search_json
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from mbert_retrieval.cli import app  # noqa: E402
from mbert_retrieval.models import cpu_backend  # noqa: E402
from mbert_retrieval.models.cpu_backend import load_dense_encoder  # noqa: E402
from mbert_retrieval.models.dense import DenseRetriever, default_model_dir  # noqa: E402
from mbert_retrieval.models.onnx_backend import (  # noqa: E402
    ONNX_FILE,
    OnnxBackendError,
    OnnxDenseRetriever,
    PaddedDenseGraph,
    cache_file,
    export_onnx,
    pad_numpy,
    similar_length_runs,
)

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(default_model_dir() is None, reason="no shipped model in this installation"),
]


def code_texts() -> list[str]:
    """Real functions of very different lengths: one-liners up to ones cut at max_length."""
    source = (STDLIB / "json" / "decoder.py").read_text()
    pieces = source.split("\ndef ") + source.split("\nclass ")
    return ["", "x", "def add(a, b):\n    return a + b", source, *pieces[:20]]


@pytest.fixture(scope="module")
def reference() -> DenseRetriever:
    return DenseRetriever.from_pretrained(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, reference) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return {
        "float32": export_onnx(reference, folder / "float32.onnx", quantize=False),
        "int8": export_onnx(reference, folder / "int8.onnx"),
    }


def test_float32_export_gives_our_embeddings(reference, exports):
    texts = code_texts()
    model = OnnxDenseRetriever.from_pretrained(onnx_file=exports["float32"], threads=1)
    ours, exported = reference.encode_documents(texts), model.encode_documents(texts)
    assert exported.shape == ours.shape == (len(texts), reference.dim)
    np.testing.assert_allclose(exported, ours, atol=2e-5, rtol=0)
    queries = ["decode a json document", "raw string scanner"]
    np.testing.assert_allclose(
        model.encode_queries(queries), reference.encode_queries(queries), atol=2e-5, rtol=0
    )


def test_exported_graph_computes_the_model_with_biases_too(reference):
    """The graph's split q / k / v and GeGLU products (the attention scale folded into q) give the
    model's padded forward, also for a model whose linear layers have biases."""
    model = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(0)
    for layer in model.encoder.layers:
        for linear in (layer.attn.Wqkv, layer.mlp.Wi):
            linear.bias = torch.nn.Parameter(0.1 * torch.randn(linear.out_features, generator=generator))
    input_ids, attention_mask = (
        torch.from_numpy(a)
        for a in pad_numpy(model.tokenize(code_texts()[2:9]), model.encoder.config.pad_token_id)
    )
    with torch.no_grad():
        expected = model(input_ids, attention_mask)
        graph = PaddedDenseGraph(model)(input_ids, attention_mask)
        unbiased = PaddedDenseGraph(reference)(input_ids, attention_mask)
    torch.testing.assert_close(graph, expected, atol=2e-5, rtol=0)
    assert (graph - unbiased).abs().max() > 1e-3  # the biases were used


def test_int8_export_keeps_the_directions(reference, exports):
    texts = code_texts()
    model = OnnxDenseRetriever.from_pretrained(onnx_file=exports["int8"], threads=1)
    cosines = (model.encode_documents(texts) * reference.encode_documents(texts)).sum(axis=1)
    assert cosines.min() > 0.98
    # the embedding table stays float32; the linear layers shrink to a quarter
    assert exports["int8"].stat().st_size < 0.65 * exports["float32"].stat().st_size


def test_chunking_and_matryoshka_go_through_the_same_code(reference, exports):
    model = OnnxDenseRetriever.from_pretrained(onnx_file=exports["float32"], threads=1)
    long_text = (STDLIB / "json" / "decoder.py").read_text()
    kwargs = {"chunking": {"size": 128, "stride": 96}, "dim": 64}
    np.testing.assert_allclose(
        model.encode_documents([long_text], **kwargs),
        reference.encode_documents([long_text], **kwargs),
        atol=2e-5,
        rtol=0,
    )


def test_runs_on_several_threads_give_what_one_thread_gives(exports):
    texts = code_texts() * 3  # more runs than threads, of every length
    one = OnnxDenseRetriever.from_pretrained(onnx_file=exports["int8"], threads=1)
    three = OnnxDenseRetriever.from_pretrained(onnx_file=exports["int8"], threads=3)
    expected = one.encode_documents(texts, show_progress_bar=False)
    assert three.workers == 3
    assert np.array_equal(three.encode_documents(texts, show_progress_bar=False), expected)


def test_runs_of_similar_lengths_cover_the_batch_in_order():
    lengths = np.array([256, 250, 240, 120, 118, 30, 29, 3])
    runs = similar_length_runs(lengths)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    for start, end in runs:
        real = lengths[start:end].sum()
        assert lengths[start] * (end - start) <= 1.25 * real or end - start == 1


def test_a_file_that_is_not_an_export_is_refused(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(OnnxBackendError, match="model.onnx"):
        OnnxDenseRetriever.from_pretrained(onnx_file=bad)
    with pytest.raises(OnnxBackendError, match="does not exist"):
        OnnxDenseRetriever.from_pretrained(onnx_file=tmp_path / "missing.onnx")


def test_an_export_of_other_weights_is_refused(tmp_path, reference, exports, caplog):
    import onnx

    changed = DenseRetriever.from_pretrained(device="cpu", dtype=torch.float32)
    with torch.no_grad():
        changed.encoder.layers[0].attn.Wo.weight[0, 0] += 0.5
    changed.save_pretrained(tmp_path / "retrained")
    with pytest.raises(OnnxBackendError, match="exported from other weights"):
        OnnxDenseRetriever.from_pretrained(tmp_path / "retrained", onnx_file=exports["int8"])

    unstamped = onnx.load(str(exports["int8"]))
    del unstamped.metadata_props[:]  # as an export of an earlier version
    onnx.save(unstamped, str(tmp_path / "old.onnx"))
    with caplog.at_level("WARNING", logger="mbert_retrieval"):
        OnnxDenseRetriever.from_pretrained(onnx_file=tmp_path / "old.onnx")
    assert "records no weights digest" in caplog.text


def test_backend_choice(tmp_path, monkeypatch, exports):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu_backend, "has_bf16_matrix_units", lambda: False)  # AMX would pick bf16
    folder = tmp_path / "model"
    shutil.copytree(default_model_dir(), folder)
    assert type(load_dense_encoder(folder, cpu_backend="torch")) is DenseRetriever
    assert type(load_dense_encoder(folder, cpu_backend="auto")) is DenseRetriever  # nothing exported
    (folder / ONNX_FILE).parent.mkdir()
    shutil.copy(exports["int8"], folder / ONNX_FILE)
    beside = load_dense_encoder(folder, cpu_backend="auto")
    assert isinstance(beside, OnnxDenseRetriever) and beside.onnx_file == folder / ONNX_FILE
    shutil.rmtree(folder / ONNX_FILE.parent)
    exported = load_dense_encoder(folder, cpu_backend="onnx")  # exports into the cache once
    assert exported.onnx_file == cache_file(folder) and cache_file(folder).is_file()
    assert isinstance(load_dense_encoder(folder, cpu_backend="auto"), OnnxDenseRetriever)
    monkeypatch.setattr(cpu_backend, "has_bf16_matrix_units", lambda: True)
    on_amx = load_dense_encoder(folder, cpu_backend="auto")  # faster than the export there
    assert type(on_amx) is DenseRetriever and next(on_amx.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cpu backend must be one of"):
        load_dense_encoder(folder, cpu_backend="gpu")


def test_export_command_and_index_code_on_the_onnx_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runner = CliRunner()
    out = tmp_path / "default.onnx"
    result = runner.invoke(app, ["export-onnx", "default", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "int8" in result.output
    refused = runner.invoke(app, ["export-onnx", "default", str(tmp_path)])
    assert refused.exit_code == 2 and refused.output.startswith("error:") and "folder" in refused.output

    assert "json/" in index_and_search_json(runner, app, tmp_path, "onnx")
