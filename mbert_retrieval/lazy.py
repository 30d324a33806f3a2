"""Names a package hands on but imports on first use, so importing the package stays quick and
optional dependencies (faiss, fastapi, bm25s, tree-sitter) are needed only by what uses them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, modules: dict[str, list[str]]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `{module: names}`, each name imported from
    `package.module` when first asked for."""
    home = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home[name]), name)

    return __getattr__
