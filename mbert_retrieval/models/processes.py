"""Encoding with one process per device.

    vectors = encode_in_processes(model, "encode_documents", texts, ["cuda:0", "cuda:1"])

Threads driving several GPUs from one process share one interpreter lock with the tokenizer and the
batch packing, so they stop scaling at about 1.5x on two GPUs. Here every device gets its own spawned
process holding a copy of the model: each one encodes its share of the texts through the model's
ordinary encoding loop (large packed batches, a background thread tokenizing ahead of the device), and
the parent puts the outputs back in input order. Shares are dealt out longest text first, round robin,
so every process gets the same mix of lengths and they finish together.

Starting the processes costs a few seconds (an interpreter, torch, the model copy), so the heads' own
`devices=[...]` argument hands over to this path only for several CUDA devices and at least
`PROCESS_MIN_TEXTS` texts; below that it drives the devices from threads. An `EncodingPool` keeps the
processes for many calls.
"""

from __future__ import annotations

import copy
import os
import queue
import time
import traceback
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mbert_retrieval.models.encoding import PackedEmbeddings

PROCESS_MIN_TEXTS = 50_000
PROCESS_MAX_TOKENS_PER_BATCH = 65536  # per CUDA device, when the caller gives no batch size
RESULT_POLL_SECONDS = 1.0


def uses_processes(devices: Sequence[str | torch.device] | None, num_texts: int) -> bool:
    """Whether `devices=[...]` is better served by one process per device than by threads."""
    if devices is None or num_texts < PROCESS_MIN_TEXTS:
        return False
    devices = {torch.device(d) for d in devices}
    return len(devices) > 1 and all(d.type == "cuda" and d.index is not None for d in devices)


def encode_in_processes(
    model: nn.Module,
    method: str,
    texts: Sequence[str],
    devices: Sequence[str | torch.device],
    *,
    show_progress_bar: bool | None = None,
    **kwargs,
):
    """`getattr(model, method)(texts, **kwargs)`, spread over one spawned process per device (started
    for this call; an `EncodingPool` keeps them for several calls).

    Returns what the method returns for all texts, in input order: an array or tensor with one row per
    text, a list with one item per text, or a `PackedEmbeddings`. The progress bar (when shown) is the
    first process's. A device may repeat (e.g. two CPU processes); `kwargs` must be picklable.
    """
    with EncodingPool(model, devices) as pool:
        return pool.run(method, texts, show_progress_bar=show_progress_bar, **kwargs)


class EncodingPool:
    """One process per device, each holding a copy of `model`, kept until `close` (or the end of a
    `with` block):

        with EncodingPool(model, ["cuda:0", "cuda:1"]) as pool:
            for part in corpus_parts:
                vectors = pool.run("encode_documents", part)
    """

    def __init__(self, model: nn.Module, devices: Sequence[str | torch.device]):
        self.devices = [torch.device(d) for d in devices]
        if not self.devices:
            raise ValueError("devices is empty")
        self.seconds = 0.0  # the slowest process's encoding time in the last `run`
        cpu_processes = max(1, sum(d.type == "cpu" for d in self.devices))
        cpu_threads = max(1, (os.cpu_count() or 1) // cpu_processes)
        context = torch.multiprocessing.get_context("spawn")
        self._results = context.Queue()
        self._tasks = [context.Queue() for _ in self.devices]
        transfer = cpu_copy(model)
        self._workers = [
            context.Process(
                target=_serve,
                args=(rank, device, transfer, tasks, self._results, cpu_threads),
                daemon=True,
            )
            for rank, (device, tasks) in enumerate(zip(self.devices, self._tasks))
        ]
        for worker in self._workers:
            worker.start()

    def run(self, method: str, texts: Sequence[str], *, show_progress_bar: bool | None = None, **kwargs):
        """`getattr(model, method)(texts, **kwargs)` over all processes; outputs in input order."""
        if self._workers is None:
            raise RuntimeError("the encoding pool is closed")
        texts = list(texts)
        shares = deal_by_length([len(t) for t in texts], len(self.devices))
        if any(d.type == "cuda" for d in self.devices) and "max_tokens_per_batch" not in kwargs:
            kwargs["max_tokens_per_batch"] = PROCESS_MAX_TOKENS_PER_BATCH
        for rank, (tasks, share) in enumerate(zip(self._tasks, shares)):
            progress = show_progress_bar if rank == 0 else False
            tasks.put((method, [texts[i] for i in share], {**kwargs, "show_progress_bar": progress}))
        try:
            parts = _collect(self._workers, self._results)
        except BaseException:
            self.close()
            raise
        self.seconds = max(seconds for _, seconds in parts.values())
        return _in_input_order([parts[rank][0] for rank in range(len(shares))], shares, len(texts))

    def close(self) -> None:
        if self._workers is None:
            return
        for tasks in self._tasks:
            tasks.put(None)
        for worker in self._workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        self._workers = None

    def __enter__(self) -> EncodingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def deal_by_length(lengths: Sequence[int], n_shares: int) -> list[np.ndarray]:
    """Indices dealt round robin in order of decreasing length: shares with the same mix of lengths.
    Each share is sorted (its texts keep their relative order)."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [np.sort(order[rank::n_shares]) for rank in range(n_shares)]


def cpu_copy(model: nn.Module) -> nn.Module:
    """The model itself when it is on the CPU, else a copy on the CPU (made without a second copy on
    the accelerator): what the encoding processes receive."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return model
    memo = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach().cpu(), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().cpu()
    return copy.deepcopy(model, memo)


# -- in the encoding processes -----------------------------------------------------------------------


def _serve(rank, device, model, tasks, results, cpu_threads):
    """Encode each task that comes until None does. An output is shared memory this process owns: it
    is kept until the next message, which the parent sends only after reading it."""
    output = None
    try:
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads)
        elif device.type == "cuda":
            torch.cuda.set_device(device)
        model = model.to(device)
    except BaseException:
        results.put(
            (
                rank,
                RuntimeError(
                    f"encoding process {rank} on {device} failed to start:\n{traceback.format_exc()}"
                ),
            )
        )
        return
    while (task := tasks.get()) is not None:
        method, texts, kwargs = task
        output = None
        try:
            start = time.perf_counter()
            output = _packable(getattr(model, method)(texts, **kwargs))
            results.put((rank, (output, time.perf_counter() - start)))
        except BaseException:  # reported to the parent, which raises it
            results.put(
                (rank, RuntimeError(f"encoding process {rank} on {device} failed:\n{traceback.format_exc()}"))
            )


