"""From texts to packed batches, and the encoding loop every head shares.

Encoding never pads. Texts are tokenized by the fast (Rust) tokenizer, ordered by length and packed
into batches of at most `max_tokens_per_batch` real tokens: `input_ids [N]` plus `cu_seqlens [B+1]`,
built and validated on the CPU, then moved to the device without a host sync. A background thread
tokenizes the next texts while the accelerator runs the current batch; with several `devices`, one
model replica per device pulls batches from the same queue. Outputs come back in input order.

Texts longer than the model's limit are truncated (the count is logged), or cut into overlapping
windows when a `Chunking` is given; the heads decide how window outputs are combined.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mbert_retrieval.modeling.packing import sequence_ids

logger = logging.getLogger("mbert_retrieval")

DEFAULT_MAX_TOKENS_PER_BATCH = 16384  # on accelerators
# On the CPU, smaller batches encode faster: measured on 300 stdlib functions (up to 512 tokens)
# with the shipped model, 2 cores, ~33 docs/s at 16384 tokens, ~37 at 8192, ~40 at 4096 and 2048.
CPU_MAX_TOKENS_PER_BATCH = 4096
TOKENIZE_CHUNK = 2048  # texts tokenized per step of the background tokenizer
PROGRESS_MIN_TEXTS = 1024  # progress bars appear by default from this many texts on


# -- input checks ------------------------------------------------------------------------------------


def check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    """A list of strings, or a clear error naming the first bad item. A single string is refused
    here; the public methods wrap it into a list themselves."""
    if texts is None:
        raise TypeError(f"{what} must be a list of strings, got None")
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] is {type(text).__name__}, expected str")
    return texts


def check_pairs(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(query, document) pairs -> two lists of strings; malformed pairs are named."""
    if pairs is None or isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(f"pairs must be a list of (query, document) pairs, got {type(pairs).__name__}")
    firsts, seconds = [], []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be a (query, document) pair of two strings, got {pair!r:.80}")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise TypeError(f"pairs[{i}][{j}] is {type(text).__name__}, expected str")
        firsts.append(pair[0])
        seconds.append(pair[1])
    return firsts, seconds


# -- chunking ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunking:
    """Overlapping windows for texts longer than the model's limit.

    `size` is the length of each window in tokens as the model sees it (special and prefix tokens
    included); a new window starts every `stride` content tokens, so consecutive windows share
    `size - stride` content tokens. Give it as `Chunking(512, 384)` or `{"size": 512, "stride": 384}`.
    """

    size: int
    stride: int

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and isinstance(self.stride, int)):
            raise TypeError("chunking size and stride must be integers")
        if self.stride <= 0:
            raise ValueError(f"chunking stride must be positive, got {self.stride}")

    @classmethod
    def parse(cls, value: Chunking | dict | None) -> Chunking | None:
        if value is None or isinstance(value, Chunking):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"size", "stride"}
            if unknown or not {"size", "stride"} <= set(value):
                raise ValueError(
                    f"chunking must have exactly the keys 'size' and 'stride', got {sorted(value)}"
                )
            return cls(value["size"], value["stride"])
        raise TypeError(f"chunking must be a Chunking or a dict, got {type(value).__name__}")

    def content_windows(self, num_tokens: int, room: int) -> list[tuple[int, int]]:
        """(start, end) of each window over `num_tokens` content tokens, `room` of them per window."""
        if room <= 0:
            raise ValueError(f"chunking size {self.size} leaves no room for text after special tokens")
        if self.stride > room:
            raise ValueError(
                f"chunking stride {self.stride} is larger than the {room} text tokens a window of "
                f"size {self.size} holds; text between windows would be skipped"
            )
        starts = list(range(0, max(num_tokens - room, 0) + 1, self.stride))
        if starts[-1] + room < num_tokens:
            starts.append(num_tokens - room)
        return [(s, min(s + room, num_tokens)) for s in starts]


# -- tokenization ------------------------------------------------------------------------------------


