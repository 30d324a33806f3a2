"""Training batches by token budget, on packed sequences.

A batch never pads: its texts are packed back to back (`input_ids [N]` + `cu_seqlens [B+1]`). A
contrastive batch takes examples in shuffled order until the next one would pass the token budget
(queries and documents counted together) or the example cap. Batches are built from the data
position alone (epoch, example index), so a run resumed from a checkpoint gets the same batches.

Under torchrun every rank builds the same global batch and keeps its own contiguous share of the
examples (`ContrastiveBatch.shard`), so all ranks take the same number of steps, and one process on
the global batch computes what all the ranks compute together.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from mbert_retrieval.models.encoding import pack, to_device
from mbert_retrieval.training.data import Example, ExampleSource

TOKENIZE_CHUNK = 256  # examples tokenized together


@dataclass
class Sequences:
    """Token sequences packed back to back, with optional `per_token` values (masks, labels)."""

    input_ids: torch.Tensor  # [N] int64
    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N] values

    @classmethod
    def from_arrays(
        cls,
        sequences: Sequence[np.ndarray],
        vocab_size: int,
        max_positions: int,
        per_token: dict[str, Sequence[np.ndarray]] | None = None,
    ) -> Sequences:
        """Pack token-id arrays, checking ids and lengths against the model on the CPU."""
        packed = pack(sequences, range(len(sequences)), vocab_size, max_positions)
        flat = {name: torch.from_numpy(np.concatenate(parts)) for name, parts in (per_token or {}).items()}
        return cls(packed.input_ids, packed.cu_seqlens, packed.max_seqlen, flat)

    def __len__(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def slice(self, start: int, end: int) -> Sequences:
        """Sequences start..end-1."""
        first, last = int(self.cu_seqlens[start]), int(self.cu_seqlens[end])
        cu_seqlens = self.cu_seqlens[start : end + 1] - first
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        return Sequences(
            self.input_ids[first:last],
            cu_seqlens,
            int(lengths.max()) if len(lengths) else 0,
            {name: values[first:last] for name, values in self.per_token.items()},
        )

    @classmethod
    def concat(cls, parts: Sequence[Sequences]) -> Sequences:
        """The parts' sequences in one packing, in order (parts must carry the same `per_token` names)."""
        offsets = np.cumsum([0] + [part.num_tokens for part in parts[:-1]])
        cu_seqlens = [parts[0].cu_seqlens[:1]]
        cu_seqlens += [part.cu_seqlens[1:] + int(offset) for part, offset in zip(parts, offsets)]
        return cls(
            torch.cat([part.input_ids for part in parts]),
            torch.cat(cu_seqlens),
            max(part.max_seqlen for part in parts),
            {name: torch.cat([part.per_token[name] for part in parts]) for name in parts[0].per_token},
        )

    def chunks(self, max_tokens: int | None) -> list[Sequences]:
        """Consecutive pieces of at most `max_tokens` tokens (a longer sequence is a piece alone)."""
        if max_tokens is None or self.num_tokens <= max_tokens:
            return [self]
        bounds = self.cu_seqlens.tolist()
        pieces, start = [], 0
        for end in range(1, len(bounds)):
            if end - start > 1 and bounds[end] - bounds[start] > max_tokens:
                pieces.append(self.slice(start, end - 1))
                start = end - 1
        pieces.append(self.slice(start, len(bounds) - 1))
        return pieces

    def to(self, device: torch.device) -> Sequences:
        if torch.device(device).type == "cpu":
            return self
        return Sequences(
            to_device(self.input_ids, device),
            to_device(self.cu_seqlens, device),
            self.max_seqlen,
            {k: to_device(v, device) for k, v in self.per_token.items()},
        )


@dataclass
class Tokenized:
    """One example as token ids: the query (None for cross-encoders, whose query is inside each
    pair), the documents (or query-document pairs), and the teacher scores."""

    query: np.ndarray | None
    documents: list[np.ndarray]
    scores: list[float] | None = None
    query_keys: np.ndarray | None = None  # which query tokens others attend to (ColBERT expansion)
    teacher: np.ndarray | None = None  # [2, dim] a teacher's embeddings of the query and the positive

    @property
    def num_tokens(self) -> int:
        return (0 if self.query is None else len(self.query)) + sum(len(d) for d in self.documents)


