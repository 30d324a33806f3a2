"""mbert-retrieval: dense, multi-vector and cross-encoder retrieval on a native, unpadded ModernBERT.

Every public name is imported on first use (torch, transformers, faiss and fastapi load only when
something needs them), so `import mbert_retrieval` and `mbert-retrieval --help` start in well under
a second.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mbert_retrieval._version import __version__ as __version__
from mbert_retrieval.lazy import lazy_attributes

# imported on first use, so that `import mbert_retrieval` and the CLI's --help load no torch
__getattr__ = lazy_attributes(
    __name__,
    {
        "modeling.io": ["CheckpointError"],
        "modeling.config": ["ConfigError", "ModernBertConfig"],
        "modeling.encoder": ["ModernBert", "ModernBertForMaskedLM"],
        "tokenization": ["load_tokenizer"],
        "models.dense": ["DenseRetriever"],
        "models.colbert": ["ColBERT"],
        "models.cross_encoder": ["CrossEncoder"],
        "index.faiss_index": ["FaissIndex"],
        "index.plaid": ["PlaidIndex"],
        "search.retriever": ["Retriever"],
    },
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModernBert",
    "ModernBertConfig",
    "ModernBertForMaskedLM",
    "load_tokenizer",
    "DenseRetriever",
    "ColBERT",
    "CrossEncoder",
    "FaissIndex",
    "PlaidIndex",
    "Retriever",
]

if TYPE_CHECKING:  # pragma: no cover
    from mbert_retrieval.index.faiss_index import FaissIndex
    from mbert_retrieval.index.plaid import PlaidIndex
    from mbert_retrieval.modeling.config import ConfigError, ModernBertConfig
    from mbert_retrieval.modeling.encoder import ModernBert, ModernBertForMaskedLM
    from mbert_retrieval.modeling.io import CheckpointError
    from mbert_retrieval.models.colbert import ColBERT
    from mbert_retrieval.models.cross_encoder import CrossEncoder
    from mbert_retrieval.models.dense import DenseRetriever
    from mbert_retrieval.search.retriever import Retriever
    from mbert_retrieval.tokenization import load_tokenizer


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CheckoutHarnesses(importlib.abc.MetaPathFinder):
    """Imports the repository's top-level `evaluation/` folder as `mbert_retrieval.evaluation`, the name
    the wheel installs it under (setup.py), when running from a source checkout."""

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "mbert_retrieval.evaluation":
            return None
        init = self.folder / "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(self.folder)]
        )


_HERE = Path(__file__).resolve().parent
if not (_HERE / "evaluation").is_dir() and (_HERE.parent / "evaluation" / "__init__.py").is_file():
    sys.meta_path.append(_CheckoutHarnesses(_HERE.parent / "evaluation"))
