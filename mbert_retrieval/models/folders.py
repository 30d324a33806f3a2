"""The folder formats of the ecosystem: sentence-transformers modules and PyLate settings.

A sentence-transformers folder lists its modules in `modules.json`; module 0 is a Transformer whose
folder (usually the root) is a plain `transformers` checkpoint, followed by Pooling, Dense and
Normalize modules in numbered sub-folders, with model-wide settings in
`config_sentence_transformers.json`. We write the long-standing layout (module types spelled
`sentence_transformers.models.X`, `sentence_bert_config.json` with `max_seq_length`), which every
sentence-transformers release since 2.x reads, and we read both it and the newer one.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbert_retrieval._version import __version__
from mbert_retrieval.files import atomic_write_bytes, atomic_write_text
from mbert_retrieval.modeling.io import (
    CheckpointError,
    find_weights,
    load_weights,
    read_json,
    read_state_dict,
    save_safetensors,
)

MODULES_FILE = "modules.json"
SETTINGS_FILE = "config_sentence_transformers.json"
TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"
IDENTITY = "torch.nn.modules.linear.Identity"

ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_DENSE = "sentence_transformers.models.Dense"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
PYLATE_DENSE = "pylate.models.Dense.Dense"


@dataclass
class Module:
    """One entry of modules.json: its class (last part of the type) and its folder."""

    kind: str
    type: str
    path: Path


def write_json(path: Path, value: Any) -> None:
    atomic_write_text(Path(path), json.dumps(value, indent=2) + "\n")


def has_modules(model_dir: Path) -> bool:
    return (model_dir / MODULES_FILE).exists()


def read_modules(model_dir: Path) -> list[Module]:
    path = model_dir / MODULES_FILE
    entries = read_json(path, expect=list)
    if not entries:
        raise CheckpointError(f"{path} lists no modules")
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("type"), str)
            and isinstance(entry.get("path", ""), str)
            and is_int(entry.get("idx", 0))
        ):
            raise CheckpointError(
                f"{path}: each module must be an object with a 'type' and a 'path' string and an "
                f"integer 'idx', not {json.dumps(entry)[:80]}"
            )
    modules = []
    for entry in sorted(entries, key=lambda e: e.get("idx", 0)):
        kind = entry["type"].rsplit(".", 1)[-1]
        modules.append(Module(kind, entry["type"], model_dir / entry.get("path", "")))
    if modules[0].kind != "Transformer":
        raise CheckpointError(
            f"{model_dir}: the first module is {modules[0].type}, expected a Transformer over ModernBERT"
        )
    return modules


def check_supported(model_dir: Path, modules: list[Module], allowed: set[str]) -> None:
    for module in modules:
        if module.kind not in allowed:
            raise CheckpointError(
                f"{model_dir}: module {module.type} is not supported here (supported: {', '.join(sorted(allowed))})"
            )


def read_settings(model_dir: Path) -> dict[str, Any]:
    path = model_dir / SETTINGS_FILE
    return read_json(path) if path.exists() else {}


def read_max_seq_length(transformer_dir: Path) -> int | None:
    """`max_seq_length` of the Transformer module, or None when the folder does not say."""
    path = transformer_dir / TRANSFORMER_CONFIG_FILE
    if path.exists():
        value = read_json(path).get("max_seq_length")
        if value is not None:
            if not is_int(value) or value <= 0:
                raise CheckpointError(f"{path}: max_seq_length must be a positive integer, not {value!r}")
            return value
    return None


def read_pooling(module_dir: Path) -> str:
    """'mean' or 'cls' from a Pooling module's config (new `pooling_mode` or the older flags)."""
    config = read_json(module_dir / "config.json")
    if config.get("include_prompt", True) is False:
        raise CheckpointError(f"{module_dir}: pooling that leaves out the prompt is not supported")
    mode = config.get("pooling_mode")
    if mode is None:
        flags = {
            "mean": config.get("pooling_mode_mean_tokens"),
            "cls": config.get("pooling_mode_cls_token"),
            "max": config.get("pooling_mode_max_tokens"),
            "mean_sqrt_len_tokens": config.get("pooling_mode_mean_sqrt_len_tokens"),
            "weightedmean": config.get("pooling_mode_weightedmean_tokens"),
            "lasttoken": config.get("pooling_mode_lasttoken"),
        }
        chosen = [name for name, on in flags.items() if on]
        mode = chosen[0] if len(chosen) == 1 else "+".join(chosen) or "none"
    if isinstance(mode, list):
        mode = "+".join(mode)
    if mode not in ("mean", "cls"):
        raise CheckpointError(f"{module_dir}: pooling mode {mode!r} is not supported (use 'mean' or 'cls')")
    return mode


