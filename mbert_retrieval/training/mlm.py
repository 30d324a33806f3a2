"""Masked-language-model pretraining, as ModernBERT was trained.

- Documents are tokenized as `[CLS] text [SEP]` and packed: a batch takes the next documents until
  it holds exactly its token budget. Each document is its own sequence (attention never crosses
  documents); one longer than `max_length` is cut into pieces, and a document cut by the end of a
  batch continues in the next (its remaining tokens are part of the data position).
- 30% of the non-special tokens are selected; of those 80% become [MASK], 10% a random token and
  10% stay as they are. The loss is computed only at the selected positions.
- The token budget may grow over the first batches (batch-size warmup, `optim.BatchSizeWarmup`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from mbert_retrieval.modeling import ModernBertForMaskedLM
from mbert_retrieval.models.encoding import TextTokenizer
from mbert_retrieval.training import losses
from mbert_retrieval.training.batching import TOKENIZE_CHUNK, DataPosition, Sequences, shuffled_order
from mbert_retrieval.training.data import TextCorpus
from mbert_retrieval.training.distributed import GradientSync, current_world
from mbert_retrieval.training.optim import BatchSizeWarmup

if TYPE_CHECKING:  # pragma: no cover
    from mbert_retrieval.training.arguments import TrainingArguments

IGNORE = -100  # label of a token that is not predicted


def initialize_weights(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Fresh weights for pretraining from scratch: truncated normal (two standard deviations) for
    weight matrices and embeddings, zero biases, unit norms."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                torch.nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(module, torch.nn.Linear | torch.nn.LayerNorm) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)
            if isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
    return model


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: torch.Tensor,
    vocab_size: int,
    mask_id: int,
    generator: torch.Generator,
    mask_probability: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs with 80% [MASK] / 10% random / 10% unchanged at the selected positions, labels that
    hold the original token at selected positions and IGNORE elsewhere). Special tokens are never
    selected; at least one token is, so every batch has a loss."""
    candidates = ~torch.isin(input_ids, special_ids)
    selected = (torch.rand(input_ids.shape, generator=generator) < mask_probability) & candidates
    if not selected.any() and candidates.any():
        selected[candidates.nonzero()[0]] = True
    labels = torch.where(selected, input_ids, IGNORE)
    action = torch.rand(input_ids.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(selected & (action < 0.8), mask_id, input_ids)
    masked = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, masked)
    return masked, labels


@dataclass
class MLMBatch:
    """Masked sequences (`sequences.input_ids`) with `per_token["labels"]`; `global_predictions`
    counts the predicted tokens of the global batch (the loss divisor on every rank)."""

    sequences: Sequences
    position: DataPosition
    global_predictions: int = 0

    def __post_init__(self):
        if not self.global_predictions:
            self.global_predictions = int((self.sequences.per_token["labels"] != IGNORE).sum())

    @property
    def num_tokens(self) -> int:
        return self.sequences.num_tokens

    def shard(self, rank: int, world_size: int) -> MLMBatch:
        if world_size == 1:
            return self
        if len(self.sequences) < world_size:
            raise ValueError(
                f"a batch of {len(self.sequences)} sequences cannot be split over {world_size} ranks"
            )
        bounds = np.linspace(0, len(self.sequences), world_size + 1).round().astype(int)
        return replace(self, sequences=self.sequences.slice(int(bounds[rank]), int(bounds[rank + 1])))

    def to(self, device: torch.device) -> MLMBatch:
        return replace(self, sequences=self.sequences.to(device))


def packed_documents(
    corpus: TextCorpus,
    encode: Callable[[list[str]], list[np.ndarray]],
    *,
    max_length: int,
    batch_tokens: Callable[[int], int],
    seed: int,
    start: DataPosition,
) -> Iterator[tuple[list[np.ndarray], DataPosition]]:
    """Endless (token pieces, position after them) batches over shuffled epochs; each batch holds
    exactly `batch_tokens(batch number)` tokens in pieces of at most `max_length`."""
    epoch, cursor, count = start.epoch, start.index, start.batches
    current = np.asarray(start.carry, dtype=np.int64)  # the rest of the document being consumed
    pieces: list[np.ndarray] = []
    used, budget = 0, batch_tokens(count)
    while True:
        order = shuffled_order(len(corpus), seed, epoch)
        while cursor < len(order) or len(current):
            upcoming = encode([corpus[int(i)] for i in order[cursor : cursor + TOKENIZE_CHUNK]])
            for document in [current, *upcoming]:
                if document is not current:
                    cursor += 1
                while len(document):
                    take = min(len(document), max_length, budget - used)
                    pieces.append(document[:take])
                    document = document[take:]
                    used += take
                    if used == budget:
                        count += 1
                        yield pieces, DataPosition(epoch, cursor, count, document.tolist())
                        pieces, used, budget = [], 0, batch_tokens(count)
                current = np.zeros(0, dtype=np.int64)
        epoch, cursor = epoch + 1, 0


