"""Checkpoint folders: resolving a local folder or hub id, reading and writing weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mbert_retrieval import files

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or does not match the model."""


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as it is; anything else is a hub id, downloaded through huggingface_hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local or path.exists():
        raise CheckpointError(f"model folder {name!r} does not exist (or is not a folder)")
    return _download(name)


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub is a core dependency
        raise CheckpointError("huggingface_hub is needed to download models by hub id") from err
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "1_*/*", "2_*/*", "3_*/*", "*.md"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"{hub_id!r} is neither a local folder nor a model on the hub") from err
    except (LocalEntryNotFoundError, OSError) as err:
        raise CheckpointError(
            f"could not fetch {hub_id!r}: the Hugging Face hub can't be reached and no cached copy "
            f"exists. Download the model where the hub is reachable and pass its local folder "
            f"instead, e.g. from_pretrained('/path/to/{hub_id.split('/')[-1]}')."
        ) from err


def read_json(path: Path, expect: type = dict) -> Any:
    """The JSON value in `path`, which must be of type `expect`; CheckpointError naming the file if not."""
    return files.read_json(path, CheckpointError, expect)


def find_weights(model_dir: Path) -> Path:
    """The weights file of a checkpoint folder (safetensors preferred)."""
    for name in WEIGHT_FILES:
        if (model_dir / name).exists():
            return model_dir / name
    raise CheckpointError(f"{model_dir} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    file = find_weights(model_dir)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{file} is not a readable PyTorch weights file: {reason}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of tensors")
    return state


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into `module`, naming every missing, unexpected or wrong-shaped tensor."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}")
    for name, tensor in expected.items():
        if not isinstance(state[name], torch.Tensor):
            raise CheckpointError(f"{source}: {name} is a {type(state[name]).__name__}, not a tensor")
        if state[name].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                f"expected {tuple(tensor.shape)} from config.json"
            )
        if state[name].is_floating_point() and not torch.isfinite(state[name]).all():
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values")
    module.load_state_dict({k: state[k] for k in expected}, strict=True)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    files.atomic_write(
        Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
    )