@dataclass
class DataPosition:
    """Where the data stream stands: the epoch, the next example of its shuffled order, and how many
    batches were taken so far (seeds per-batch randomness such as MLM masking)."""

    epoch: int = 0
    index: int = 0
    batches: int = 0
    carry: list[int] = field(default_factory=list)  # MLM: tokens of a document cut at a batch's end

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "batches": self.batches, "carry": self.carry}

    @classmethod
    def from_dict(cls, value: dict) -> DataPosition:
        return cls(int(value["epoch"]), int(value["index"]), int(value["batches"]), list(value["carry"]))


def shuffled_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a function of the seed and epoch only."""
    return np.random.default_rng([seed, epoch]).permutation(size)


@dataclass
class ContrastiveBatch:
    """Examples packed for a retrieval loss. Example i's documents are
    `documents[doc_offsets[i]:doc_offsets[i + 1]]`, its positive first.

    After `shard`, the global sizes and this part's offsets within them say where the local
    examples sit among all ranks' (for targets into all-gathered documents and for the loss scale),
    and `rank_examples` / `rank_documents` how many examples and documents each rank holds (so
    gathering them needs no exchange of sizes, which would make the host wait for the device).
    """

    queries: Sequences | None
    documents: Sequences
    doc_offsets: torch.Tensor  # [B + 1] int64
    scores: torch.Tensor | None = None  # [num_documents] teacher scores
    teacher: torch.Tensor | None = None  # [B, 2, dim] teacher embeddings of each query and positive
    position: DataPosition = field(default_factory=DataPosition)  # the position after this batch
    global_examples: int = 0
    global_documents: int = 0
    example_offset: int = 0
    document_offset: int = 0
    rank_examples: tuple[int, ...] | None = None  # examples per rank, after `shard`
    rank_documents: tuple[int, ...] | None = None  # documents per rank, after `shard`

    def __post_init__(self):
        if not self.global_examples:
            self.global_examples, self.global_documents = self.num_examples, len(self.documents)

    @property
    def num_examples(self) -> int:
        return self.doc_offsets.shape[0] - 1

    @property
    def positives(self) -> torch.Tensor:
        """Index of each example's positive among the (local) documents."""
        return self.doc_offsets[:-1]

    @property
    def group_sizes(self) -> torch.Tensor:
        return self.doc_offsets[1:] - self.doc_offsets[:-1]

    @property
    def num_tokens(self) -> int:
        return self.documents.num_tokens + (self.queries.num_tokens if self.queries is not None else 0)

    def shard(self, rank: int, world_size: int) -> ContrastiveBatch:
        """This rank's contiguous share of the examples: about a `world_size`-th of the tokens."""
        if world_size == 1:
            return self
        bounds = self.balanced_bounds(world_size)
        start, end = int(bounds[rank]), int(bounds[rank + 1])
        document_bounds = self.doc_offsets[torch.from_numpy(bounds)].tolist()
        first, last = document_bounds[rank], document_bounds[rank + 1]
        return replace(
            self,
            queries=None if self.queries is None else self.queries.slice(start, end),
            documents=self.documents.slice(first, last),
            doc_offsets=self.doc_offsets[start : end + 1] - first,
            scores=None if self.scores is None else self.scores[first:last],
            teacher=None if self.teacher is None else self.teacher[start:end],
            example_offset=start,
            document_offset=first,
            rank_examples=tuple(int(n) for n in np.diff(bounds)),
            rank_documents=tuple(b - a for a, b in zip(document_bounds, document_bounds[1:])),
        )

    def balanced_bounds(self, world_size: int) -> np.ndarray:
        """Example bounds [world_size + 1] that give each rank about the same number of tokens (not
        of examples: a step takes as long as its slowest rank, and ranks wait for each other at the
        gradient all-reduce), and at least one example each."""
        count = self.num_examples
        if count < world_size:
            raise ValueError(f"{count} examples cannot be shared by {world_size} ranks")
        tokens = np.add.reduceat(self.documents.lengths.numpy(), self.doc_offsets[:-1].numpy())
        if self.queries is not None:
            tokens = tokens + self.queries.lengths.numpy()
        cumulative = np.concatenate([[0], np.cumsum(tokens)])
        targets = cumulative[-1] * np.arange(1, world_size) / world_size
        above = np.searchsorted(cumulative, targets)  # first bound at or past each target
        below = above - 1
        nearer = np.where(targets - cumulative[below] < cumulative[above] - targets, below, above)
        bounds = [0, *nearer.tolist(), count]
        for k in range(1, world_size):  # every rank keeps at least one example
            bounds[k] = min(max(bounds[k], bounds[k - 1] + 1), count - (world_size - k))
        return np.asarray(bounds)

    def to(self, device: torch.device) -> ContrastiveBatch:
        return replace(
            self,
            queries=None if self.queries is None else self.queries.to(device),
            documents=self.documents.to(device),
            doc_offsets=to_device(self.doc_offsets, device),
            scores=None if self.scores is None else to_device(self.scores, device),
            teacher=None if self.teacher is None else to_device(self.teacher, device),
        )