def read_dense(module_dir: Path) -> nn.Linear:
    """A Dense module as an nn.Linear; only the identity activation is supported."""
    config = read_json(module_dir / "config.json")
    activation = config.get("activation_function", IDENTITY)
    if activation != IDENTITY:
        raise CheckpointError(
            f"{module_dir}: Dense activation {activation!r} is not supported (only Identity)"
        )
    if config.get("use_residual"):
        raise CheckpointError(f"{module_dir}: Dense with use_residual=true is not supported")
    sizes = [config.get(key) for key in ("in_features", "out_features")]
    if not all(is_int(size) and size > 0 for size in sizes) or not isinstance(config.get("bias", True), bool):
        raise CheckpointError(
            f"{module_dir / 'config.json'}: a Dense module needs positive integers in_features and "
            f"out_features and a true/false bias, found {sizes} and {config.get('bias')!r}"
        )
    linear = nn.Linear(*sizes, bias=config.get("bias", True))
    state = read_state_dict(module_dir)
    expected = {"linear.weight", "linear.bias"} if linear.bias is not None else {"linear.weight"}
    if set(state) != expected:
        raise CheckpointError(f"{module_dir}: expected tensors {sorted(expected)}, found {sorted(state)}")
    load_weights(linear, {k.removeprefix("linear."): v for k, v in state.items()}, find_weights(module_dir))
    return linear


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_modules(model_dir: Path, modules: list[tuple[str, str]]) -> None:
    """modules.json from (folder, type) pairs; the first is the Transformer at the root."""
    entries = [
        {"idx": i, "name": str(i), "path": path, "type": type_} for i, (path, type_) in enumerate(modules)
    ]
    write_json(model_dir / MODULES_FILE, entries)


def write_transformer_config(model_dir: Path, max_seq_length: int) -> None:
    write_json(
        model_dir / TRANSFORMER_CONFIG_FILE, {"max_seq_length": max_seq_length, "do_lower_case": False}
    )


def write_pooling(module_dir: Path, mode: str, dim: int) -> None:
    write_json(
        module_dir / "config.json",
        {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": mode == "cls",
            "pooling_mode_mean_tokens": mode == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )


def write_dense(module_dir: Path, linear: nn.Linear, extra: dict[str, Any] | None = None) -> None:
    config = {
        "in_features": linear.in_features,
        "out_features": linear.out_features,
        "bias": linear.bias is not None,
        "activation_function": IDENTITY,
        **(extra or {}),
    }
    write_json(module_dir / "config.json", config)
    tensors = {"linear.weight": linear.weight}
    if linear.bias is not None:
        tensors["linear.bias"] = linear.bias
    save_safetensors(module_dir / "model.safetensors", {k: v.float() for k, v in tensors.items()})


def write_normalize(module_dir: Path) -> None:
    module_dir.mkdir(parents=True, exist_ok=True)


def save_tokenizer(tokenizer, model_dir: Path, max_length: int) -> None:
    """The tokenizer's files, written atomically one by one, with `model_max_length` set to the
    length the model was saved to use (what loaders without a sentence_bert_config.json read)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        config_path = Path(tmp) / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text())
            config["model_max_length"] = max_length
            config_path.write_text(json.dumps(config, indent=2) + "\n")
        for file in sorted(Path(tmp).iterdir()):
            if file.is_file():
                atomic_write_bytes(model_dir / file.name, file.read_bytes())


def versions() -> dict[str, str]:
    import transformers

    return {
        "mbert_retrieval": __version__,
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
    }
