"""Fusing rankings: reciprocal rank fusion (Cormack et al., 2009), score(d) = sum over rankings of
w / (k + rank(d)); and convex fusion of min-max normalised scores (Bruch et al., 2023), whose
fused score is itself a readable number in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The dense ranking's share in hybrid search, chosen on cosqa-dev and held-out sets of five languages
# (benchmarks/results/default_model_eval.json): the hybrid never scores below the better of the two.
DEFAULT_DENSE_WEIGHT = 0.7
MODES = ("hybrid", "dense", "bm25")


@dataclass(frozen=True)
class FusionSettings:
    """How a hybrid search ranks: both rankings fused ("hybrid"), or one of them alone."""

    mode: str = "hybrid"  # "hybrid" | "dense" | "bm25"
    dense_weight: float = DEFAULT_DENSE_WEIGHT  # hybrid score: w * dense + (1 - w) * BM25, normalised
    depth: int = 100  # candidates taken from each ranking before fusing

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"fusion mode must be one of {MODES}, got {self.mode!r}")
        if self.depth <= 0:
            raise ValueError("fusion depth must be positive")
        if not 0 <= self.dense_weight <= 1:
            raise ValueError(f"fusion dense_weight must be between 0 and 1, got {self.dense_weight}")


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[str]], k: int = 60, weights: Sequence[float] | None = None
) -> list[tuple[str, float]]:
    """Fuse ranked id lists (best first) into one [(id, fused score)] list, best first.

    Ranks start at 1; a document missing from a ranking gets nothing from it. Ties keep the order in
    which documents were first seen.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    fused: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, doc_id in enumerate(ranking, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda item: item[1], reverse=True)


def convex_fusion(
    rankings: Sequence[Sequence[tuple[str, float]]], weights: Sequence[float]
) -> list[tuple[str, float]]:
    """Fuse (id, score) lists by a weighted mean of min-max normalised scores, best first.

    Each list's scores are mapped onto [0, 1] (its best 1, its worst 0; all 1 when they are equal),
    so a fused score reads the same way whatever the rankings' scales: 1.0 is first in every
    ranking. A document missing from a list gets 0 from it; an empty list takes no part.
    """
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    if any(w < 0 for w in weights):
        raise ValueError(f"fusion weights must not be negative, got {list(weights)}")
    used = [(ranking, w) for ranking, w in zip(rankings, weights) if ranking and w > 0]
    total = sum(w for _, w in used)
    fused: dict[str, float] = {}
    for ranking, weight in used:
        scores = [s for _, s in ranking]
        low, span = min(scores), max(scores) - min(scores)
        for doc_id, score in ranking:
            normalised = (score - low) / span if span > 0 else 1.0
            fused[doc_id] = fused.get(doc_id, 0.0) + weight * normalised / total
    return sorted(fused.items(), key=lambda item: item[1], reverse=True)
