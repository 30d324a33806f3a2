"""Damaged model folders: every kind of damage is a CheckpointError or ConfigError, in one line naming
the damaged file and the problem; never a raw KeyError, TypeError, ZeroDivisionError, AssertionError or
UnicodeDecodeError, and never a model that loads and then computes NaN."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mbert_retrieval import CheckpointError, ConfigError, ModernBert
from mbert_retrieval.models.colbert import ColBERT
from mbert_retrieval.models.cross_encoder import CrossEncoder
from mbert_retrieval.models.dense import DenseRetriever


@pytest.fixture(scope="module")
def saved_model(hf_mlm_dir, tmp_path_factory) -> Path:
    """A tiny sentence-transformers folder: ModernBERT + tokenizer at the root, 1_Pooling, 2_Dense, 3_Normalize."""
    folder = tmp_path_factory.mktemp("dense") / "model"
    torch.manual_seed(0)
    DenseRetriever.from_pretrained(
        hf_mlm_dir, projection_dim=16, max_length=64, device="cpu"
    ).save_pretrained(folder)
    return folder


# -- the damage ----------------------------------------------------------------------------------------


def edit_json(name: str, edit: Callable[[dict], object]):
    def damage(folder: Path) -> None:
        value = json.loads((folder / name).read_text())
        replacement = edit(value)
        (folder / name).write_text(json.dumps(value if replacement is None else replacement))

    return damage


def set_config(**changes):
    return edit_json("config.json", lambda c: c.update(changes))


def original_rope_spelling(**changes):
    """Only the original spelling (no rope_parameters), with `changes`."""

    def edit(config):
        config.pop("rope_parameters", None)
        config.update(changes)

    return edit_json("config.json", edit)


def new_rope_spelling(layer_type: str, theta):
    """Only transformers 5's spelling (rope_parameters), with one theta changed."""

    def edit(config):
        config.pop("global_rope_theta", None)
        config.pop("local_rope_theta", None)
        config["rope_parameters"][layer_type]["rope_theta"] = theta

    return edit_json("config.json", edit)


def without_layer_types(**changes):
    def edit(config):
        config.pop("layer_types", None)
        config.update(changes)

    return edit_json("config.json", edit)


