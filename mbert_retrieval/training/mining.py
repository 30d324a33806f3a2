"""Hard-negative mining: retrieve with a dense model, keep the high-ranked documents that are not
positives, and write the JSONL that training reads (`{"query", "positive", "negatives"}`).

The very top of a ranking often holds unlabelled positives (false negatives), so `skip_top`
non-positive hits are passed over first, and `max_score_ratio` (e.g. 0.95) drops any candidate
scoring above that fraction of the query's positive (NV-Retriever's "TopK-PercPos").
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from mbert_retrieval.files import atomic_write
from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.training.data import BeirExamples, ExampleSource

logger = logging.getLogger("mbert_retrieval")

CORPUS_BLOCK = 65536  # documents encoded and indexed at a time


@dataclass
class MiningReport:
    examples: int = 0
    queries: int = 0
    corpus_size: int = 0
    problems: Counter = field(default_factory=Counter)


def mine_hard_negatives(
    model: DenseRetriever,
    source: ExampleSource,
    output: str | Path,
    *,
    corpus: list[str] | None = None,
    num_negatives: int = 8,
    skip_top: int = 0,
    max_score_ratio: float | None = None,
    show_progress: bool = True,
) -> MiningReport:
    """Mine `num_negatives` negatives for every (query, positive) of `source` and write them to
    `output` (atomically).

    The corpus searched is the BEIR folder's corpus for a `BeirExamples` source; otherwise every
    positive and negative text of the source plus `corpus` if given.
    """
    from mbert_retrieval.index.faiss_index import FaissIndex

    if num_negatives <= 0 or skip_top < 0:
        raise ValueError("num_negatives must be positive and skip_top not negative")
    if max_score_ratio is not None and not 0 < max_score_ratio <= 1:
        raise ValueError(f"max_score_ratio must be in (0, 1], got {max_score_ratio}")
    report = MiningReport(problems=Counter(source.problems))
    positives_of: dict[str, list[str]] = {}
    for index in tqdm(range(len(source)), desc="reading examples", disable=not show_progress):
        example = source[index]
        positives_of.setdefault(example.query, []).append(example.documents[0])
    texts = _corpus_texts(source, corpus)
    report.queries, report.corpus_size = len(positives_of), len(texts)

    index = FaissIndex(model.dim, kind="flat", metric="ip")
    for start in tqdm(range(0, len(texts), CORPUS_BLOCK), desc="indexing corpus", disable=not show_progress):
        block = texts[start : start + CORPUS_BLOCK]
        vectors = model.encode_documents(block, show_progress_bar=show_progress)
        index.add([str(i) for i in range(start, start + len(block))], vectors)

    queries = list(positives_of)
    query_vectors = model.encode_queries(queries, show_progress_bar=show_progress)
    depth = skip_top + num_negatives + max(len(p) for p in positives_of.values()) + 16
    hits, scores = index.search(query_vectors, k=depth)

    positive_vectors = {}
    if max_score_ratio is not None:
        unique = list(dict.fromkeys(p for ps in positives_of.values() for p in ps))
        positive_vectors = dict(zip(unique, model.encode_documents(unique, show_progress_bar=show_progress)))
    records = []
    for query, vector, ids, row_scores in zip(queries, query_vectors, hits, scores):
        positives = positives_of[query]
        positive_score = None
        if max_score_ratio is not None:  # the weakest positive sets the bar
            positive_score = min(float(positive_vectors[p] @ vector) for p in positives)
        negatives = _pick(
            texts, ids, row_scores, set(positives), num_negatives, skip_top, max_score_ratio, positive_score
        )
        if len(negatives) < num_negatives:
            report.problems["queries with fewer negatives than asked"] += 1
        for positive in positives:
            records.append({"query": query, "positive": positive, "negatives": negatives})
    report.examples = len(records)

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")

    atomic_write(Path(output), write)
    logger.info("mined %d examples for %d queries into %s", report.examples, report.queries, output)
    return report


def _corpus_texts(source: ExampleSource, extra: list[str] | None) -> list[str]:
    if isinstance(source, BeirExamples):
        texts = [source.document(doc_id) for doc_id in source.corpus_offsets]
    else:
        texts = [d for i in range(len(source)) for d in source[i].documents]
    texts += list(extra or [])
    return list(dict.fromkeys(texts))  # unique, in first-seen order


def _pick(texts, ids, scores, positives, count, skip_top, max_score_ratio, positive_score) -> list[str]:
    """The first `count` hits that are not positives, after skipping `skip_top` of them and any
    that score above `max_score_ratio` times the positive's score."""
    picked, skipped = [], 0
    for doc_id, score in zip(ids, scores):
        text = texts[int(doc_id)]
        if text in positives:
            continue
        if skipped < skip_top:
            skipped += 1
            continue
        if max_score_ratio is not None and score > max_score_ratio * positive_score:
            continue
        picked.append(text)
        if len(picked) == count:
            break
    return picked
