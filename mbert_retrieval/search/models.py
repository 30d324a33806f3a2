"""Search systems by name: `build_retriever("hybrid:path/to/model")`, and the model loaders it uses
(they live in `mbert_retrieval.models.loading` and stay importable from here).

    build_retriever("bm25")                   -> Retriever over BM25
    build_retriever("path/to/dense", "hnsw")  -> Retriever over the model's vectors in an HNSW index
    build_retriever("hybrid:default")         -> Retriever fusing BM25 and the shipped model
"""

from __future__ import annotations

from pathlib import Path

from mbert_retrieval.models.loading import (
    DEFAULT_MODEL,
    KINDS,
    SentenceTransformerEncoder,
    detect_kind,
    load_kind,
    load_reranker,
    load_search_model,
    read_config,
    resolve,
    shipped_model_dir,
    split_kind,
)
from mbert_retrieval.search.retriever import Retriever

__all__ = [
    "DEFAULT_MODEL",
    "KINDS",
    "SentenceTransformerEncoder",
    "build_retriever",
    "canonical_name",
    "detect_kind",
    "load_kind",
    "load_reranker",
    "load_search_model",
    "read_config",
    "resolve",
    "shipped_model_dir",
    "split_kind",
]


def build_retriever(
    system: str,
    index: str = "flat",
    rerank: str | None = None,
    *,
    first_stage_k: int = 100,
    device: str | None = None,
    show_progress: bool = False,
    bm25_settings: dict | None = None,
):
    """An empty Retriever for a system spec: "bm25", "default" (the shipped model), a model folder or
    hub id ("dense:", "colbert:", "st:" prefixes optional), or "hybrid:<model>" (BM25 and the model
    fused by normalised scores)."""
    hybrid = system.startswith("hybrid:")
    if hybrid:
        system = system.removeprefix("hybrid:")
    model = model_name = None
    if system == "bm25":
        if hybrid:
            raise ValueError("hybrid: needs a model, e.g. hybrid:path/to/model")
        index = "bm25"
    else:
        model_name = canonical_name(system)
        model = load_search_model(model_name, device=device)
    reranker = load_reranker(canonical_name(rerank), device=device) if rerank else None
    return Retriever(
        model,
        index,
        hybrid=hybrid,
        reranker=reranker,
        first_stage_k=first_stage_k,
        bm25_settings=bm25_settings,
        model_name=model_name,
        reranker_name=canonical_name(rerank) if rerank else None,
        show_progress=show_progress,
    )


def canonical_name(spec: str) -> str:
    """Local folders as absolute paths (so a saved index finds its model from anywhere); hub ids and
    "default" (the shipped model, wherever the package is installed) as given."""
    kind, path = split_kind(spec)
    if path != DEFAULT_MODEL and Path(path).expanduser().is_dir():
        path = str(Path(path).expanduser().resolve())
    return f"{kind}:{path}" if kind else path