class TextTokenizer:
    """Tokenizes without padding through a private copy of the fast tokenizer's Rust backend.

    Over-long inputs are re-encoded with the backend's own truncation, so truncated ids equal what
    `tokenizer(text, truncation=True, max_length=...)` gives (and what sentence-transformers feeds).
    """

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("a fast (tokenizers-backed) tokenizer is required")
        serialized = tokenizer.backend_tokenizer.to_str()
        self.plain = Tokenizer.from_str(serialized)
        self.plain.no_truncation()
        self.plain.no_padding()
        self.truncating = Tokenizer.from_str(serialized)
        self.truncating.no_padding()
        self._truncating_at: int | None = None
        self.front, self.back = self._special_tokens_around_text()
        self.lock = threading.Lock()  # the truncating copy is reconfigured per call

    def __getstate__(self) -> dict:
        """Picklable (a model goes to encoding processes whole): the lock stays behind."""
        return {key: value for key, value in self.__dict__.items() if key != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def _special_tokens_around_text(self) -> tuple[list[int], list[int]]:
        with_specials = self.plain.encode("a").ids
        content = self.plain.encode("a", add_special_tokens=False).ids
        for start in range(len(with_specials) - len(content) + 1):
            if with_specials[start : start + len(content)] == content:
                return with_specials[:start], with_specials[start + len(content) :]
        raise ValueError("could not locate the text between the tokenizer's special tokens")

    def _encode(self, inputs: list, add_special_tokens: bool = True) -> list[np.ndarray]:
        encodings = self.plain.encode_batch_fast(inputs, add_special_tokens=add_special_tokens)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def _encode_truncated(self, inputs: list, max_length: int) -> list[np.ndarray]:
        with self.lock:
            if self._truncating_at != max_length:
                self.truncating.enable_truncation(max_length, strategy="longest_first")
                self._truncating_at = max_length
            encodings = self.truncating.encode_batch_fast(inputs)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def encode(self, inputs: list, max_length: int) -> tuple[list[np.ndarray], int]:
        """Texts (or (first, second) pairs) -> ids with special tokens, cut to `max_length`; also the
        number of inputs that were cut."""
        ids = self._encode(inputs)
        too_long = [i for i, seq in enumerate(ids) if len(seq) > max_length]
        if not too_long:
            return ids, 0
        content = max_length - len(self.front) - len(self.back)
        if content > 0 and all(isinstance(inputs[i], str) for i in too_long):
            # A single text is cut as the tokenizer cuts it (its first `content` tokens, framed by the
            # special tokens), without tokenizing it again: code cut at 256 tokens is often several
            # times longer, and tokenizing it twice made `encode` 1.8x slower on real functions.
            for i in too_long:
                ids[i] = self.cut(ids[i], content)
        else:  # pairs: the tokenizer decides how much of each side to keep
            for i, seq in zip(too_long, self._encode_truncated([inputs[i] for i in too_long], max_length)):
                ids[i] = seq
        return ids, len(too_long)

    def cut(self, ids: np.ndarray, content: int) -> np.ndarray:
        """A text's ids (with special tokens) keeping the first `content` tokens of the text."""
        head = len(self.front) + content
        return np.concatenate([ids[:head], ids[len(ids) - len(self.back) :]])

    def encode_whole(self, inputs: list) -> list[np.ndarray]:
        """Ids with special tokens, never truncated."""
        return self._encode(inputs)

    def content(self, texts: list[str]) -> list[np.ndarray]:
        """Ids of the texts alone, without special tokens."""
        return self._encode(texts, add_special_tokens=False)

    def windows(
        self, texts: list[str], chunking: Chunking, inner_prefix: Sequence[int] = ()
    ) -> list[list[np.ndarray]]:
        """Each text cut into overlapping windows, each window framed as
        `front + inner_prefix + content + back` and at most `chunking.size` tokens long."""
        frame = len(self.front) + len(inner_prefix) + len(self.back)
        head = np.asarray([*self.front, *inner_prefix], dtype=np.int64)
        tail = np.asarray(self.back, dtype=np.int64)
        out = []
        for content in self.content(texts):
            spans = chunking.content_windows(len(content), chunking.size - frame)
            out.append([np.concatenate([head, content[a:b], tail]) for a, b in spans])
        return out


def insert_after_first(sequences: list[np.ndarray], token_id: int | None) -> list[np.ndarray]:
    """Put `token_id` right after the first ([CLS]) token of every sequence, as PyLate does with
    its [Q] / [D] markers."""
    if token_id is None:
        return sequences
    marker = np.asarray([token_id], dtype=np.int64)
    return [np.concatenate([seq[:1], marker, seq[1:]]) for seq in sequences]


TRUNCATION_MESSAGE = "%d of %d %s are longer than %d tokens and were truncated%s"


def log_truncation(num_truncated: int, total: int, max_length: int, what: str = "texts") -> None:
    if num_truncated:
        hint = "; pass chunking={'size': ..., 'stride': ...} to encode them whole"
        logger.warning(
            TRUNCATION_MESSAGE,
            num_truncated,
            total,
            what,
            max_length,
            hint if what in ("texts", "documents") else "",
        )


# -- packed batches ----------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """Sequences packed back to back: `input_ids [N]` and `cu_seqlens [B+1]` (int32). Per sequence,
    on the CPU: the caller's `rows` (which item it belongs to), `windows` (which window of that item,
    0 without chunking) and `lengths`. `extras` are head-specific tensors that travel with it."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    rows: np.ndarray
    windows: np.ndarray
    lengths: np.ndarray
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def firsts(self) -> np.ndarray:
        return self.windows == 0

    @property
    def num_sequences(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> PackedBatch:
        if device.type == "cpu":
            return self
        return PackedBatch(
            to_device(self.input_ids, device),
            to_device(self.cu_seqlens, device),
            self.max_seqlen,
            self.rows,
            self.windows,
            self.lengths,
            {k: to_device(v, device) for k, v in self.extras.items()},
        )


def pack(
    sequences: Sequence[np.ndarray],
    rows: Sequence[int],
    vocab_size: int,
    max_positions: int,
    windows: Sequence[int] | None = None,
) -> PackedBatch:
    """Concatenate token-id arrays into one PackedBatch, validating ids and lengths on the CPU."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    if len(lengths) == 0:
        raise ValueError("cannot pack an empty batch")
    if lengths.min() == 0:
        raise ValueError("a sequence has no tokens")
    if lengths.max() > max_positions:
        raise ValueError(
            f"a sequence has {lengths.max()} tokens, more than the model's {max_positions} positions"
        )
    flat = np.concatenate(sequences)
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"token id {bad} is outside the model's vocabulary (size {vocab_size}); do the tokenizer "
            "and the checkpoint belong together?"
        )
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    return PackedBatch(
        input_ids=torch.from_numpy(flat),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=int(lengths.max()),
        rows=np.asarray(rows, dtype=np.int64),
        windows=np.zeros(len(lengths), dtype=np.int64) if windows is None else np.asarray(windows),
        lengths=lengths,
    )


def plan_batches(lengths: Sequence[int], max_tokens: int) -> list[np.ndarray]:
    """Indices sorted longest first, cut into consecutive groups of at most `max_tokens` tokens
    (a single longer sequence gets a batch of its own)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    groups, current, used = [], [], 0
    for index in order:
        n = int(lengths[index])
        if current and used + n > max_tokens:
            groups.append(np.asarray(current))
            current, used = [], 0
        current.append(index)
        used += n
    if current:
        groups.append(np.asarray(current))
    return groups


# -- pooling over packed sequences -------------------------------------------------------------------


def mean_pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N, H] -> [B, H] float32 means over each sequence's tokens.

    The sums are float64: CUDA adds a sequence's tokens in any order, and in float64 that order no
    longer shows once the mean is rounded to float32, so a text's vector does not change from one
    run, or one shard of a corpus, to the next."""
    num_sequences = cu_seqlens.shape[0] - 1
    sums = hidden.new_zeros(num_sequences, hidden.shape[-1], dtype=torch.float64)
    sums.index_add_(0, sequence_ids(cu_seqlens, hidden.shape[0]).long(), hidden.double())
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    return (sums / lengths[:, None]).float()


def cls_pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N, H] -> [B, H] float32: the first token of each sequence."""
    return hidden[cu_seqlens[:-1].long()].float()


