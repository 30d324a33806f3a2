"""One local layer's attention alone: our Triton window kernel's launch shapes against varlen_attn.

ModernBERT-base's shape (12 heads of 64, window 64 each side), bf16, on the encoder benchmark's
short and long variable batches. Times the forward, and forward + backward, of each launch shape
(`Tiles`) and of FlashAttention (varlen_attn) with the same window and with none; prints a table and
writes JSON:

    PYTHONPATH=. python3 benchmarks/window_kernel_sweep.py --out benchmarks/results/window_kernel_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.encoder_throughput import FULL, time_call
from mbert_retrieval.modeling import window_attention as kernels

HEADS, DIM, WINDOW = 12, 64, 64
CANDIDATES = [
    kernels.Tiles(64, 64, 4, 2),
    kernels.Tiles(64, 64, 4, 3),
    kernels.Tiles(128, 64, 8, 2),
    kernels.Tiles(64, 32, 4, 2),
    kernels.Tiles(32, 64, 4, 2),
    kernels.Tiles(128, 32, 8, 2),
]


def varlen(q, k, v, cu, max_len, window):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(window, window))


def fwd_bwd(attend, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.autograd.grad(attend(q, k, v), (q, k, v), grad)


def measure(lengths: list[int], repeat: int) -> dict:
    device = torch.device("cuda")
    tokens = sum(lengths)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(device)
    qkv = torch.randn(tokens, 3, HEADS, DIM, device=device, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)  # strided views, as the model passes them
    grad = torch.randn(tokens, HEADS, DIM, device=device, dtype=torch.bfloat16)
    max_len = max(lengths)
    row = {"tokens": tokens}

    def timed(name, attend):
        with torch.inference_mode():
            row[f"{name}_fwd_us"] = 1e6 * time_call(lambda: attend(q, k, v), device, 3, repeat)
        row[f"{name}_fwd_bwd_us"] = 1e6 * time_call(lambda: fwd_bwd(attend, q, k, v, grad), device, 3, repeat)

    timed("varlen_window", lambda q, k, v: varlen(q, k, v, cu, max_len, WINDOW))
    timed("varlen_global", lambda q, k, v: varlen(q, k, v, cu, max_len, -1))
    for tiles in CANDIDATES:
        kernels.FORWARD = kernels.BACKWARD_DKDV = kernels.BACKWARD_DQ = tiles
        name = f"triton_{tiles.block_m}x{tiles.block_n}_w{tiles.warps}_s{tiles.stages}"
        try:
            timed(name, lambda q, k, v: kernels.window_attention(q, k, v, cu, WINDOW))
        except Exception as err:  # a launch shape that does not fit is reported, not fatal
            row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:300]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/window_kernel_sweep.json"))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(1)
    results = {"device": torch.cuda.get_device_name(), "command": "python3 " + " ".join(sys.argv)}
    for workload in FULL:
        if workload.mean is not None:
            results[workload.name] = measure(workload.lengths(generator), args.repeat)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    for name, row in results.items():
        if isinstance(row, dict):
            print(f"\n{name} ({row['tokens']} tokens): us per call, fwd / fwd+bwd")
            for key in row:
                if key.endswith("_fwd_us"):
                    base = key[: -len("_fwd_us")]
                    print(f"  {base:28s} {row[key]:8.1f} {row.get(base + '_fwd_bwd_us', float('nan')):8.1f}")


if __name__ == "__main__":
    main()
