"""How far the host bounds one rank's training step, measured on one GPU.

Under torchrun with R GPUs each rank trains on 1/R of the global batch but launches as many kernels
per step as one GPU on the whole batch. This runs `mbert-retrieval train dense` (eager, or
`--compile`; bf16, base shape, real docstring -> function pairs, max length 256) on one GPU at the
global batch and at one rank's share of it. `share_scaling` = R x tokens/s at the share / tokens/s at the whole batch is the
speed-up R GPUs could reach with free communication: R when the step is bound by the GPU, less
when the host's launches bound the smaller step.

`--code NAME=DIR` (repeatable) runs the same measurement on other source trees, taking turns, e.g.
to compare a change against the commit before it:

    git worktree add /tmp/before HEAD~1
    PYTHONPATH=. python3 benchmarks/rank_share.py --code before=/tmp/before --code after=.

Each tree first trains once untimed (filling Triton's kernel cache). Prints a table and writes
benchmarks/results/rank_share.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import make_model_folder, write_result
from benchmarks.multi_gpu import tokens_per_second, train_run
from benchmarks.train_throughput import docstring_pairs

MAX_LENGTH = 256


def train_tokens_per_second(
    code: Path, model_dir: Path, pairs_file: Path, output: Path, batch: int, a
) -> dict:
    settings = {"batch": batch, "max_length": MAX_LENGTH, "warmup": a.warmup, "steps": a.steps, "logging": 10}
    records = train_run(
        1, model_dir, pairs_file, output, settings, argparse.Namespace(quick=False), a.compile,
        environment={"PYTHONPATH": str(code)},
    )  # fmt: skip
    return {"tok_s": round(tokens_per_second(records, a.warmup)), "losses": [r["loss"] for r in records]}


def parse_code(values: list[str]) -> dict[str, Path]:
    trees = {}
    for value in values or ["current=."]:
        name, _, directory = value.partition("=")
        if not directory or not (Path(directory) / "mbert_retrieval").is_dir():
            sys.exit(f"--code wants NAME=DIR with DIR holding mbert_retrieval/, got {value!r}")
        trees[name] = Path(directory).resolve()
    return trees


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", action="append", help="NAME=DIR of a source tree (repeatable)")
    parser.add_argument("--batch", type=int, default=256, help="global batch (pairs)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks sharing the global batch")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--compile", action="store_true", help="train with compiled layers instead of eagerly"
    )
    parser.add_argument("--out", default="benchmarks/results/rank_share.json")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    trees = parse_code(a.code)
    share = a.batch // a.ranks
    pairs = docstring_pairs((a.warmup + a.steps) * a.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_model_folder([t for pair in pairs for t in pair], False, MAX_LENGTH, work)
        pairs_file = work / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in pairs))
        for name, code in trees.items():
            # Untimed: fills Triton's kernel cache, so that no compilation falls in a timed step
            # (the first run on a fresh machine measured half the speed of the next).
            train_tokens_per_second(code, model_dir, pairs_file, work / f"{name}-fill", share, a)
        for repeat in range(a.repeats):
            for name, code in trees.items():
                for batch in (a.batch, share):
                    started = time.perf_counter()
                    output = work / f"{name}-{batch}-{repeat}"
                    measured = train_tokens_per_second(code, model_dir, pairs_file, output, batch, a)
                    row = {"code": name, "batch": batch, "repeat": repeat, **measured}
                    row["seconds"] = round(time.perf_counter() - started, 1)
                    rows.append(row)
                    print({k: v for k, v in row.items() if k != "losses"}, flush=True)
    summary = {}
    for name in trees:
        whole = statistics.median(r["tok_s"] for r in rows if r["code"] == name and r["batch"] == a.batch)
        part = statistics.median(r["tok_s"] for r in rows if r["code"] == name and r["batch"] == share)
        summary[name] = {
            "whole_batch_tok_s": round(whole),
            "share_tok_s": round(part),
            "share_scaling": round(a.ranks * part / whole, 3),
        }
    result = {
        "device": torch.cuda.get_device_name(0),
        "command": "PYTHONPATH=. python3 " + " ".join(["benchmarks/rank_share.py", *sys.argv[1:]]),
        "global_batch": a.batch,
        "ranks": a.ranks,
        "share_batch": share,
        "mode": "compiled" if a.compile else "eager",
        "summary": summary,
        "runs": rows,
    }
    header = f"| code | {a.batch} pairs tok/s | {share} pairs tok/s | share scaling (of {a.ranks}) |"
    table = [header, "| --- | --- | --- | --- |"]
    for name, s in summary.items():
        table.append(
            f"| {name} | {s['whole_batch_tok_s']:,} | {s['share_tok_s']:,} | {s['share_scaling']:.2f}x |"
        )
    write_result(result, a.out, "\n".join(table))


if __name__ == "__main__":
    main()
