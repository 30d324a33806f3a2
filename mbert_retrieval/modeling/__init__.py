"""The native, unpadded ModernBERT encoder."""

from mbert_retrieval.modeling.attention import BACKENDS
from mbert_retrieval.modeling.config import ConfigError, ModernBertConfig
from mbert_retrieval.modeling.encoder import ModernBert, ModernBertForMaskedLM, positions_from_cu_seqlens
from mbert_retrieval.modeling.io import CheckpointError

__all__ = [
    "BACKENDS",
    "CheckpointError",
    "ConfigError",
    "ModernBert",
    "ModernBertConfig",
    "ModernBertForMaskedLM",
    "positions_from_cu_seqlens",
]