def collate(
    examples: list[Tokenized], vocab_size: int, max_positions: int, position: DataPosition
) -> ContrastiveBatch:
    """Pack tokenized examples into one ContrastiveBatch."""
    documents = [d for e in examples for d in e.documents]
    sizes = [len(e.documents) for e in examples]
    doc_offsets = torch.zeros(len(examples) + 1, dtype=torch.long)
    doc_offsets[1:] = torch.tensor(sizes).cumsum(0)
    queries = None
    if examples[0].query is not None:
        keys = None
        if examples[0].query_keys is not None:
            keys = {"keys": [e.query_keys for e in examples]}
        queries = Sequences.from_arrays([e.query for e in examples], vocab_size, max_positions, keys)
    scores = None
    if all(e.scores is not None for e in examples):
        scores = torch.tensor([s for e in examples for s in e.scores], dtype=torch.float32)
    teacher = None
    if all(e.teacher is not None for e in examples):
        teacher = torch.from_numpy(np.stack([e.teacher for e in examples])).float()
    return ContrastiveBatch(
        queries=queries,
        documents=Sequences.from_arrays(documents, vocab_size, max_positions),
        doc_offsets=doc_offsets,
        scores=scores,
        teacher=teacher,
        position=position,
    )


def example_batches(
    source: ExampleSource,
    tokenize: Callable[[list[Example]], list[Tokenized]],
    make_batch: Callable[[list[Tokenized], DataPosition], ContrastiveBatch],
    *,
    batch_size: int | None,
    max_tokens: int | None,
    seed: int,
    start: DataPosition,
    min_examples: int = 1,
) -> Iterator[ContrastiveBatch]:
    """Endless batches over shuffled epochs, from `start` on.

    A batch closes before the example that would take it past `max_tokens` tokens or `batch_size`
    examples (an example longer than the budget gets a batch of its own). An epoch's last, short
    batch is kept if it has at least `min_examples` examples.
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size, max_tokens, or both")
    if len(source) < min_examples:
        raise ValueError(f"{len(source)} training examples are fewer than the {min_examples} a batch needs")
    epoch, index, count = start.epoch, start.index, start.batches
    while True:
        order = shuffled_order(len(source), seed, epoch)
        pending: list[Tokenized] = []
        tokens = 0
        cursor = index
        while cursor < len(order):
            chunk = order[cursor : cursor + TOKENIZE_CHUNK]
            for tokenized in tokenize([source[int(i)] for i in chunk]):
                full = batch_size is not None and len(pending) == batch_size
                over = max_tokens is not None and tokens + tokenized.num_tokens > max_tokens
                if pending and (full or over):
                    count += 1
                    yield make_batch(pending, DataPosition(epoch, cursor, count))
                    pending, tokens = [], 0
                pending.append(tokenized)
                tokens += tokenized.num_tokens
                cursor += 1
        epoch, index = epoch + 1, 0
        if len(pending) >= min_examples:
            count += 1
            yield make_batch(pending, DataPosition(epoch, 0, count))


def prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Build the next `depth` batches on a background thread while the current one trains. Closing
    the iterator stops the thread and waits for it (no thread outlives the training loop)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(item, timeout=0.1)
                return True
        return False

    def produce():
        try:
            for batch in batches:
                if not offer(batch):
                    return
        except BaseException as err:  # handed to the consumer, which raises it
            offer(err)
            return
        offer(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
