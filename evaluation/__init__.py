"""Evaluation harnesses: BEIR-format data, MLDR and code retrieval sets, pytrec_eval metrics, leaderboards.

The MTEB adapter lives in `evaluation.mteb_adapter` (it imports mteb).
"""

from mbert_retrieval.evaluation.code_dataset import build_code_dataset
from mbert_retrieval.evaluation.data import DataFormatError, RetrievalDataset, load_beir, save_beir
from mbert_retrieval.evaluation.harness import EvaluationResult, evaluate_retriever, run_queries
from mbert_retrieval.evaluation.leaderboard import load_config, run_leaderboard
from mbert_retrieval.evaluation.metrics import (
    METRICS,
    evaluate_per_query,
    evaluate_run,
    read_trec_run,
    write_trec_run,
)
from mbert_retrieval.evaluation.public import (
    DatasetUnavailable,
    load_code_retrieval,
    load_mldr,
    load_mldr_training,
    load_named_dataset,
    load_public_beir,
    resolve_dataset,
)

__all__ = [
    "METRICS",
    "DataFormatError",
    "DatasetUnavailable",
    "EvaluationResult",
    "RetrievalDataset",
    "build_code_dataset",
    "evaluate_per_query",
    "evaluate_retriever",
    "evaluate_run",
    "load_beir",
    "load_code_retrieval",
    "load_config",
    "load_mldr",
    "load_mldr_training",
    "load_named_dataset",
    "load_public_beir",
    "read_trec_run",
    "resolve_dataset",
    "run_leaderboard",
    "run_queries",
    "save_beir",
    "write_trec_run",
]
