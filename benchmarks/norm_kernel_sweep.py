"""The residual sum + LayerNorm kernels (`modeling/fused_norm.py`) alone: launch shapes against
inductor's kernels for the same plain code.

ModernBERT-base's width (768), bf16 residual stream and update, the encoder benchmark's short and long
variable token counts. Times (median of CUDA-graph replays, so launch overhead is left out) the
forward, and the backward with the next residual's gradient, for each launch shape (`Launch`), and
`torch.compile` of `x + update; layer_norm` forward and forward + backward as the peer; prints a table
and writes JSON:

    PYTHONPATH=. python3 benchmarks/norm_kernel_sweep.py --out benchmarks/results/norm_kernel_sweep.json
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import recorder, run_sweep
from benchmarks.encoder_throughput import FULL
from mbert_retrieval.modeling import fused_norm as kernels

WIDTH, EPS = 768, 1e-5
FORWARD_CANDIDATES = [kernels.Launch(rows, rows, warps) for rows in (1, 2, 4, 8) for warps in (4, 8)]
BACKWARD_CANDIDATES = [
    kernels.Launch(rows, per_program, warps)
    for rows in (4, 8, 16)
    for per_program in (32, 64, 128)
    for warps in (4, 8)
    if per_program >= rows
]


def launch_name(launch) -> str:
    return f"r{launch.rows}_p{launch.rows_per_program}_w{launch.warps}"


def plain(x, update, weight):
    total = x + update
    return total, F.layer_norm(total, (WIDTH,), weight, eps=EPS)


def measure(tokens: int) -> dict:
    device = torch.device("cuda")
    x, update, grad_normed, grad_total = (
        torch.randn(tokens, WIDTH, device=device, dtype=torch.bfloat16) for _ in range(4)
    )
    weight = torch.rand(WIDTH, device=device) + 0.5
    row = {"tokens": tokens}

    record = recorder(row)

    compiled = torch.compile(plain, dynamic=False)
    with torch.no_grad():
        record("inductor_fwd_us", lambda: compiled(x, update, weight))

    def inductor_fwd_bwd():
        inputs = [t.detach().requires_grad_() for t in (x, update, weight)]
        outputs = compiled(*inputs)
        torch.autograd.grad(outputs, inputs, (grad_total, grad_normed))

    record("inductor_fwd_bwd_us", inductor_fwd_bwd)
    if "inductor_fwd_us" in row and "inductor_fwd_bwd_us" in row:  # what our backward rows compare with
        row["inductor_bwd_us_by_difference"] = row["inductor_fwd_bwd_us"] - row["inductor_fwd_us"]
    for launch in FORWARD_CANDIDATES:
        kernels.FORWARD = launch
        record(
            f"fwd_{launch_name(launch)}_us", lambda: kernels.add_layer_norm_forward_op(x, update, weight, EPS)
        )
    kernels.FORWARD = FORWARD_CANDIDATES[0]
    total, _, mean, rstd = kernels.add_layer_norm_forward_op(x, update, weight, EPS)
    for launch in BACKWARD_CANDIDATES:
        kernels.BACKWARD = launch
        record(
            f"bwd_{launch_name(launch)}_us",
            lambda: kernels.add_layer_norm_backward_op(total, weight, mean, rstd, grad_normed, grad_total),
        )
    return row


def main() -> None:
    shipped = {"forward": launch_name(kernels.FORWARD), "backward": launch_name(kernels.BACKWARD)}
    run_sweep(__doc__, "norm_kernel_sweep", lambda lengths: measure(sum(lengths)), FULL, shipped)


if __name__ == "__main__":
    main()