def mean_pool_padded(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] with mask [B, L] -> [B, H] float32 (the padded reference)."""
    mask = attention_mask.to(torch.float32)[..., None]
    return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1)


def cls_pool_padded(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0].float()


POOLERS_PACKED = {"mean": mean_pool_packed, "cls": cls_pool_packed}
POOLERS_PADDED = {"mean": mean_pool_padded, "cls": cls_pool_padded}


def pad_sequences(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id arrays into `input_ids, attention_mask [B, L]` (for reference paths)."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        attention_mask[i, : len(seq)] = 1
    return input_ids, attention_mask


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), p=2, dim=-1)


# -- devices -----------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (the fast attention kernels need half precision), float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def replicas(model: nn.Module, devices: Sequence[str | torch.device] | None, share: Sequence = ()):
    """One copy of `model` per device (the model itself on its own device). `share` lists
    attributes that copies reference instead of copying (tokenizers)."""
    own = next(model.parameters()).device
    if devices is None:
        return [(own, model)]
    devices = [torch.device(d) for d in devices]
    if not devices:
        raise ValueError("devices is empty; pass None to use the model's own device")
    memo = {id(obj): obj for obj in share}
    out = []
    for device in devices:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        same = device == own or (device.type == own.type == "cpu")
        out.append((device, model if same else copy.deepcopy(model, memo=dict(memo)).to(device)))
    return out


def default_max_tokens(devices: Sequence[torch.device]) -> int:
    """Tokens per batch when the caller gives none: the CPU budget when every device is a CPU."""
    if all(torch.device(d).type == "cpu" for d in devices):
        return CPU_MAX_TOKENS_PER_BATCH
    return DEFAULT_MAX_TOKENS_PER_BATCH


# -- the encoding loop -------------------------------------------------------------------------------


def packed_batches(
    sizes: Sequence[int],
    tokenize: Callable[[np.ndarray], tuple[list[int], list[int], list[np.ndarray]]],
    make_batch: Callable[[list[np.ndarray], list[int], list[int]], PackedBatch],
    max_tokens: int,
) -> Iterator[PackedBatch]:
    """Batches over all items, a segment of `TOKENIZE_CHUNK` consecutive items at a time, each
    segment's items longest (by `sizes`, e.g. characters) first.

    A segment is tokenized by `tokenize(item_indices) -> (rows, windows, sequences)`: an item may
    give several sequences (windows); `rows` and `windows` say whose and which each one is. It is
    packed by its real token counts. A batch depends only on its segment, so encoding a part of a
    list that starts at a multiple of `TOKENIZE_CHUNK` gives the batches, and so the very vectors,
    that encoding the whole list gives: what lets shards of a corpus match one process's encoding.
    """
    sizes = np.asarray(sizes)
    for start in range(0, len(sizes), TOKENIZE_CHUNK):
        segment = sizes[start : start + TOKENIZE_CHUNK]
        order = start + np.argsort(-segment, kind="stable")
        rows, windows, sequences = tokenize(order)
        for group in plan_batches([len(s) for s in sequences], max_tokens):
            yield make_batch(
                [sequences[i] for i in group], [rows[i] for i in group], [windows[i] for i in group]
            )


_DONE = object()


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item`, giving up (False) once `stop` is set."""
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            out.put(item, timeout=0.1)
            return True
    return False


