"""Training: contrastive dense retrievers, ColBERT, cross-encoder rerankers and MLM pretraining on
packed, unpadded batches.

    from mbert_retrieval import DenseRetriever
    from mbert_retrieval.training import DenseTask, JsonlExamples, Trainer, TrainingArguments

    model = DenseRetriever.from_pretrained("path/to/modernbert")
    args = TrainingArguments("runs/dense", max_steps=1000, batch_size=128, learning_rate=5e-5)
    Trainer(DenseTask(model), JsonlExamples("train.jsonl"), args).train()

Names are imported on first use, so the command line starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "ContrastiveBatch": "batching",
    "DataPosition": "batching",
    "Sequences": "batching",
    "BeirExamples": "data",
    "Example": "data",
    "HFExamples": "data",
    "JsonlExamples": "data",
    "TextCorpus": "data",
    "TrainingDataError": "data",
    "load_examples": "data",
    "DevSet": "evaluate",
    "evaluate_task": "evaluate",
    "mine_hard_negatives": "mining",
    "MLMTask": "mlm",
    "mask_tokens": "mlm",
    "BatchSizeWarmup": "optim",
    "StableAdamW": "optim",
    "WarmupStableDecay": "optim",
    "ColBERTTask": "tasks",
    "CrossEncoderTask": "tasks",
    "DenseTask": "tasks",
    "Trainer": "trainer",
    "TrainingArguments": "trainer",
    "TrainingResult": "trainer",
}

__all__ = [
    "BatchSizeWarmup",
    "BeirExamples",
    "ColBERTTask",
    "ContrastiveBatch",
    "CrossEncoderTask",
    "DataPosition",
    "DenseTask",
    "DevSet",
    "Example",
    "HFExamples",
    "JsonlExamples",
    "MLMTask",
    "Sequences",
    "StableAdamW",
    "TextCorpus",
    "Trainer",
    "TrainingArguments",
    "TrainingDataError",
    "TrainingResult",
    "WarmupStableDecay",
    "evaluate_task",
    "load_examples",
    "mask_tokens",
    "mine_hard_negatives",
]

if TYPE_CHECKING:  # pragma: no cover
    from mbert_retrieval.training.batching import ContrastiveBatch, DataPosition, Sequences
    from mbert_retrieval.training.data import (
        BeirExamples,
        Example,
        HFExamples,
        JsonlExamples,
        TextCorpus,
        TrainingDataError,
        load_examples,
    )
    from mbert_retrieval.training.evaluate import DevSet, evaluate_task
    from mbert_retrieval.training.mining import mine_hard_negatives
    from mbert_retrieval.training.mlm import MLMTask, mask_tokens
    from mbert_retrieval.training.optim import BatchSizeWarmup, StableAdamW, WarmupStableDecay
    from mbert_retrieval.training.tasks import ColBERTTask, CrossEncoderTask, DenseTask
    from mbert_retrieval.training.trainer import Trainer, TrainingArguments, TrainingResult


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mbert_retrieval.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mbert_retrieval.training' has no attribute {name!r}")
