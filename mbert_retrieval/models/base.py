"""What the three heads share: the encoder, its tokenizer, loading, and the encoding loop."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mbert_retrieval.modeling import ModernBert
from mbert_retrieval.modeling.io import CheckpointError, resolve_model_dir
from mbert_retrieval.models.encoding import (
    POOLERS_PACKED,
    POOLERS_PADDED,
    Chunking,
    PackedBatch,
    TextTokenizer,
    default_device,
    default_dtype,
    default_max_tokens,
    insert_after_first,
    log_truncation,
    pack,
    packed_batches,
    replicas,
    run_batches,
)
from mbert_retrieval.models.processes import encode_in_processes, uses_processes
from mbert_retrieval.tokenization import load_tokenizer

Devices = Sequence[str | torch.device] | None


@dataclass(frozen=True)
class EncodeOptions:
    """How an encoding call runs, apart from what it computes: the heads' public methods take these
    as keyword arguments (as sentence-transformers does) and hand them on together."""

    max_tokens_per_batch: int | None = None
    devices: Devices = None
    show_progress_bar: bool | None = None

    def uses_processes(self, num_texts: int) -> bool:
        """Whether `devices` is better served by one process per device (`models.processes`)."""
        return uses_processes(self.devices, num_texts)

    def in_processes(self, model: nn.Module, method: str, texts: Sequence[str], **kwargs):
        """`getattr(model, method)(texts, **kwargs)` with one process per device; without a batch
        size each process takes the larger per-device default of the process pool."""
        if self.max_tokens_per_batch is not None:
            kwargs["max_tokens_per_batch"] = self.max_tokens_per_batch
        return encode_in_processes(
            model, method, texts, self.devices, show_progress_bar=self.show_progress_bar, **kwargs
        )


@dataclass
class TruncationCount:
    texts: int = 0


class EncoderModel(nn.Module):
    """A ModernBERT encoder with its tokenizer and a maximum input length."""

    def __init__(self, encoder: ModernBert, tokenizer, max_length: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.text_tokenizer = TextTokenizer(tokenizer)
        limit = encoder.config.max_position_embeddings
        if max_length is None:
            max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        if not 0 < max_length <= limit:
            raise ValueError(f"max_length={max_length} must be between 1 and the model's {limit} positions")
        self.max_length = max_length
        self.truncations: TruncationCount | None = None  # set by `counting_truncations`

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def refresh_tokenizer(self) -> None:
        """Rebuild the fast-path tokenizer after tokens were added to `self.tokenizer`."""
        self.text_tokenizer = TextTokenizer(self.tokenizer)

    # -- tokenization ------------------------------------------------------------------------------

    def tokenize_texts(
        self,
        texts: list[str],
        indices: Sequence[int],
        *,
        max_length: int,
        prefix: str = "",
        marker: int | None = None,
        chunking: Chunking | None = None,
    ) -> tuple[list[int], list[int], list[np.ndarray], int]:
        """Token ids of `texts[i]` for i in indices -> (rows, windows, sequences, number truncated).

        `prefix` is text put before each text (sentence-transformers prompts); `marker` a token id
        put right after [CLS] (PyLate's [Q] / [D]). Without chunking a text longer than `max_length`
        is truncated; with it, a text longer than `chunking.size` becomes overlapping windows.
        """
        room = max_length - (marker is not None)
        inputs = [prefix + texts[i] for i in indices]
        if chunking is None:
            ids, truncated = self.text_tokenizer.encode(inputs, room)
            return list(indices), [0] * len(ids), insert_after_first(ids, marker), truncated
        if chunking.size > max_length:
            raise ValueError(f"chunking size {chunking.size} is larger than the model's limit {max_length}")
        whole = self.text_tokenizer.encode_whole(inputs)
        rows, windows, sequences = [], [], []
        long_ones = []
        for row, seq in zip(indices, whole):
            if len(seq) + (marker is not None) <= chunking.size:
                rows.append(row)
                windows.append(0)
                sequences.append(insert_after_first([seq], marker)[0])
            else:
                long_ones.append(row)
        if long_ones:
            inner = ([] if marker is None else [marker]) + (
                self.text_tokenizer.content([prefix])[0].tolist() if prefix else []
            )
            for row, parts in zip(
                long_ones, self.text_tokenizer.windows([texts[i] for i in long_ones], chunking, inner)
            ):
                rows.extend([row] * len(parts))
                windows.extend(range(len(parts)))
                sequences.extend(parts)
        return rows, windows, sequences, 0

    @contextlib.contextmanager
    def counting_truncations(self) -> Iterator[TruncationCount]:
        """Within the block, each encoding call adds the number of texts it truncated to the count
        yielded instead of logging it, so that a caller encoding in many calls reports it once."""
        self.truncations = count = TruncationCount()
        try:
            yield count
        finally:
            self.truncations = None

    # -- the encoding loop -------------------------------------------------------------------------

    def run_encoding(
        self,
        sizes: Sequence[int],
        tokenize: Callable[[np.ndarray], tuple[list[int], list[int], list[np.ndarray], int]],
        compute: Callable[[nn.Module, PackedBatch], tuple[torch.Tensor, ...]],
        run: EncodeOptions,
        *,
        extras: Callable[[list[np.ndarray], list[int]], dict[str, torch.Tensor]] | None = None,
        max_length: int | None = None,
        what: str = "texts",
        desc: str | None = None,
    ) -> list[tuple[PackedBatch, tuple[torch.Tensor, ...]]]:
        """Tokenize, pack and run all items; returns (batch, CPU outputs) pairs in completion order.

        `tokenize(item_indices)` gives (rows, windows, sequences, number truncated); `extras(sequences,
        rows)` adds per-batch tensors; `compute(model, device_batch)` returns output tensors. `what`
        names the items in the progress bar (unless `desc` is given) and the truncation count.
        """
        max_tokens_per_batch = run.max_tokens_per_batch
        models = replicas(self, run.devices, share=(self.tokenizer, self.text_tokenizer))
        if max_tokens_per_batch is None:
            max_tokens_per_batch = default_max_tokens([device for device, _ in models])
        if max_tokens_per_batch <= 0:
            raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens_per_batch}")
        config = self.encoder.config
        truncated = [0]

        def tokenize_chunk(indices):
            rows, windows, sequences, count = tokenize(indices)
            truncated[0] += count
            return rows, windows, sequences

        def make_batch(sequences, rows, windows):
            batch = pack(sequences, rows, config.vocab_size, config.max_position_embeddings, windows)
            if extras is not None:
                batch.extras = extras(sequences, rows)
            return batch

        batches = packed_batches(sizes, tokenize_chunk, make_batch, max_tokens_per_batch)
        desc = desc or f"Encoding {what}"
        results = run_batches(
            batches, compute, models, total=len(sizes), show_progress=run.show_progress_bar, desc=desc
        )
        if self.truncations is not None:
            self.truncations.texts += truncated[0]
        else:
            log_truncation(truncated[0], len(sizes), max_length or self.max_length, what)
        return results

    # -- loading -----------------------------------------------------------------------------------

    @staticmethod
    def load_encoder(
        model_dir: Path, *, device=None, dtype=None, attn_backend: str = "auto"
    ) -> tuple[ModernBert, torch.device, torch.dtype]:
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        encoder = ModernBert.from_pretrained(model_dir, dtype=dtype, device=device, attn_backend=attn_backend)
        return encoder, device, dtype

    @staticmethod
    def load_tokenizer_for(model_dir: Path, tokenizer=None):
        """`tokenizer` as given (an object or a path), else the one saved in `model_dir`."""
        if tokenizer is None:
            try:
                return load_tokenizer(model_dir)
            except CheckpointError as err:
                raise CheckpointError(f"{err}; pass tokenizer=<folder or hub id> to from_pretrained") from err
        if isinstance(tokenizer, (str, os.PathLike)):
            return load_tokenizer(tokenizer)
        return tokenizer

    @staticmethod
    def resolve(path_or_hub_id: str | os.PathLike) -> Path:
        return resolve_model_dir(path_or_hub_id)


class PooledModel(EncoderModel):
    """An encoder model with one output per sequence: the encoder's states pooled ("mean" or "cls"),
    then `from_pooled` (a projection, a classifier)."""

    def __init__(self, encoder: ModernBert, tokenizer, pooling: str, max_length: int | None = None):
        super().__init__(encoder, tokenizer, max_length)
        if pooling not in POOLERS_PACKED:
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling = pooling

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled float32 states [B, H] -> the output of each sequence, float32."""
        raise NotImplementedError

    def forward_packed(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, check_inputs: bool = True
    ) -> torch.Tensor:
        """Packed ids [N] + cu_seqlens [B+1] -> `from_pooled` of each sequence (differentiable)."""
        hidden = self.encoder.forward_packed(input_ids, cu_seqlens, max_seqlen, check_inputs=check_inputs)
        return self.from_pooled(POOLERS_PACKED[self.pooling](hidden, cu_seqlens))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The padded reference: ids, mask [B, L] -> `from_pooled` of each sequence."""
        hidden = self.encoder(input_ids, attention_mask)
        return self.from_pooled(POOLERS_PADDED[self.pooling](hidden, attention_mask))


def as_output(array: torch.Tensor, convert_to_tensor: bool):
    """float32 numpy (the default) or a CPU torch tensor."""
    array = array.float()
    return array if convert_to_tensor else array.numpy()


def single_or_list(texts) -> tuple[list, bool]:
    """Accept one string as a list of one; remember to unwrap the result."""
    if isinstance(texts, str):
        return [texts], True
    return texts, False


def grow_embeddings(encoder: ModernBert, new_size: int) -> None:
    """Add rows to the token embeddings (for new marker tokens), initialised at the mean row, and
    update the config so the saved checkpoint describes them."""
    old = encoder.embeddings.tok_embeddings
    if new_size <= old.num_embeddings:
        return
    grown = nn.Embedding(
        new_size,
        old.embedding_dim,
        padding_idx=old.padding_idx,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        grown.weight[: old.num_embeddings] = old.weight
        grown.weight[old.num_embeddings :] = old.weight.float().mean(dim=0).to(old.weight.dtype)
    encoder.embeddings.tok_embeddings = grown
    encoder.config.vocab_size = new_size
