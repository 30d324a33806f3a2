"""How to train: the settings every `Trainer` run takes, whatever the head."""

from __future__ import annotations

from dataclasses import dataclass

from mbert_retrieval.training.optim import Decay


@dataclass
class TrainingArguments:
    """How to train. Step counts are optimizer steps.

    Batches: retrieval tasks take up to `batch_size` examples and at most `max_tokens_per_batch`
    tokens (queries and documents together) per batch, whichever comes first; MLM batches hold
    exactly `max_tokens_per_batch` tokens, growing from `warmup_tokens_per_batch` over
    `batch_warmup_steps` steps when set. `chunk_tokens` turns on GradCache (retrieval) or chunked
    forward passes (MLM) of at most that many tokens, so a large batch fits in memory.
    """

    output_dir: str
    max_steps: int | None = None
    max_time: float | None = None  # seconds: the run stops after the step that passes it, and saves
    epochs: float = 1.0
    batch_size: int | None = 32
    max_tokens_per_batch: int | None = None
    chunk_tokens: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    warmup_steps: float = 0.1  # a fraction of the steps when below 1
    decay: Decay = "linear"
    decay_steps: float | None = None  # a fraction when below 1; None: every step after warmup
    min_lr: float = 0.0
    warmup_tokens_per_batch: int | None = None
    batch_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    bf16: bool | None = None  # None: on CUDA
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    keep_checkpoints: int = 2
    resume_from: str | None = None  # a checkpoint folder, or "latest"
    tensorboard: bool = False
    save_final_model: bool = True
    show_progress: bool = True
    device: str | None = None

    def __post_init__(self):
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be at least 1")
        if self.batch_size is None and self.max_tokens_per_batch is None:
            raise ValueError("give batch_size, max_tokens_per_batch, or both")
        for name in (
            "max_steps",
            "batch_size",
            "max_tokens_per_batch",
            "chunk_tokens",
            "eval_steps",
            "save_steps",
            "max_time",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
