"""Choosing how to fuse a dense and a BM25 ranking: the same queries' runs fused at several dense
weights, scored, so the default can be set on development data and checked on held-out sets.

    sweep = fusion_sweep(qrels, dense_run, bm25_run)      # {dense weight: metrics}
"""

from __future__ import annotations

from mbert_retrieval.evaluation.metrics import Run, evaluate_run

from mbert_retrieval.search.fusion import convex_fusion

DENSE_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0 (BM25 alone) ... 1.0 (dense alone)


def fuse_runs(dense: Run, lexical: Run, dense_weight: float, depth: int = 100) -> Run:
    """Every query's two rankings fused by `convex_fusion`, keeping the top `depth`."""
    fused: Run = {}
    for query_id in dense.keys() | lexical.keys():
        rankings = [sorted(run.get(query_id, {}).items(), key=lambda i: -i[1]) for run in (dense, lexical)]
        fused[query_id] = dict(convex_fusion(rankings, [dense_weight, 1 - dense_weight])[:depth])
    return fused


def fusion_sweep(
    qrels, dense: Run, lexical: Run, weights: tuple[float, ...] = DENSE_WEIGHTS
) -> dict[float, dict[str, float]]:
    """{dense weight: metrics of the fused run}."""
    return {w: evaluate_run(qrels, fuse_runs(dense, lexical, w)) for w in weights}
