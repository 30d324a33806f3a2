"""StableAdamW, the warmup-stable-decay learning-rate schedule, and batch-size warmup.

StableAdamW (Wortsman et al., 2023, "Stable and low-precision training for large-scale
vision-language models") is AdamW whose step for each tensor is scaled down by the root mean
square of g^2 / v_hat when that exceeds 1: a sudden gradient spike, which Adam's slow second moment
has not seen yet, cannot make a huge update. ModernBERT was pretrained with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping; weight decay is decoupled (`p -= lr * wd * p`).

    Moments are kept in float32 whatever the parameter dtype.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"invalid StableAdamW settings: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}"
            )
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                second = exp_avg_sq / (1 - beta2 ** state["step"])
                # The update clip: RMS of g^2 / v_hat, as a tensor so no host sync is needed.
                rms = (grad.square() / second.clamp(min=group["eps"] ** 2)).mean().sqrt()
                lr = group["lr"] / rms.clamp(min=1.0)
                first = exp_avg / (1 - beta1 ** state["step"])
                update = first / (second.sqrt() + group["eps"]) + group["weight_decay"] * param.float()
                param.sub_((lr * update).to(param.dtype))
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and embeddings are left alone."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and "embeddings" not in name
        (decay if is_matrix else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "stable_adamw":
        return StableAdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    if name == "adamw":
        # one fused kernel for every tensor on CUDA (fewer launches than the per-tensor default)
        fused = all(p.is_cuda for group in groups for p in group["params"]) or None
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    raise ValueError(f"optimizer must be 'adamw' or 'stable_adamw', got {name!r}")


Decay = Literal["1-sqrt", "linear", "cosine", "none"]


@dataclass(frozen=True)
class WarmupStableDecay:
    """Linear warmup to `peak_lr`, a constant stage, then a decay over the last `decay_steps` steps
    to `min_lr`. "1-sqrt" decay (Hägele et al., 2024) is lr = peak * (1 - sqrt(progress)); a
    fine-tuning run with `decay_steps = total - warmup` and "linear" is the usual linear schedule."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_steps: int = 0
    decay: Decay = "1-sqrt"
    min_lr: float = 0.0

    def __post_init__(self):
        if self.decay not in ("1-sqrt", "linear", "cosine", "none"):
            raise ValueError(f"decay must be '1-sqrt', 'linear', 'cosine' or 'none', got {self.decay!r}")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup ({self.warmup_steps}) + decay ({self.decay_steps}) steps exceed the "
                f"{self.total_steps} training steps"
            )

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_start = self.total_steps - self.decay_steps
        if self.decay == "none" or step < decay_start:
            return self.peak_lr
        progress = min(1.0, (step - decay_start + 1) / self.decay_steps)
        shape = {
            "1-sqrt": 1 - math.sqrt(progress),
            "linear": 1 - progress,
            "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
        }[self.decay]
        return self.min_lr + (self.peak_lr - self.min_lr) * shape


@dataclass(frozen=True)
class BatchSizeWarmup:
    """Tokens per batch growing linearly from `start_tokens` to `final_tokens` over `warmup_batches`
    batches, in whole multiples of `multiple` (the sequence length)."""

    start_tokens: int
    final_tokens: int
    warmup_batches: int
    multiple: int = 1

    def __post_init__(self):
        if not 0 < self.start_tokens <= self.final_tokens:
            raise ValueError(
                f"batch-size warmup must grow: start {self.start_tokens} tokens, final {self.final_tokens}"
            )

    def __call__(self, batch: int) -> int:
        if batch >= self.warmup_batches:
            return self.final_tokens
        tokens = self.start_tokens + (self.final_tokens - self.start_tokens) * batch / self.warmup_batches
        return max(self.multiple, int(tokens) // self.multiple * self.multiple)
