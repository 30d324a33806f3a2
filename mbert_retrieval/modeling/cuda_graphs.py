"""The packed inference forward recorded once per batch shape as a CUDA graph, then replayed.

A short batch's forward launches ~300 kernels, and before the first of them the host makes the
positions, the RoPE rows and (compiled) checks the graph's guards and inputs: on an H200 host a
compiled short call took 11.9 ms for 9.5 ms of GPU work (benchmarks/NOTES.md, run 38). A replayed
CUDA graph launches all of it at once. Graphs have fixed shapes, so each batch is padded to one of
a few (`GraphShapes`): padding tokens form extra sequences that attend only to themselves, and the
real tokens keep their places, so their rows of the output are the unpadded forward's.

    graphed = GraphedForward(model)            # a CUDA model in eval mode, eager or compiled
    hidden = graphed(input_ids, cu_seqlens, max_seqlen)   # [N, H], recorded on first use

Inference only. Recordings share one memory pool; each call copies its output out of it.
`ModernBert.use_cuda_graphs()` makes the model's own inference calls on CUDA go through it
(`ModelGraphs`), so `encode` replays too.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GraphShapes:
    """How a packed batch is rounded up, so that a few recordings serve all batches: its token count
    to the next count of `token_offset` more than a multiple of `tokens` (padding sequences of at
    most `pad_length` tokens), its sequence count to a multiple of `sequences` (empty sequences), its
    longest sequence to a power of two (that only sizes the attention kernels' launch grids).

    The offset, because cuBLAS picks slower kernels for the model's projections at counts that are
    multiples of 64: ModernBERT-base's four GEMMs at 16 000 tokens took 2% longer than at 16 032
    and 3% longer than at the unpadded 15 924 on an H200 (`benchmarks/gemm_token_counts.py`,
    benchmarks/NOTES.md run 60)."""

    tokens: int = 128
    sequences: int = 16
    pad_length: int = 128
    token_offset: int = 32

    def __post_init__(self) -> None:
        if min(self.tokens, self.sequences, self.pad_length) < 1 or self.token_offset < 0:
            raise ValueError(
                f"GraphShapes' tokens, sequences and pad_length must be positive and token_offset "
                f"not negative, got {self}"
            )

    def padded(self, tokens: int, sequences: int, max_seqlen: int) -> tuple[int, int, int]:
        """(tokens, sequences, longest sequence) of the padded batch."""
        total = tokens + (self.token_offset - tokens) % self.tokens
        with_padding = sequences + -(-(total - tokens) // self.pad_length)
        total_sequences = -(-with_padding // self.sequences) * self.sequences
        longest = 1 << (max(max_seqlen, self.pad_length) - 1).bit_length()
        return total, total_sequences, longest


def pad_batch(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, shapes: GraphShapes, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batch with padding sequences appended: (ids, cu_seqlens, longest) of its padded shape.
    The first `input_ids.numel()` tokens are the batch's own. Made on the device, without a sync."""
    total, sequences, longest = shapes.padded(input_ids.shape[0], cu_seqlens.shape[0] - 1, max_seqlen)
    ids = input_ids.new_full((total,), pad_id)
    cu = cu_seqlens.new_empty(sequences + 1)
    fill_padded(ids, cu, input_ids, cu_seqlens, shapes.pad_length, pad_id)
    return ids, cu, longest


def fill_padded(
    ids: torch.Tensor,
    cu: torch.Tensor,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pad_length: int,
    pad_id: int,
    cu_offset: int = 0,
) -> None:
    """Writes the batch into the padded buffers `ids` and `cu`: its tokens first, then padding
    sequences of `pad_length` tokens (the last one shorter) up to `ids`' length, then empty ones.
    `cu_offset` is subtracted from `cu_seqlens` (a later part of a batch starts at 0). On CUDA one
    Triton kernel does it all (`padding_kernel.py`)."""
    if ids.is_cuda and input_ids.is_contiguous() and cu_seqlens.is_contiguous():
        from mbert_retrieval.modeling import padding_kernel

        padding_kernel.fill_padded(ids, cu, input_ids, cu_seqlens, pad_length, pad_id, cu_offset)
        return
    tokens, batch = input_ids.shape[0], cu_seqlens.shape[0]
    ids[:tokens].copy_(input_ids)
    ids[tokens:].fill_(pad_id)
    cu[:batch].copy_(cu_seqlens - cu_offset)
    ends = cu[batch:]
    torch.arange(tokens + pad_length, tokens + (ends.shape[0] + 1) * pad_length, pad_length, out=ends)
    ends.clamp_(max=ids.shape[0])


def check_streams(streams: int) -> None:
    """Replays record a batch whole on one stream or as two halves on two."""
    if streams not in (1, 2):
        raise ValueError(f"streams must be 1 or 2, got {streams}")


def split_point(cu_seqlens: list[int]) -> int:
    """The sequence boundary nearest the middle of the batch's tokens, as an index into
    `cu_seqlens` (never the first or the last): where `GraphedForward` cuts a batch in two."""
    if len(cu_seqlens) < 3:
        raise ValueError(f"a batch of {len(cu_seqlens) - 1} sequence(s) cannot be cut in two")
    middle = cu_seqlens[-1] / 2
    after = min(max(bisect.bisect_left(cu_seqlens, middle), 1), len(cu_seqlens) - 2)
    return min((max(after - 1, 1), after), key=lambda i: abs(cu_seqlens[i] - middle))


@dataclass
class _Part:
    """One stream's share of a batch: its tokens, its cu_seqlens (from `cu_offset` on), its longest."""

    ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_offset: int
    max_seqlen: int


@dataclass
class _Buffers:
    """A recorded part's fixed input buffers and its output."""

    ids: torch.Tensor
    cu: torch.Tensor
    out: torch.Tensor | None = None


@dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    parts: list[_Buffers]


class GraphedForward:
    """`model.forward_packed` for inference, replayed from a CUDA graph per padded batch shape.
    `forward(ids, cu_seqlens, max_seqlen)` is what gets recorded: the model's packed forward by
    default.

    `streams=2` cuts each batch of two or more sequences in two at the sequence boundary nearest its
    middle and records each half on a stream of its own: the halves do not depend on each other, so
    the GPU runs one half's kernels in the other's idle time (the ~1.6 us between kernels, cuBLAS's
    memsets, each kernel's last partial wave). The cut is read from `cu_seqlens` on the host: one
    wait for the GPU per call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        shapes: GraphShapes | None = None,
        warmup: int = 2,
        forward: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
        streams: int = 1,
    ):
        check_streams(streams)
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {model.device}")
        if model.training:
            raise ValueError("GraphedForward replays inference only: call model.eval() first")
        self.model, self.shapes, self.warmup, self.streams = model, shapes or GraphShapes(), warmup, streams
        self.forward = forward or (
            lambda ids, cu, longest: model.forward_packed(ids, cu, longest, check_inputs=False)
        )
        self.pad_id = model.config.pad_token_id or 0
        self.recordings: dict[tuple, _Recording] = {}
        self._pool = None
        self._side_streams: list[torch.cuda.Stream] = []

    def __call__(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """input_ids [N], cu_seqlens [B+1] int32 on the model's device -> hidden states [N, H]."""
        if input_ids.device != self.model.device or cu_seqlens.device != self.model.device:
            raise ValueError(f"the batch must be on the model's device {self.model.device}")
        parts = self._parts(input_ids, cu_seqlens, max_seqlen)
        key = tuple(
            self.shapes.padded(p.ids.shape[0], p.cu_seqlens.shape[0] - 1, p.max_seqlen) for p in parts
        )
        recording = self.recordings.get(key) or self._record(key, cu_seqlens.dtype)
        for part, buffers in zip(parts, recording.parts):
            fill_padded(
                buffers.ids,
                buffers.cu,
                part.ids,
                part.cu_seqlens,
                self.shapes.pad_length,
                self.pad_id,
                part.cu_offset,
            )
        recording.graph.replay()
        # Copied out: the pool's memory is the next replay's.
        outs = [buffers.out[: part.ids.shape[0]] for part, buffers in zip(parts, recording.parts)]
        return torch.cat(outs) if len(outs) > 1 else outs[0].clone()

    def _parts(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> list[_Part]:
        """The whole batch, or its two halves when recording on two streams."""
        if self.streams == 1 or cu_seqlens.shape[0] < 3:
            return [_Part(input_ids, cu_seqlens, 0, max_seqlen)]
        ends = cu_seqlens.tolist()
        cut = split_point(ends)
        lengths = [end - start for start, end in zip(ends, ends[1:])]
        return [
            _Part(input_ids[: ends[cut]], cu_seqlens[: cut + 1], 0, max(lengths[:cut])),
            _Part(input_ids[ends[cut] :], cu_seqlens[cut:], ends[cut], max(lengths[cut:])),
        ]

    def _record(self, key: tuple, cu_dtype: torch.dtype) -> _Recording:
        device = self.model.device
        with torch.inference_mode(False):  # buffers every later call writes, in any mode
            parts = [self._buffers(total, sequences, cu_dtype) for total, sequences, _ in key]
        if len(parts) > 1 and not self._side_streams:
            self._side_streams = [torch.cuda.Stream(device) for _ in parts]

        def forward() -> None:
            if len(parts) == 1:
                parts[0].out = self.forward(parts[0].ids, parts[0].cu, key[0][2])
                return
            main = torch.cuda.current_stream(device)
            for stream, buffers, (_, _, longest) in zip(self._side_streams, parts, key):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    buffers.out = self.forward(buffers.ids, buffers.cu, longest)
            for stream in self._side_streams:
                main.wait_stream(stream)

        # Warm-up on a side stream, as torch.cuda.graph asks: kernels compiled, caches and
        # workspaces made before the recording.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (another device's worker, a batch producer) may use CUDA
        # while this one records.
        with (
            torch.inference_mode(),
            torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
        ):
            forward()
        self.recordings[key] = _Recording(graph, parts)
        return self.recordings[key]

    def _buffers(self, total: int, sequences: int, cu_dtype: torch.dtype) -> _Buffers:
        """Input buffers holding a valid batch of this shape to record: sequences of equal length,
        then empty ones."""
        device = self.model.device
        ids = torch.full((total,), self.pad_id, dtype=torch.long, device=device)
        length = -(-total // sequences)
        cu = (torch.arange(sequences + 1, device=device) * length).clamp_(max=total).to(cu_dtype)
        return _Buffers(ids, cu)


class ModelGraphs:
    """A model's switch to replayed graphs (`ModernBert.use_cuda_graphs`) and its recordings, made on
    first use. A copy of the model (another device's replica) starts with none: recordings hold the
    memory addresses of the weights they were made with, which is also why the model forgets them
    when it is moved or cast (`ModernBert._apply`: new weight storage)."""

    def __init__(self, shapes: GraphShapes | None = None, streams: int = 1):
        check_streams(streams)
        self.shapes, self.streams = shapes or GraphShapes(), streams
        self._graphed: GraphedForward | None = None

    def serves(self, model: torch.nn.Module, input_ids: torch.Tensor, plain_call: bool) -> bool:
        """Whether this call replays: inference (no gradients, eval mode) on CUDA, without positions
        or a key mask of its own (`plain_call`)."""
        return plain_call and input_ids.is_cuda and not torch.is_grad_enabled() and not model.training

    def __call__(
        self, model, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        if self._graphed is None:
            self._graphed = GraphedForward(
                model, self.shapes, forward=model.forward_unrecorded, streams=self.streams
            )
        return self._graphed(input_ids, cu_seqlens, max_seqlen)

    def __deepcopy__(self, memo) -> ModelGraphs:
        return ModelGraphs(self.shapes, self.streams)

    def __getstate__(self) -> dict:
        return {"shapes": self.shapes, "streams": self.streams, "_graphed": None}
