"""The definitions a parser finds in a source file, as line spans: what the Python parser
(`chunking.py`) and the tree-sitter one (`treesitter.py`) both hand to the chunker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A definition found by a parser, before it is turned into text: 0-based inclusive lines."""

    start: int
    end: int
    symbol: str | None
    kind: str
