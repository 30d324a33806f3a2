"""Several processes (torchrun): setup, gradient-correct all-gather, and gradient all-reduce.

Each rank computes its share of the loss, scaled so the shares add up to the global batch's mean
loss. Gradients are therefore summed across ranks, not averaged. The all-gather used for
cross-device negatives passes gradients back correctly: every rank's loss depends on every rank's
embeddings, so the backward sums the gathered gradient over ranks before taking the local slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

REDUCE_BUCKET_ELEMENTS = 1 << 25  # gradients are all-reduced in flat buckets of this many elements


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_distributed(device: str | None = None) -> tuple[World, torch.device]:
    """The process group from torchrun's environment (a single process without it), and the device:
    `cuda:<local rank>` on GPUs, else `device` or the CPU. NCCL on CUDA, gloo on the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if device is None:
        device = f"cuda:{local_rank}" if cuda else "cpu"
    elif cuda and size > 1:
        device = f"cuda:{local_rank}"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local_rank), device
    return World(), device


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0 (sizes may differ); gradients flow back to each
    rank's own part, summed over every rank's use of it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, in rank order (other dims must match).
    A single process gets its tensor back."""
    if not current_world().distributed:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_max(value: int, device: torch.device) -> int:
    if not current_world().distributed:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left as it is)."""
    if not current_world().distributed:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients(parameters) -> None:
    """Sum every parameter's gradient over ranks, a few large flat buckets at a time."""
    if not current_world().distributed:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for group in by_dtype.values():
        bucket: list[torch.Tensor] = []
        filled = 0
        for grad in group:
            bucket.append(grad)
            filled += grad.numel()
            if filled >= REDUCE_BUCKET_ELEMENTS:
                _reduce_bucket(bucket)
                bucket, filled = [], 0
        if bucket:
            _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def barrier() -> None:
    if current_world().distributed:
        dist.barrier()


def broadcast_object(value):
    """Rank 0's value on every rank."""
    if not current_world().distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