def _produce(batches: Iterator[PackedBatch], out: queue.Queue, stop: threading.Event) -> None:
    try:
        for batch in batches:
            if not _put(out, batch, stop):
                return
    except BaseException as err:  # handed to a consumer, which raises it
        _put(out, err, stop)
        return
    _put(out, _DONE, stop)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Start copying a CPU tensor to an accelerator without waiting. From pinned memory the copy is
    queued behind the device's work; from ordinary memory CUDA first waits for that work to finish,
    so the host could not prepare the next batch while the device ends the current one."""
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to (pinned) CPU memory without waiting for it."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def run_batches(
    batches: Iterator[PackedBatch],
    compute: Callable[[nn.Module, PackedBatch], tuple[torch.Tensor, ...]],
    models: list[tuple[torch.device, nn.Module]],
    *,
    total: int,
    show_progress: bool | None,
    desc: str,
) -> list[tuple[PackedBatch, tuple[torch.Tensor, ...]]]:
    """Run `compute(model, batch)` over all batches on every (device, model), in inference mode.

    A background thread produces the batches (tokenizing ahead of the accelerator); each device's
    worker takes the next one from a shared queue. Returns (batch, outputs on the CPU) in
    completion order; the progress bar counts items (`total` of them) by their first sequence.
    """
    if show_progress is None:
        show_progress = total >= PROGRESS_MIN_TEXTS
    pending: queue.Queue = queue.Queue(maxsize=2 * len(models) + 2)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(batches, pending, stop), daemon=True)
    results: list[tuple[PackedBatch, tuple[torch.Tensor, ...]]] = []
    errors: list[BaseException] = []
    progress = tqdm(total=total, desc=desc, unit="text", disable=not show_progress)
    lock = threading.Lock()

    def next_batch() -> PackedBatch | None:
        while not stop.is_set():
            try:
                item = pending.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE:
                pending.put(item)  # for the other workers
                return None
            if isinstance(item, BaseException):
                raise item
            return item
        return None

    def work(device: torch.device, model: nn.Module) -> None:
        cuda = device.type == "cuda"
        try:
            with torch.inference_mode(), torch.cuda.device(device) if cuda else contextlib.nullcontext():
                while (batch := next_batch()) is not None:
                    outputs = tuple(to_host(t) for t in compute(model, batch.to(device)))
                    with lock:
                        results.append((batch, outputs))
                        progress.update(int(batch.firsts.sum()))
                if cuda:
                    torch.cuda.synchronize(device)
        except BaseException as err:
            errors.append(err)
            stop.set()

    producer.start()
    try:
        if len(models) == 1:
            work(*models[0])
        else:
            threads = [threading.Thread(target=work, args=pair) for pair in models]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        stop.set()
        progress.close()
        producer.join()
    if errors:
        raise errors[0]
    return results


@dataclass
class PackedEmbeddings:
    """Token vectors of many documents in one array: document i is
    `embeddings[offsets[i]:offsets[i + 1]]`."""

    embeddings: np.ndarray | torch.Tensor
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        return self.embeddings[self.offsets[i] : self.offsets[i + 1]]

    def to_list(self) -> list:
        return [self[i] for i in range(len(self))]
