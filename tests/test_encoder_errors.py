"""Bad checkpoints and bad input get errors that name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mbert_retrieval import CheckpointError, ConfigError, ModernBert, ModernBertForMaskedLM


def copy_checkpoint(source, target, edit_config=None, edit_tensors=None):
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (target / "config.json").write_text(json.dumps(config))
    tensors = load_file(source / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, target / "model.safetensors")
    return target


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ModernBert.from_pretrained(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ModernBert.from_pretrained(tmp_path)


def test_hub_id_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="hub can't be reached.*local folder"):
        ModernBert.from_pretrained("answerdotai/ModernBERT-base")


def test_other_model_type(tmp_path, hf_encoder_dir):
    folder = copy_checkpoint(hf_encoder_dir, tmp_path / "bert", lambda c: c.update(model_type="bert"))
    with pytest.raises(ConfigError, match="model_type='bert'"):
        ModernBert.from_pretrained(folder)


def test_missing_tensor_is_named(tmp_path, hf_encoder_dir):
    folder = copy_checkpoint(
        hf_encoder_dir, tmp_path / "m", edit_tensors=lambda t: t.pop("layers.2.mlp.Wi.weight")
    )
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.Wi\.weight"):
        ModernBert.from_pretrained(folder)


def test_wrong_shape_is_named(tmp_path, hf_encoder_dir):
    def shrink(tensors):
        tensors["layers.1.attn.Wo.weight"] = tensors["layers.1.attn.Wo.weight"][:, :10].contiguous()

    folder = copy_checkpoint(hf_encoder_dir, tmp_path / "m", edit_tensors=shrink)
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.Wo\.weight has shape \(64, 10\)"):
        ModernBert.from_pretrained(folder)


def test_missing_weights_file(tmp_path, hf_encoder_dir):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((hf_encoder_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds no weights"):
        ModernBert.from_pretrained(folder)


def test_mlm_from_bare_encoder_names_the_head(hf_encoder_dir):
    with pytest.raises(CheckpointError, match="head.dense.weight"):
        ModernBertForMaskedLM.from_pretrained(hf_encoder_dir)


def test_bad_inputs(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir)
    with pytest.raises(ValueError, match="max_position_embeddings=1024"):
        model(torch.full((1, 1025), 5))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros((0, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="token id 1000 is outside the vocabulary"):
        model(torch.tensor([[5, 1000]]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        model(torch.tensor([[5, -1]]))
    with pytest.raises(ValueError, match="attention_mask is all zeros"):
        model(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 0]]))


def test_backend_names(hf_encoder_dir):
    with pytest.raises(
        ValueError, match="choose one of auto, triton, varlen, flash_attn, packed_sdpa, reference"
    ):
        ModernBert.from_pretrained(hf_encoder_dir, attn_backend="xformers")
    model = ModernBert.from_pretrained(hf_encoder_dir, attn_backend="varlen")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        model(torch.tensor([[5, 6]]))


def test_bad_packed_inputs(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir)
    ids = torch.tensor([5, 6, 7, 8, 9])
    with pytest.raises(ValueError, match="cu_seqlens ends at 4 but there are 5 tokens"):
        model.forward_packed(ids, torch.tensor([0, 2, 4], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="max_seqlen=2 but a sequence has 3 tokens"):
        model.forward_packed(ids, torch.tensor([0, 2, 5], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="start at 0 and never decrease"):
        model.forward_packed(ids, torch.tensor([0, 4, 3, 5], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="start at 0"):
        model.forward_packed(ids, torch.tensor([1, 5], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="int32"):
        model.forward_packed(ids, torch.tensor([0, 5]), 5)
    assert model.forward_packed(ids, torch.tensor([0, 2, 5], dtype=torch.int32), 3).shape == (5, 64)