class MLMTask:
    """Masked-language-model pretraining of a `ModernBertForMaskedLM`."""

    def __init__(
        self,
        model: ModernBertForMaskedLM,
        tokenizer,
        *,
        max_length: int = 1024,
        mask_probability: float = 0.3,
    ):
        if tokenizer.mask_token_id is None:
            raise ValueError("MLM needs a tokenizer with a [MASK] token")
        if not 0 < mask_probability < 1:
            raise ValueError(f"mask_probability must be in (0, 1), got {mask_probability}")
        if not 0 < max_length <= model.config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} must be between 1 and the model's "
                f"{model.config.max_position_embeddings} positions"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.text_tokenizer = TextTokenizer(tokenizer)
        self.max_length = max_length
        self.mask_probability = mask_probability
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    ranks_documents = False  # no dev set: MLM pretraining ranks nothing

    @property
    def encoder(self):
        return self.model.model

    def batches_per_epoch(self, corpus: TextCorpus, args: TrainingArguments) -> None:
        return None  # documents are packed into token budgets: the count is known only at the end

    def training_batches(self, corpus: TextCorpus, args: TrainingArguments, start: DataPosition):
        """Batches of exactly `args.max_tokens_per_batch` tokens, growing from
        `args.warmup_tokens_per_batch` over `args.batch_warmup_steps` steps when those are set."""
        final = args.max_tokens_per_batch
        if final is None:
            raise ValueError("MLM needs max_tokens_per_batch (tokens per batch)")
        world_size = current_world().size
        if final < world_size * self.max_length:
            raise ValueError(
                f"max_tokens_per_batch {final} must hold at least one {self.max_length}-token "
                f"sequence per process ({world_size})"
            )
        batch_tokens = lambda batch: final  # noqa: E731
        if args.warmup_tokens_per_batch is not None and args.batch_warmup_steps:
            batch_tokens = BatchSizeWarmup(
                max(args.warmup_tokens_per_batch, world_size * self.max_length),
                final,
                args.batch_warmup_steps * args.gradient_accumulation_steps,
                self.max_length,
            )
        return self.batches(corpus, batch_tokens=batch_tokens, seed=args.seed, start=start)

    def batches(
        self, corpus: TextCorpus, *, batch_tokens: Callable[[int], int], seed: int, start: DataPosition
    ) -> Iterator[MLMBatch]:
        config = self.model.config
        for pieces, position in packed_documents(
            corpus,
            self.text_tokenizer.encode_whole,
            max_length=self.max_length,
            batch_tokens=batch_tokens,
            seed=seed,
            start=start,
        ):
            sequences = Sequences.from_arrays(pieces, config.vocab_size, config.max_position_embeddings)
            # Masking is seeded by the batch number, so a resumed run masks the same way.
            generator = torch.Generator().manual_seed(seed * 1_000_003 + position.batches)
            masked, labels = mask_tokens(
                sequences.input_ids,
                self.special_ids,
                config.vocab_size,
                self.tokenizer.mask_token_id,
                generator,
                self.mask_probability,
            )
            sequences = replace(sequences, input_ids=masked, per_token={"labels": labels})
            yield MLMBatch(sequences, position)

    def step(
        self, batch: MLMBatch, chunk_tokens: int | None = None, sync: GradientSync | None = None
    ) -> torch.Tensor:
        """Forward and backward, a chunk at a time (the loss is a sum over tokens, so chunks are
        independent; under torchrun only the last chunk's backward all-reduces); returns this
        rank's share of the mean loss, detached."""
        sync = sync or GradientSync()
        passes = self._predicted_chunks(batch.sequences, chunk_tokens)
        total = torch.zeros((), device=batch.sequences.input_ids.device)
        for number, (chunk, positions, weight) in enumerate(passes):
            with sync.all_reduce_if(number == len(passes) - 1):
                logits = sync(
                    self.model.forward_packed,
                    chunk.input_ids,
                    chunk.cu_seqlens,
                    chunk.max_seqlen,
                    predict_positions=positions,
                    check_inputs=False,
                )
                loss = weight * losses.masked_lm(logits, chunk.per_token["labels"][positions])
                loss = loss / batch.global_predictions
                sync.backward(loss)
            total += loss.detach()
        return total

    @staticmethod
    def _predicted_chunks(sequences: Sequences, chunk_tokens: int | None) -> list:
        """(chunk, masked positions, loss weight) for the chunks that predict tokens. A share with
        none still runs one pass, weighted 0, so that every rank joins the gradient all-reduce."""
        passes = []
        for chunk in sequences.chunks(chunk_tokens):
            positions = (chunk.per_token["labels"] != IGNORE).nonzero().flatten()
            if len(positions):
                passes.append((chunk, positions, 1.0))
        if not passes:
            chunk = sequences.chunks(chunk_tokens)[0]
            passes.append((chunk, torch.zeros(1, dtype=torch.long, device=chunk.input_ids.device), 0.0))
        return passes

    def save(self, directory) -> None:
        """A `transformers` ModernBertForMaskedLM folder with the tokenizer."""
        from mbert_retrieval.models import folders

        self.model.save_pretrained(directory)
        folders.save_tokenizer(self.tokenizer, directory, self.max_length)