def write_bytes(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def truncate(name: str, keep: float = 0.5):
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def remove(name: str):
    return lambda folder: (folder / name).unlink()


def replace_with_folder(name: str):
    def damage(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()

    return damage


def pytorch_bin(data: bytes | None):
    """The weights as pytorch_model.bin instead: `data`, or (None) a pickled list."""

    def damage(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        if data is None:
            torch.save([torch.zeros(2)], folder / "pytorch_model.bin")
        else:
            (folder / "pytorch_model.bin").write_bytes(data)

    return damage


def edit_tensors(name: str, edit: Callable[[dict], None]):
    def damage(folder: Path) -> None:
        tensors = load_file(folder / name)
        edit(tensors)
        save_file(tensors, folder / name)

    return damage


def set_tensor(key: str, make: Callable[[torch.Tensor], torch.Tensor]):
    return lambda tensors: tensors.update({key: make(tensors[key]).contiguous()})


def without(key: str):
    def edit(mapping) -> None:
        del mapping[key]

    return edit


def nan_in(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[3] = float("nan")
    return tensor


GARBAGE = bytes(range(256)) * 8
NOT_UTF8 = b'{"model_type": "modernbert", "note": "\xff\xfe\xfa"}'


@dataclass
class Damage:
    name: str
    file: str  # the file (or, if empty, the folder) the message must name
    problem: str  # words the message must contain
    damage: Callable[[Path], None]


DAMAGES = [
    # config.json: sizes, types and values no model can be built or run with
    Damage(
        "heads-zero",
        "config.json",
        "num_attention_heads must be a positive integer",
        set_config(num_attention_heads=0),
    ),
    Damage(
        "heads-not-dividing",
        "config.json",
        "not a multiple of num_attention_heads",
        set_config(num_attention_heads=5),
    ),
    Damage("odd-head-size", "config.json", "must be even", set_config(hidden_size=60, num_attention_heads=4)),
    Damage("config-a-list", "config.json", "JSON object", edit_json("config.json", lambda c: [c])),
    Damage("config-a-number", "config.json", "JSON object", write_bytes("config.json", b"42")),
    Damage(
        "global-theta-negative",
        "config.json",
        "global_rope_theta must be a positive number",
        original_rope_spelling(global_rope_theta=-160000.0),
    ),
    Damage(
        "local-theta-zero",
        "config.json",
        "local_rope_theta must be a positive number",
        original_rope_spelling(local_rope_theta=0),
    ),
    Damage(
        "global-theta-nan",
        "config.json",
        "global_rope_theta must be a positive number",
        original_rope_spelling(global_rope_theta=float("nan")),
    ),
    Damage(
        "local-theta-infinite",
        "config.json",
        "local_rope_theta must be a positive number",
        original_rope_spelling(local_rope_theta=float("inf")),
    ),
    Damage(
        "theta-a-string",
        "config.json",
        "global_rope_theta must be a positive number",
        original_rope_spelling(global_rope_theta="160000"),
    ),
    Damage(
        "rope-parameters-global-negative",
        "config.json",
        "global_rope_theta must be a positive number",
        new_rope_spelling("full_attention", -1.0),
    ),
    Damage(
        "rope-parameters-local-nan",
        "config.json",
        "local_rope_theta must be a positive number",
        new_rope_spelling("sliding_attention", float("nan")),
    ),
    Damage(
        "rope-parameters-local-zero",
        "config.json",
        "local_rope_theta must be a positive number",
        new_rope_spelling("sliding_attention", 0.0),
    ),
    Damage(
        "rope-parameters-a-list",
        "config.json",
        "rope_parameters must be an object",
        set_config(rope_parameters=[1, 2]),
    ),
    Damage(
        "rope-parameters-entry-a-number",
        "config.json",
        "must be an object",
        set_config(rope_parameters={"full_attention": 5}),
    ),
    Damage(
        "rope-scaling-a-string",
        "config.json",
        "rope_scaling must be an object",
        set_config(rope_scaling="linear"),
    ),
    Damage(
        "local-attention-zero",
        "config.json",
        "local_attention must be a positive integer",
        set_config(local_attention=0),
    ),
    Damage(
        "local-attention-odd", "config.json", "local_attention must be even", set_config(local_attention=15)
    ),
    Damage(
        "local-attention-negative",
        "config.json",
        "local_attention must be a positive integer",
        set_config(local_attention=-16),
    ),
    Damage(
        "hidden-negative",
        "config.json",
        "hidden_size must be a positive integer",
        set_config(hidden_size=-64),
    ),
    Damage("vocab-zero", "config.json", "vocab_size must be a positive integer", set_config(vocab_size=0)),
    Damage(
        "intermediate-negative",
        "config.json",
        "intermediate_size must be a positive integer",
        set_config(intermediate_size=-96),
    ),
    Damage(
        "positions-zero",
        "config.json",
        "max_position_embeddings must be a positive integer",
        set_config(max_position_embeddings=0),
    ),
    Damage(
        "layers-a-string",
        "config.json",
        "num_hidden_layers must be a positive integer",
        set_config(num_hidden_layers="4"),
    ),
    Damage(
        "layers-a-float",
        "config.json",
        "num_hidden_layers must be a positive integer",
        set_config(num_hidden_layers=4.5),
    ),
    Damage(
        "layers-true",
        "config.json",
        "num_hidden_layers must be a positive integer",
        set_config(num_hidden_layers=True),
    ),
    Damage(
        "layers-null",
        "config.json",
        "num_hidden_layers must be a positive integer",
        set_config(num_hidden_layers=None),
    ),
    Damage("layer-types-a-string", "config.json", "layer_types", set_config(layer_types="full_attention")),
    Damage(
        "layer-types-too-short",
        "config.json",
        "layer_types has 1 entries",
        set_config(layer_types=["full_attention"]),
    ),
    Damage(
        "layer-types-unknown",
        "config.json",
        "layer_types may hold only",
        set_config(layer_types=["full_attention", 3, "x", None]),
    ),
    Damage(
        "global-every-zero",
        "config.json",
        "global_attn_every_n_layers must be a positive integer",
        without_layer_types(global_attn_every_n_layers=0),
    ),
    Damage("norm-eps-a-string", "config.json", "norm_eps", set_config(norm_eps="small")),
    Damage("norm-eps-negative", "config.json", "norm_eps", set_config(norm_eps=-1e-5)),
    Damage(
        "bias-a-string",
        "config.json",
        "attention_bias must be true or false",
        set_config(attention_bias="no"),
    ),
    Damage(
        "pad-outside-vocab",
        "config.json",
        "pad_token_id (5000) is outside the vocabulary",
        set_config(pad_token_id=5000),
    ),
    Damage("pad-negative", "config.json", "pad_token_id must be a token id", set_config(pad_token_id=-1)),
    Damage(
        "cls-a-string", "config.json", "cls_token_id must be a token id", set_config(cls_token_id="[CLS]")
    ),
    Damage(
        "activation-a-number",
        "config.json",
        "hidden_activation=5 is not supported",
        set_config(hidden_activation=5),
    ),
    Damage("config-invalid-json", "config.json", "not valid JSON", truncate("config.json")),
    Damage("config-not-utf8", "config.json", "not UTF-8", write_bytes("config.json", NOT_UTF8)),
    Damage("config-empty", "config.json", "not valid JSON", write_bytes("config.json", b"")),
    Damage("config-missing", "config.json", "is missing", remove("config.json")),
    Damage("config-a-folder", "config.json", "cannot be read", replace_with_folder("config.json")),
    # the tokenizer
    Damage("tokenizer-garbage", "tokenizer.json", "not UTF-8", write_bytes("tokenizer.json", GARBAGE)),
    Damage("tokenizer-truncated", "tokenizer.json", "not valid JSON", truncate("tokenizer.json")),
    Damage("tokenizer-a-list", "tokenizer.json", "must hold an object", write_bytes("tokenizer.json", b"[]")),
    Damage(
        "tokenizer-no-added-tokens",
        "tokenizer.json",
        "cannot be loaded",
        edit_json("tokenizer.json", without("added_tokens")),
    ),
    Damage(
        "tokenizer-no-model",
        "tokenizer.json",
        "cannot be loaded",
        edit_json("tokenizer.json", without("model")),
    ),
    Damage(
        "tokenizer-empty-object", "tokenizer.json", "cannot be loaded", write_bytes("tokenizer.json", b"{}")
    ),
    Damage(
        "tokenizer-config-garbage",
        "tokenizer_config.json",
        "not UTF-8",
        write_bytes("tokenizer_config.json", GARBAGE),
    ),
    Damage(
        "tokenizer-config-a-list",
        "tokenizer_config.json",
        "must hold an object",
        write_bytes("tokenizer_config.json", b"[1]"),
    ),
    Damage(
        "tokenizer-missing",
        "",
        "has no tokenizer",
        lambda f: [remove(n)(f) for n in ("tokenizer.json", "tokenizer_config.json")],
    ),
    # the weights
    Damage(
        "weights-truncated",
        "model.safetensors",
        "not a readable safetensors file",
        truncate("model.safetensors"),
    ),
    Damage(
        "weights-garbage",
        "model.safetensors",
        "not a readable safetensors file",
        write_bytes("model.safetensors", GARBAGE),
    ),
    Damage(
        "weights-empty",
        "model.safetensors",
        "not a readable safetensors file",
        write_bytes("model.safetensors", b""),
    ),
    Damage("weights-missing", "", "holds no weights", remove("model.safetensors")),
    Damage(
        "weights-a-folder",
        "model.safetensors",
        "not a readable safetensors file",
        replace_with_folder("model.safetensors"),
    ),
    Damage(
        "bin-weights-garbage",
        "pytorch_model.bin",
        "not a readable PyTorch weights file",
        pytorch_bin(GARBAGE),
    ),
    Damage(
        "bin-weights-a-list", "pytorch_model.bin", "holds a list, not a dict of tensors", pytorch_bin(None)
    ),
    Damage(
        "tensor-missing",
        "model.safetensors",
        r"missing tensor(s) layers.1.mlp.Wo.weight",
        edit_tensors("model.safetensors", without("layers.1.mlp.Wo.weight")),
    ),
    Damage(
        "tensor-wrong-shape",
        "model.safetensors",
        "has shape (64, 10)",
        edit_tensors("model.safetensors", set_tensor("layers.0.attn.Wo.weight", lambda t: t[:, :10])),
    ),
    Damage(
        "tensor-nan",
        "model.safetensors",
        "NaN or infinite",
        edit_tensors("model.safetensors", set_tensor("layers.2.attn.Wqkv.weight", nan_in)),
    ),
    Damage(
        "dense-weights-truncated",
        "2_Dense/model.safetensors",
        "not a readable safetensors file",
        truncate("2_Dense/model.safetensors"),
    ),
    Damage(
        "dense-wrong-shape",
        "2_Dense/model.safetensors",
        "has shape (16, 8)",
        edit_tensors("2_Dense/model.safetensors", set_tensor("linear.weight", lambda t: t[:, :8])),
    ),
    Damage(
        "dense-missing-bias",
        "2_Dense",
        "expected tensors",
        edit_tensors("2_Dense/model.safetensors", without("linear.bias")),
    ),
    Damage(
        "dense-nan",
        "2_Dense/model.safetensors",
        "NaN or infinite",
        edit_tensors("2_Dense/model.safetensors", set_tensor("linear.bias", nan_in)),
    ),
    # the sentence-transformers files
    Damage("modules-invalid-json", "modules.json", "not valid JSON", truncate("modules.json")),
    Damage(
        "modules-an-object", "modules.json", "must hold a list", write_bytes("modules.json", b'{"idx": 0}')
    ),
    Damage(
        "modules-strings",
        "modules.json",
        "each module must be an object",
        write_bytes("modules.json", b'["Transformer", "Pooling"]'),
    ),
    Damage(
        "modules-without-type",
        "modules.json",
        "each module must be an object",
        edit_json("modules.json", lambda m: without("type")(m[0])),
    ),
    Damage("modules-empty", "modules.json", "lists no modules", write_bytes("modules.json", b"[]")),
    Damage("pooling-config-missing", "1_Pooling/config.json", "is missing", remove("1_Pooling/config.json")),
    Damage(
        "pooling-config-a-list",
        "1_Pooling/config.json",
        "must hold an object",
        write_bytes("1_Pooling/config.json", b"[]"),
    ),
    Damage(
        "dense-config-sizes-strings",
        "2_Dense/config.json",
        "positive integers in_features",
        edit_json("2_Dense/config.json", lambda c: c.update(in_features="64")),
    ),
    Damage(
        "dense-config-not-utf8",
        "2_Dense/config.json",
        "not UTF-8",
        write_bytes("2_Dense/config.json", NOT_UTF8),
    ),
    Damage(
        "max-seq-length-negative",
        "sentence_bert_config.json",
        "max_seq_length must be a positive integer",
        edit_json("sentence_bert_config.json", lambda c: c.update(max_seq_length=-5)),
    ),
    Damage(
        "max-seq-length-a-string",
        "sentence_bert_config.json",
        "max_seq_length must be a positive integer",
        edit_json("sentence_bert_config.json", lambda c: c.update(max_seq_length="long")),
    ),
    Damage(
        "settings-not-utf8",
        "config_sentence_transformers.json",
        "not UTF-8",
        write_bytes("config_sentence_transformers.json", NOT_UTF8),
    ),
    Damage(
        "prompts-a-list",
        "config_sentence_transformers.json",
        "'prompts' must map names to strings",
        edit_json("config_sentence_transformers.json", lambda c: c.update(prompts=["q"])),
    ),
]


@pytest.mark.parametrize("case", DAMAGES, ids=[d.name for d in DAMAGES])
def test_damaged_folder_gives_a_clear_error(case: Damage, saved_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    case.damage(folder)
    with pytest.raises((CheckpointError, ConfigError)) as caught:
        DenseRetriever.from_pretrained(folder, device="cpu")
    message = str(caught.value)
    assert str(folder / case.file) in message, message
    assert case.problem in message, message
    assert "\n" not in message, message


ROOT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ROOT_DAMAGES = [d for d in DAMAGES if d.file in ROOT_FILES]


@pytest.mark.parametrize("case", ROOT_DAMAGES, ids=[d.name for d in ROOT_DAMAGES])
def test_other_loaders_give_the_same_errors(case: Damage, saved_model, tmp_path):
    """The encoder alone, a cross-encoder and a ColBERT built on the same folder raise the same clear errors
    for the files they read."""
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    case.damage(folder)
    loaders = [
        lambda: CrossEncoder.from_pretrained(folder, device="cpu"),
        lambda: ColBERT.from_pretrained(folder, device="cpu"),
    ]
    if case.file in ("config.json", "model.safetensors"):
        loaders.append(lambda: ModernBert.from_pretrained(folder))
    for load in loaders:
        with pytest.raises((CheckpointError, ConfigError)) as caught:
            load()
        assert str(folder / case.file) in str(caught.value), str(caught.value)


def test_the_undamaged_folder_loads_and_encodes(saved_model):
    """The damage above is what breaks each load: the folder itself is sound."""
    model = DenseRetriever.from_pretrained(saved_model, device="cpu")
    vectors = model.encode_documents(["def f(x):\n    return x + 1", "a"])
    assert vectors.shape == (2, 16) and torch.isfinite(torch.from_numpy(vectors)).all()


def test_a_null_local_theta_means_the_global_one(saved_model, tmp_path):
    """Not damage: transformers reads `local_rope_theta: null` as "the global theta"."""
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    original_rope_spelling(local_rope_theta=None, global_rope_theta=80_000.0)(folder)
    config = ModernBert.from_pretrained(folder).config
    assert config.local_rope_theta == config.global_rope_theta == 80_000.0
