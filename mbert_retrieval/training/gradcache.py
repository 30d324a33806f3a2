"""Forward and backward of a contrastive loss, whole or with GradCache.

A contrastive loss couples every query with every document of the batch, so the batch cannot be
split into independent micro-batches. GradCache (Gao et al., 2021) makes a large batch fit anyway:
1. encode every chunk without building a graph, keeping only the representations;
2. compute the loss on the detached representations and backpropagate to them alone;
3. encode each chunk again with a graph and backpropagate its slice of those gradients.
The gradients equal those of the whole batch at once; memory holds one chunk's activations.
Under several processes only the last chunk's backward all-reduces (the sum of all chunks').
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mbert_retrieval.training.batching import Sequences
from mbert_retrieval.training.distributed import GradientSync
from mbert_retrieval.training.profiling import section

Encoder = Callable[[object], torch.Tensor]
Inputs = Sequence[tuple[Encoder, Sequence]]


def forward_backward(
    inputs: Inputs,
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    cached: bool,
    sync: GradientSync | None = None,
) -> torch.Tensor:
    """Run the loss over `inputs`, one `(encode, chunks)` per kind of text (e.g. queries and
    documents), and backpropagate. `encode(chunk)` gives representations whose dim 0 counts the
    chunk's texts; a kind's representations are its chunks' concatenated. `sync` runs the passes
    (through DDP under torchrun). Returns the loss, detached.
    """
    sync = sync or GradientSync()
    if not cached:
        with section("forward"):
            loss = loss_fn(sync(_encode_all, inputs))  # one forward pass, one backward
        with section("backward"):
            sync.backward(loss)
        return loss.detach()

    with torch.no_grad():
        per_chunk = [[encode(chunk) for chunk in chunks] for encode, chunks in inputs]
    representations = [torch.cat(reps).requires_grad_() for reps in per_chunk]
    loss = loss_fn(representations)
    loss.backward()
    passes = []  # (encode, chunk, the gradient of its representations)
    for (encode, chunks), reps, whole in zip(inputs, per_chunk, representations):
        grads = whole.grad.split([rep.shape[0] for rep in reps])
        passes += zip([encode] * len(chunks), chunks, grads)
    for number, (encode, chunk, grad) in enumerate(passes):
        with sync.all_reduce_if(number == len(passes) - 1):
            sync.backward(sync(encode, chunk), grad)
    return loss.detach()


def _encode_all(inputs: Inputs) -> list[torch.Tensor]:
    """Each kind's representations. Kinds encoded by the same function (a bi-encoder's queries and
    documents) go through it as one packed batch: half the passes, and so half the host's work of
    launching them, which otherwise bounds a step of a small per-GPU batch."""
    groups: dict[int, list[int]] = {}
    for number, (encode, _) in enumerate(inputs):
        groups.setdefault(id(encode), []).append(number)
    out: list[torch.Tensor | None] = [None] * len(inputs)
    for numbers in groups.values():
        encode = inputs[numbers[0]][0]
        chunks = [chunk for number in numbers for chunk in inputs[number][1]]
        if len(chunks) > 1 and _packable(chunks):
            outputs = encode(Sequences.concat(chunks)).split([len(chunk) for chunk in chunks])
        else:
            outputs = [encode(chunk) for chunk in chunks]
        for number in numbers:
            count = len(inputs[number][1])
            out[number], outputs = torch.cat(list(outputs[:count])), outputs[count:]
    return out


def _packable(chunks: Sequence) -> bool:
    return all(isinstance(chunk, Sequences) for chunk in chunks) and (
        len({tuple(sorted(chunk.per_token)) for chunk in chunks}) == 1
    )
