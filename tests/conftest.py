"""Shared fixtures: tiny ModernBERT checkpoints made by `transformers`, and a BPE tokenizer
trained on Python source files found on this machine."""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mbert_retrieval.tokenization import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(limit: int = 200) -> list[str]:
    files = sorted(p for p in STDLIB.glob("*.py"))[:limit]
    return [f.read_text(errors="ignore") for f in files]


def stdlib_definitions(modules: tuple[str, ...], kinds: tuple[type, ...] = (ast.FunctionDef,)) -> list[str]:
    """The source of every definition of `kinds` in these stdlib modules (nested ones too), in order:
    real code of every size."""
    texts = []
    for module in modules:
        source = (STDLIB / module).read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, kinds):
                texts.append("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    return texts


@pytest.fixture(autouse=True)
def fixed_seeds():
    """Every test starts from the same random state, whatever ran before it (or if it runs alone)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and tensors run fastest on one thread; several threads per call thrash on a busy
    machine. A module takes it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(stdlib_texts(), vocab_size=1000, save_directory=directory)
    return directory


def tiny_hf_config(vocab_size: int = 1000, **overrides):
    from transformers import ModernBertConfig as HFConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=1024,
        local_attention=16,
        global_attn_every_n_layers=3,
        global_rope_theta=160_000.0,
        local_rope_theta=10_000.0,
        pad_token_id=2,
        cls_token_id=0,
        sep_token_id=1,
        bos_token_id=0,
        eos_token_id=1,
    )
    values.update(overrides)
    return HFConfig(**values)


def make_hf_mlm(directory: Path, seed: int = 0, **overrides):
    """A random `transformers.ModernBertForMaskedLM`, saved to `directory`; returns the HF model."""
    from transformers import ModernBertForMaskedLM

    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(tiny_hf_config(**overrides)).eval()
    # Random, non-trivial norm weights so a mix-up of norms cannot pass unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
        model.decoder.bias.normal_(0, 0.1)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def hf_mlm_dir(tmp_path_factory, tokenizer_dir) -> Path:
    directory = tmp_path_factory.mktemp("hf_mlm")
    make_hf_mlm(directory)
    for file in tokenizer_dir.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


@pytest.fixture(scope="session")
def hf_encoder_dir(tmp_path_factory, hf_mlm_dir) -> Path:
    """The same weights saved as a bare `transformers.ModernBertModel`."""
    from transformers import ModernBertForMaskedLM

    directory = tmp_path_factory.mktemp("hf_encoder")
    ModernBertForMaskedLM.from_pretrained(hf_mlm_dir).model.save_pretrained(directory)
    return directory
