"""Several processes (torchrun): setup, gradient synchronisation through DistributedDataParallel,
and the all-gather with gradients used for cross-device negatives.

Each rank computes its share of the loss, scaled so the shares add up to the global batch's mean
loss. Gradients are therefore summed across ranks, not averaged: DDP's all-reduce averages (in its
own C++ reducer, with no Python on the backward's path), so `GradientSync.backward` multiplies by
the number of ranks first. The all-gather passes gradients back correctly: every rank's loss
depends on every rank's embeddings, so the backward sums the gathered gradient over ranks before
taking the local slice.
Together they give the gradients of one process on the whole batch.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


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


def shutdown_distributed() -> None:
    """Leave the process group (every rank, once training is done), if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


# -- gradients: DistributedDataParallel --------------------------------------------------------------


class _ModelPass(torch.nn.Module):
    """The model as DDP's module. Its forward runs whatever function of the model a task calls
    (`forward_packed`, `encoder.forward_packed` then `project`, ...), so every pass goes through
    DDP's forward, which is what arms the all-reduce of the following backward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, function: Callable[..., T], *args, **kwargs) -> T:
        return function(*args, **kwargs)


class GradientSync:
    """Runs a task's forward passes and decides which backward passes all-reduce gradients.

    Under torchrun the model is wrapped in `DistributedDataParallel`: gradients are all-reduced in
    buckets while the backward still runs. A step with several backward passes (GradCache chunks,
    accumulated batches) runs all but its last under `all_reduce_if(False)`, so they accumulate
    locally and the last backward all-reduces the sum once. A single process runs passes plainly.

    The synced backward must reach every trained parameter (DDP waits for each bucket to fill).
    """

    def __init__(self, ddp: DistributedDataParallel | None = None):
        self.ddp = ddp

    @classmethod
    def wrap(cls, model: torch.nn.Module) -> GradientSync:
        """DDP around `model` (on its device) when several processes train, else plain passes.
        DDP starts every rank from rank 0's weights (new heads are random)."""
        if not current_world().distributed:
            return cls()
        # gradient_as_bucket_view: gradients live in DDP's buckets, saving a copy and their memory
        ddp = DistributedDataParallel(_ModelPass(model), gradient_as_bucket_view=True)
        return cls(ddp)

    def release(self) -> None:
        """Drop the DDP wrapper once training is done, before the process group is destroyed.

        Left for later, DDP's reducer would hold the last reference to a destroyed gloo group, and
        freeing it from Python blocks on the group's worker threads while holding the GIL, which
        one of them may need to free a tensor: a hang at exit (seen in a CPU test of two ranks)."""
        if self.ddp is not None:
            self.ddp = None
            gc.collect()  # DDP's hooks and modules form reference cycles

    def __call__(self, function: Callable[..., T], *args, **kwargs) -> T:
        """`function(*args, **kwargs)`: a forward pass of the model whose backward DDP all-reduces."""
        if self.ddp is None:
            return function(*args, **kwargs)
        return self.ddp(function, *args, **kwargs)

    def backward(self, output: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """`output.backward(grad)` for an output of a pass run through `self`. Under DDP, which
        averages gradients over ranks, the gradient is multiplied by the number of ranks so that
        they add up instead (exact for powers of two)."""
        if self.ddp is not None:
            scale = dist.get_world_size()
            if grad is None:
                output = output * scale
            else:
                grad = grad * scale
        output.backward(grad)

    def all_reduce_if(self, condition: bool) -> contextlib.AbstractContextManager:
        """Passes (forward and backward) run inside all-reduce gradients only when `condition`;
        otherwise they accumulate locally until a pass that does. Inside an enclosing
        `all_reduce_if(False)` nothing all-reduces, whatever `condition` is."""
        if self.ddp is None or condition:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


# -- collectives -------------------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0 (sizes may differ); gradients flow back to each
    rank's own part, summed over every rank's use of it. (Our own: torch.distributed.nn's gather
    is deprecated in favour of private functional collectives that change between releases.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
        if sizes is None:
            sizes = _gather_sizes(tensor.shape[0], tensor.device)
        elif sizes[dist.get_rank()] != tensor.shape[0]:
            raise ValueError(f"this rank gathers {tensor.shape[0]} rows, not the {sizes} it was told")
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, in rank order (other dims must match; dim 0
    may differ). `sizes`, each rank's dim 0 when the caller knows them, saves exchanging them (and
    the host's wait for it). A single process gets its tensor back."""
    if not current_world().distributed:
        return tensor
    return _GatherWithGrad.apply(tensor, None if sizes is None else list(sizes))


def _gather_sizes(size: int, device: torch.device) -> list[int]:
    mine = torch.tensor([size], device=device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


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


def barrier() -> None:
    if current_world().distributed:
        dist.barrier()


def gather_object(value) -> list | None:
    """Every rank's value, in rank order, on rank 0 (None elsewhere)."""
    if not current_world().distributed:
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_object(value):
    """Rank 0's value on every rank."""
    if not current_world().distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
