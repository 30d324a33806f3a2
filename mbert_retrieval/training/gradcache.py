"""Forward and backward of a contrastive loss, whole or with GradCache.

A contrastive loss couples every query with every document of the batch, so the batch cannot be
split into independent micro-batches. GradCache (Gao et al., 2021) makes a large batch fit anyway:
1. encode every chunk without building a graph, keeping only the representations;
2. compute the loss on the detached representations and backpropagate to them alone;
3. encode each chunk again with a graph and backpropagate its slice of those gradients.
The gradients equal those of the whole batch at once; memory holds one chunk's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Encoder = Callable[[object], torch.Tensor]


def forward_backward(
    inputs: Sequence[tuple[Encoder, Sequence]],
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    cached: bool,
) -> torch.Tensor:
    """Run the loss over `inputs`, one `(encode, chunks)` per kind of text (e.g. queries and
    documents), and backpropagate. `encode(chunk)` gives representations whose dim 0 counts the
    chunk's texts; a kind's representations are its chunks' concatenated. Returns the loss, detached.
    """
    if not cached:
        representations = [torch.cat([encode(chunk) for chunk in chunks]) for encode, chunks in inputs]
        loss = loss_fn(representations)
        loss.backward()
        return loss.detach()

    with torch.no_grad():
        representations = [torch.cat([encode(chunk) for chunk in chunks]) for encode, chunks in inputs]
    representations = [r.detach().requires_grad_() for r in representations]
    loss = loss_fn(representations)
    loss.backward()
    for (encode, chunks), cached_rep in zip(inputs, representations):
        start = 0
        for chunk in chunks:
            rep = encode(chunk)
            rep.backward(cached_rep.grad[start : start + rep.shape[0]])
            start += rep.shape[0]
    return loss.detach()
