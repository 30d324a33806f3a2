"""The IR metric on a dev set during training: nDCG@10 and MRR@10 (and Recall@100, MAP) through
pytrec_eval, for the model as it stands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbert_retrieval.training.tasks import CrossEncoderTask, RetrievalTask

DEPTH = 100  # documents ranked per query
QUERIES_PER_BLOCK = 256  # queries scored at once
RERANK_DEPTH = 30  # BM25 candidates a cross-encoder reranks on the dev set


@dataclass
class DevSet:
    """Queries, a corpus and relevance judgements, held in memory (dev sets are small)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @classmethod
    def from_beir(cls, folder: str | Path, split: str = "dev", max_queries: int | None = None) -> DevSet:
        from mbert_retrieval.evaluation.data import load_beir

        data = load_beir(folder, split=split)
        query_ids = list(data.qrels)[:max_queries]
        return cls(
            {q: data.queries[q] for q in query_ids},
            dict(zip(data.doc_ids, data.document_texts())),
            {q: data.qrels[q] for q in query_ids},
        )


def evaluate_task(task: RetrievalTask, dev: DevSet) -> dict[str, float]:
    """Rank the dev corpus for every dev query with the task's model and score the ranking.

    Dense and ColBERT models score the whole corpus; a cross-encoder reranks BM25's top candidates.
    """
    from mbert_retrieval.evaluation.metrics import evaluate_run

    query_ids, doc_ids = list(dev.queries), list(dev.corpus)
    queries, documents = [dev.queries[q] for q in query_ids], [dev.corpus[d] for d in doc_ids]
    run: dict[str, dict[str, float]] = {}
    if isinstance(task, CrossEncoderTask):
        run = _rerank_bm25(task, query_ids, queries, doc_ids, documents)
    else:
        for start in range(0, len(queries), QUERIES_PER_BLOCK):
            scores = task.score(queries[start : start + QUERIES_PER_BLOCK], documents)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :DEPTH]
            for row, query_id in enumerate(query_ids[start : start + QUERIES_PER_BLOCK]):
                run[query_id] = {doc_ids[j]: float(scores[row, j]) for j in top[row]}
    return evaluate_run(dev.qrels, run)


def _rerank_bm25(task, query_ids, queries, doc_ids, documents) -> dict[str, dict[str, float]]:
    from mbert_retrieval.search.bm25 import BM25Index

    bm25 = BM25Index.build(doc_ids, documents, split_identifiers=True)
    text_of = dict(zip(doc_ids, documents))
    run = {}
    candidates, _ = bm25.search(queries, k=RERANK_DEPTH)
    for query_id, query, ids in zip(query_ids, queries, candidates):
        if ids:
            scores = task.score([query], [text_of[i] for i in ids])[0]
            run[query_id] = {i: float(s) for i, s in zip(ids, scores)}
    return run
