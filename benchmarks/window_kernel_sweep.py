"""One local layer's attention alone: our Triton window kernel's launch shapes against varlen_attn.

ModernBERT-base's shape (12 heads of 64, window 64 each side), bf16, on the encoder benchmark's
short and long variable batches. Times (median of CUDA-graph replays, so launch overhead is left
out) FlashAttention (varlen_attn) with the same window and with none, forward and forward +
backward, and each launch shape (`Tiles`) of our forward and
of our backward's two kernels (the bwd rows time the whole backward with one kernel's shape
varied); prints a table and writes JSON:

    PYTHONPATH=. python3 benchmarks/window_kernel_sweep.py --out benchmarks/results/window_kernel_sweep.json
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import recorder, run_sweep
from benchmarks.encoder_throughput import FULL
from mbert_retrieval.modeling import window_attention as kernels

HEADS, DIM, WINDOW = 12, 64, 64
FORWARD_CANDIDATES = [
    kernels.Tiles(64, 64, 4, 2),
    kernels.Tiles(64, 32, 4, 2),
    kernels.Tiles(128, 64, 8, 2),
    kernels.Tiles(32, 32, 2, 2),
]
# dk/dv: block_m queries per step against block_n keys per program; dq: the other way round
DKDV_CANDIDATES = [
    kernels.Tiles(64, 64, 4, 2),
    kernels.Tiles(64, 64, 8, 2),
    kernels.Tiles(32, 64, 4, 2),
    kernels.Tiles(32, 128, 8, 2),
]
# our global forward (modeling/global_attention.py), against varlen_global_fwd_us
GLOBAL_CANDIDATES = [
    kernels.Tiles(128, 64, 8, 3),
    kernels.Tiles(128, 64, 4, 3),
    kernels.Tiles(128, 128, 8, 3),
    kernels.Tiles(128, 32, 4, 3),
    kernels.Tiles(64, 64, 4, 3),
    kernels.Tiles(64, 128, 4, 3),
    kernels.Tiles(128, 64, 8, 4),
    kernels.Tiles(64, 32, 4, 2),
    kernels.Tiles(32, 64, 4, 3),  # less of a partial last block on short sequences
    kernels.Tiles(32, 32, 2, 3),
]
DQ_CANDIDATES = [
    kernels.Tiles(64, 64, 4, 2),
    kernels.Tiles(64, 64, 8, 2),
    kernels.Tiles(64, 32, 4, 2),
]


def varlen(q, k, v, cu, max_len, window):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(window, window))


def fwd_bwd(attend, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.autograd.grad(attend(q, k, v), (q, k, v), grad)


def tiles_name(tiles) -> str:
    return f"{tiles.block_m}x{tiles.block_n}_w{tiles.warps}_s{tiles.stages}"


def measure(lengths: list[int]) -> dict:
    device = torch.device("cuda")
    tokens = sum(lengths)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(device)
    seq = kernels.sequence_ids(cu, tokens)
    qkv = torch.randn(tokens, 3, HEADS, DIM, device=device, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)  # strided views, as the model passes them
    grad = torch.randn(tokens, HEADS, DIM, device=device, dtype=torch.bfloat16)
    max_len = max(lengths)
    row = {"tokens": tokens}

    record = recorder(row)

    for window, label in ((WINDOW, "varlen_window"), (-1, "varlen_global")):
        with torch.inference_mode():
            record(f"{label}_fwd_us", lambda w=window: varlen(q, k, v, cu, max_len, w))
        record(
            f"{label}_fwd_bwd_us",
            lambda w=window: fwd_bwd(lambda *t: varlen(*t, cu, max_len, w), q, k, v, grad),
        )

    for tiles in FORWARD_CANDIDATES:
        kernels.FORWARD = tiles
        record(f"fwd_{tiles_name(tiles)}_us", lambda: kernels.window_attention_fwd(q, k, v, cu, seq, WINDOW))
    kernels.FORWARD = FORWARD_CANDIDATES[0]
    # our kernel as global attention (a window as long as the longest sequence), for comparison
    record("fwd_as_global_us", lambda: kernels.window_attention_fwd(q, k, v, cu, seq, max_len))
    measure_global(record, q, k, v, cu, max_len)
    out, lse = kernels.window_attention_fwd(q, k, v, cu, seq, WINDOW)

    def backward():
        return kernels.window_attention_bwd(grad, q, k, v, out, lse, cu, seq, WINDOW)

    for tiles in DKDV_CANDIDATES:
        kernels.BACKWARD_DKDV = tiles
        record(f"bwd_dkdv_{tiles_name(tiles)}_us", backward)
    kernels.BACKWARD_DKDV = DKDV_CANDIDATES[0]
    for tiles in DQ_CANDIDATES:
        kernels.BACKWARD_DQ = tiles
        record(f"bwd_dq_{tiles_name(tiles)}_us", backward)
    kernels.BACKWARD_DQ = DQ_CANDIDATES[0]
    return row


def measure_global(record, q, k, v, cu, max_len: int) -> None:
    """Our global forward's launch shapes (`modeling/global_attention.py`)."""
    from mbert_retrieval.modeling import global_attention

    def attend():
        return global_attention.global_attention(q, k, v, cu, max_len)

    shipped = global_attention.tiles_for
    with torch.inference_mode():
        for tiles in GLOBAL_CANDIDATES:
            global_attention.tiles_for = lambda max_seqlen, tiles=tiles: tiles
            record(f"global_fwd_{tiles_name(tiles)}_us", attend)
        global_attention.tiles_for = shipped
        record("global_fwd_shipped_us", attend)


def main() -> None:
    run_sweep(__doc__, "window_kernel_sweep", measure, FULL)


if __name__ == "__main__":
    main()