def _packable(output):
    """An output in a form that crosses processes cheaply (tensors go through shared memory)."""
    if isinstance(output, PackedEmbeddings):
        return ("packed", _as_tensor(output.embeddings), output.offsets, torch.is_tensor(output.embeddings))
    if isinstance(output, list):
        offsets = np.zeros(len(output) + 1, dtype=np.int64)
        np.cumsum([len(item) for item in output], out=offsets[1:])
        tensors = [_as_tensor(item) for item in output]
        as_tensor = bool(output) and torch.is_tensor(output[0])
        joined = torch.cat(tensors) if tensors else torch.zeros(0)
        return ("list", joined, offsets, as_tensor)
    if isinstance(output, np.ndarray) or torch.is_tensor(output):
        return ("rows", _as_tensor(output), None, torch.is_tensor(output))
    raise TypeError(f"cannot gather an output of type {type(output).__name__} from encoding processes")


def _as_tensor(array) -> torch.Tensor:
    return array if torch.is_tensor(array) else torch.from_numpy(np.ascontiguousarray(array))


# -- back in the parent ------------------------------------------------------------------------------


def _collect(workers, results) -> dict:
    """Every worker's output by rank; a worker that failed or died is an error."""
    parts = {}
    while len(parts) < len(workers):
        try:
            rank, part = results.get(timeout=RESULT_POLL_SECONDS)
        except queue.Empty:
            dead = [r for r, w in enumerate(workers) if r not in parts and not w.is_alive()]
            if dead and results.empty():
                code = workers[dead[0]].exitcode
                raise RuntimeError(f"encoding process {dead[0]} died (exit code {code})") from None
            continue
        if isinstance(part, BaseException):
            raise part
        parts[rank] = part
    return parts


def _in_input_order(parts: list, shares: list[np.ndarray], num_texts: int):
    kind, _, _, as_tensor = parts[0]
    if kind == "rows":
        first = parts[0][1]
        out = first.new_empty((num_texts, *first.shape[1:]))
        for (_, rows, _, _), share in zip(parts, shares):
            out[torch.from_numpy(share)] = rows
        return out if as_tensor else out.numpy()
    items: list = [None] * num_texts
    for (_, joined, offsets, _), share in zip(parts, shares):
        for position, start, end in zip(share, offsets[:-1], offsets[1:]):
            items[position] = joined[start:end]
    if not as_tensor:
        items = [item.numpy() for item in items]
    if kind == "list":
        return items
    offsets = np.zeros(num_texts + 1, dtype=np.int64)
    np.cumsum([len(item) for item in items], out=offsets[1:])
    joined = torch.cat([_as_tensor(item) for item in items]) if items else torch.zeros(0)
    return PackedEmbeddings(joined if as_tensor else joined.numpy(), offsets)
