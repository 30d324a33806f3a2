"""Package attributes imported on first use, so that importing a package (and starting the command
line) does not load what its modules need (torch, faiss, FastAPI).

    __getattr__ = lazy_attributes(__name__, {"mbert_retrieval.code.index": ["CodeIndex", ...], ...})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any


def lazy_attributes(package: str, names_by_module: dict[str, Sequence[str]]) -> Callable[[str], Any]:
    """A module-level `__getattr__` giving each name listed in `names_by_module` from its module."""
    module_of = {name: module for module, names in names_by_module.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in module_of:
            return getattr(importlib.import_module(module_of[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
