"""Run a retriever over a data set and score it.

    retriever = build_retriever("bm25")
    result = evaluate_retriever(retriever, load_beir("scifact"), output_dir="runs/bm25-scifact")

`output_dir` receives metrics.json (NDCG@10, MRR@10, Recall@100, MAP), run.trec, per_query.json and
info.json (what ran, on what, and how fast).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from mbert_retrieval.evaluation.data import RetrievalDataset
from mbert_retrieval.evaluation.metrics import Run, evaluate_per_query, evaluate_run, write_trec_run
from tqdm.auto import tqdm

from mbert_retrieval.files import atomic_write_text
from mbert_retrieval.search.retriever import Retriever

DEPTH = 100  # documents retrieved per query: enough for Recall@100

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    run: Run
    info: dict = field(default_factory=dict)

    def save(self, output_dir: str | Path) -> Path:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_trec_run(output_dir / "run.trec", self.run)
        write_json(output_dir / "per_query.json", self.per_query)
        write_json(output_dir / "info.json", self.info)
        write_json(output_dir / "metrics.json", self.metrics)  # last: its presence marks a finished run
        return output_dir


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def run_queries(
    retriever: Retriever,
    queries: dict[str, str],
    k: int = DEPTH,
    batch_size: int = 256,
    show_progress: bool = True,
) -> Run:
    """{query id: {doc id: score}} with the top k documents of every query.

    A query whose text is empty (or only white space) gets an empty ranking, which scores 0, as it
    does in BEIR: there is nothing to search for, and no system is asked to rank for it.
    """
    query_ids = [q for q in queries if queries[q].strip()]
    run: Run = {q: {} for q in queries if not queries[q].strip()}
    with tqdm(total=len(queries), desc="searching", unit="query", disable=not show_progress) as progress:
        progress.update(len(run))
        for start in range(0, len(query_ids), batch_size):
            batch = query_ids[start : start + batch_size]
            for query_id, hits in zip(batch, retriever.search([queries[q] for q in batch], k=k)):
                run[query_id] = {hit.id: hit.score for hit in hits}
            progress.update(len(batch))
    return run


def evaluate_retriever(
    retriever: Retriever,
    dataset: RetrievalDataset,
    *,
    k: int = DEPTH,
    batch_size: int = 256,
    output_dir: str | Path | None = None,
    show_progress: bool = True,
) -> EvaluationResult:
    """Index the corpus (unless the retriever already holds documents), search every judged query, score."""
    if len(retriever) == 0:
        retriever.add(dataset.doc_ids, dataset.document_texts())
    empty = sum(not text.strip() for text in dataset.queries.values())
    if empty:
        logger.warning(
            "%s: %d queries have empty text; they get no results (and score 0)", dataset.name, empty
        )
    start = time.perf_counter()
    run = run_queries(retriever, dataset.queries, k, batch_size, show_progress)
    search_seconds = time.perf_counter() - start
    info = {
        "system": retriever.describe(),
        "dataset": dataset.name,
        "split": dataset.split,
        "documents": len(dataset.corpus),
        "queries": len(dataset.queries),
        "depth": k,
        "indexing_seconds": retriever.stats.seconds,
        "documents_per_second": retriever.stats.documents_per_second,
        "search_seconds": search_seconds,
        "queries_per_second": len(dataset.queries) / search_seconds if search_seconds > 0 else None,
        "data_problems": dict(dataset.problems),
        "empty_queries": empty,
    }
    result = EvaluationResult(
        evaluate_run(dataset.qrels, run), evaluate_per_query(dataset.qrels, run), run, info
    )
    if output_dir is not None:
        result.save(output_dir)
    return result
