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

from typing import TYPE_CHECKING

from mbert_retrieval.lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    {
        "arguments": ["TrainingArguments"],
        "batching": ["ContrastiveBatch", "DataPosition", "Sequences"],
        "data": [
            "BeirExamples",
            "Example",
            "HFExamples",
            "JsonlExamples",
            "TextCorpus",
            "TrainingDataError",
            "load_examples",
        ],
        "evaluate": ["DevSet", "evaluate_task"],
        "mining": ["mine_hard_negatives"],
        "mlm": ["MLMTask", "mask_tokens"],
        "optim": ["BatchSizeWarmup", "StableAdamW", "WarmupStableDecay"],
        "tasks": ["ColBERTTask", "CrossEncoderTask", "DenseTask"],
        "trainer": ["Trainer", "TrainingResult"],
    },
)

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
    from mbert_retrieval.training.arguments import TrainingArguments
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
    from mbert_retrieval.training.trainer import Trainer, TrainingResult
