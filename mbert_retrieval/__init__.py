"""mbert-retrieval: dense, multi-vector and cross-encoder retrieval on a native, unpadded ModernBERT."""

from mbert_retrieval.modeling import (
    CheckpointError,
    ConfigError,
    ModernBert,
    ModernBertConfig,
    ModernBertForMaskedLM,
)
from mbert_retrieval.tokenization import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModernBert",
    "ModernBertConfig",
    "ModernBertForMaskedLM",
    "load_tokenizer",
]
