"""The trainer's `--compile` on one GPU, both ways: each encoder layer compiled (`compile_layers`,
what torchrun runs use) against the whole forward as one graph (`compile_forward`, what one process
uses). Same weights, data, batches and seed, so the losses must agree; the steps per second show
how much of a step the host's work per compiled call takes.

    PYTHONPATH=. python3 benchmarks/trainer_compile_modes.py   # -> benchmarks/results/trainer_compile_modes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import train_throughput
from benchmarks.common import make_model_folder, write_result
from mbert_retrieval import ModernBert

MODES = {"compile_layers": ModernBert.compile_layers, "compile_forward": ModernBert.compile_forward}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=6000, help="docstring -> function training pairs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--warmup-steps", type=int, default=10, help="untimed steps (compilation happens here)"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--out", default="benchmarks/results/trainer_compile_modes.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("trainer_compile_modes.py needs a CUDA GPU")
    run_args = SimpleNamespace(
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    pairs = train_throughput.docstring_pairs(args.pairs)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_model_folder([text for pair in pairs for text in pair], False, args.max_length, tmp)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in pairs))
        for mode, compile_encoder in MODES.items():
            # The trainer calls compile_forward in one process; point it at this mode's method.
            ModernBert.compile_forward = compile_encoder
            torch._dynamo.reset()
            (tmp / mode).mkdir()
            started = time.perf_counter()
            rows[mode] = train_throughput.run_ours(
                folder, data, run_args, torch.device("cuda"), True, tmp / mode
            )
            rows[mode]["wall_s"] = time.perf_counter() - started
            print(f"{mode}: {rows[mode]['steps_per_s']:.2f} steps/s", flush=True)
        ModernBert.compile_forward = MODES["compile_forward"]
    lines = [
        "| mode | steps/s | k tok/s | peak GiB | first loss | last loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ] + [
        f"| {mode} | {r['steps_per_s']:.2f} | {r['tokens_per_s'] / 1e3:.0f} | {r['peak_memory_gib']:.1f} | "
        f"{r['first_loss']:.4f} | {r['last_loss']:.4f} |"
        for mode, r in rows.items()
    ]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
        "precision": "bf16 autocast, fp32 weights",
        "shape": "base",
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "rows": rows,
        "speedup": rows["compile_forward"]["steps_per_s"] / rows["compile_layers"]["steps_per_s"],
    }
    write_result(result, args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
