"""Training checkpoints that resume exactly where a run stopped.

A checkpoint is a folder `step-00001000/` holding the model and optimizer state (`state.pt`), the
trainer's state (step, data position; also as readable `trainer_state.json`) and, per rank, the
random number generator states (`rng-rank0.pt`, ...). Rank 0 writes it all, so the machines of a
multi-node run need not share a disk. It is written under a temporary name and renamed when
complete, so a crash never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mbert_retrieval.files import atomic_write_bytes, atomic_write_text
from mbert_retrieval.modeling.io import CheckpointError
from mbert_retrieval.training.distributed import World, barrier, gather_object

PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer, trainer_state: dict, world: World, keep: int
) -> Path:
    """Write checkpoint `root/step-<step>` (every rank calls this) and keep the newest `keep`."""
    root = Path(root)
    final = root / checkpoint_name(step)
    partial = root / f".{checkpoint_name(step)}.partial"
    rng_states = gather_object(rng_state())  # rank 0 writes them all: machines need not share a disk
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for rank, rng in enumerate(rng_states):
            atomic_write_bytes(partial / f"rng-rank{rank}.pt", _torch_bytes(rng))
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "trainer": trainer_state}
        atomic_write_bytes(partial / "state.pt", _torch_bytes(state))
        atomic_write_text(partial / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.pt").exists()]


def resolve_checkpoint(path: str | Path, root: Path) -> Path:
    """`path` itself, or for "latest" the newest checkpoint under `root`."""
    if str(path) == "latest":
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(f"no checkpoint to resume from under {root}")
        return found[-1]
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (state.pt is missing)")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, world: World) -> dict:
    """Restore model, optimizer and this rank's RNG states; returns the trainer state."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several error types for damaged files
        raise CheckpointError(f"{path / 'state.pt'} cannot be read: {err}") from err
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng_file = path / f"rng-rank{world.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state["trainer"]
