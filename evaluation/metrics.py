"""Ranking metrics through pytrec_eval, and TREC run files.

A run is {query id: {doc id: score}} (higher is better), the shape pytrec_eval and BEIR use.
The reported metrics, each averaged over every judged query (a query the run misses counts as 0):

    NDCG@10     ndcg_cut_10
    MRR@10      reciprocal rank of the first relevant document within the top 10
    Recall@100  recall_100
    MAP         average precision over the whole run
"""

from __future__ import annotations

from pathlib import Path

from mbert_retrieval.evaluation.data import DataFormatError, Qrels

from mbert_retrieval.files import atomic_write_text

Run = dict[str, dict[str, float]]
METRICS = ("NDCG@10", "MRR@10", "Recall@100", "MAP")
TREC_MEASURES = {"NDCG@10": "ndcg_cut_10", "Recall@100": "recall_100", "MAP": "map"}


def evaluate_run(qrels: Qrels, run: Run) -> dict[str, float]:
    """The four metrics, each in 0..1, averaged over the queries in `qrels`."""
    per_query = evaluate_per_query(qrels, run)
    n_queries = len(qrels)
    return {name: sum(q[name] for q in per_query.values()) / n_queries for name in METRICS}


def evaluate_per_query(qrels: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """{query id: {metric: value}} for every judged query (zeros where the run has no results)."""
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate")
    run = {qid: docs for qid, docs in run.items() if qid in qrels and docs}
    full = relevance_evaluator(qrels, {"ndcg_cut.10", "recall.100", "map"}).evaluate(run)
    top10 = {qid: dict(ranked(docs)[:10]) for qid, docs in run.items()}
    mrr = relevance_evaluator(qrels, {"recip_rank"}).evaluate(top10)
    results = {}
    for qid in qrels:
        scores = full.get(qid, {})
        results[qid] = {name: float(scores.get(measure, 0.0)) for name, measure in TREC_MEASURES.items()}
        results[qid]["MRR@10"] = float(mrr.get(qid, {}).get("recip_rank", 0.0))
    return results


def relevance_evaluator(qrels: Qrels, measures: set[str]):
    """pytrec_eval's evaluator, imported here so that the rest of `evaluation` (building data sets,
    reading BEIR folders) works without the `eval` extra."""
    try:
        import pytrec_eval
    except ImportError as err:
        raise ImportError(
            "ranking metrics need pytrec_eval: pip install 'mbert-retrieval[eval]' (or pytrec-eval-terrier)"
        ) from err
    return pytrec_eval.RelevanceEvaluator(qrels, measures)


def ranked(docs: dict[str, float]) -> list[tuple[str, float]]:
    """Documents best first; ties broken the way trec_eval does (doc id, descending)."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


# ---------------------------------------------------------------------------------------- run files


def write_trec_run(path: str | Path, run: Run, tag: str = "mbert-retrieval") -> Path:
    """`query-id Q0 doc-id rank score tag` lines, best first per query (written atomically)."""
    if any(char.isspace() for char in tag) or not tag:
        raise ValueError(f"run tag {tag!r} must be one word")
    lines = []
    for query_id, docs in run.items():
        check_trec_id(query_id, "query")
        for rank, (doc_id, score) in enumerate(ranked(docs), start=1):
            check_trec_id(doc_id, "document")
            lines.append(f"{query_id} Q0 {doc_id} {rank} {score:.6f} {tag}\n")
    path = Path(path)
    atomic_write_text(path, "".join(lines))
    return path


def read_trec_run(path: str | Path) -> Run:
    run: Run = {}
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such run file")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise DataFormatError(f"{path}: line {number}: expected 6 columns, got {len(parts)}")
        try:
            score = float(parts[4])
        except ValueError as err:
            raise DataFormatError(f"{path}: line {number}: score {parts[4]!r} is not a number") from err
        run.setdefault(parts[0], {})[parts[2]] = score
    return run


def check_trec_id(identifier: str, what: str) -> None:
    if not identifier or any(char.isspace() for char in identifier):
        raise ValueError(f"{what} id {identifier!r} cannot be written to a TREC run (empty or has spaces)")
