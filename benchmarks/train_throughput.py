"""Dense-retriever training throughput: our Trainer against sentence-transformers'
SentenceTransformerTrainer + MultipleNegativesRankingLoss, on the same weights, data and batch size,
in the same run.

Data: docstring -> function pairs cut out with `ast` from the installed Python's standard library
and site-packages (query: the docstring's first paragraph; document: the function without it).
Model: ModernBERT-base shape with random weights made by `transformers` and a BPE tokenizer trained
here on those texts, saved once as a sentence-transformers folder (mean pooling, normalised) that
both load. Both train with bf16 autocast on fp32 weights, AdamW at a constant learning rate,
in-batch negatives at scale 20 (temperature 0.05), gradient clipping at 1.0, `--batch-size` pairs
per step and texts truncated to `--max-length` tokens. After `--warmup-steps`, `--steps` steps are
timed; real tokens count only the tokens of the texts (no padding). Prints a table and writes JSON:

    PYTHONPATH=. python3 benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
    PYTHONPATH=. python3 benchmarks/train_throughput.py --small     # CPU check: tiny model, few steps

`--no-compile` leaves out the row with torch.compile'd encoder layers. SentenceTransformerTrainer needs
`datasets`; where it is not installed, the same steps run in a plain loop (the JSON says which).
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import platform
import random
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from benchmarks.common import make_model_folder, sample_source_files, write_result
from mbert_retrieval import DenseRetriever
from mbert_retrieval.training import DenseTask, JsonlExamples, Trainer, TrainingArguments

MAX_PAIRS_PER_FILE = 20
LEARNING_RATE = 5e-5
TEMPERATURE = 0.05  # MultipleNegativesRankingLoss's default scale of 20


def docstring_pairs(limit: int, seed: int = 0) -> list[tuple[str, str]]:
    """(docstring first paragraph, function without its docstring) from the stdlib and site-packages,
    files in a seeded random order so both places are represented."""
    return sample_source_files(function_pair, limit, MAX_PAIRS_PER_FILE, seed, key=lambda pair: pair[0])


def function_pair(node, lines: list[str]) -> tuple[str, str] | None:
    """A documented function as (query, code): the docstring's first paragraph (3+ words) and the
    function's lines without the docstring's."""
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
        return None
    docstring = ast.get_docstring(node)
    if not docstring:
        return None
    query = " ".join(docstring.strip().split("\n\n")[0].split())
    if len(query.split()) < 3:
        return None
    doc = node.body[0]
    kept = lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return query, textwrap.dedent("\n".join(kept))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_ours(folder: Path, data: Path, args, device: torch.device, compiled: bool, tmp: Path) -> dict:
    reset_memory()
    model = DenseRetriever.from_pretrained(folder, device="cpu", dtype=torch.float32)
    training = TrainingArguments(
        output_dir=str(tmp / ("ours_compiled" if compiled else "ours")),
        max_steps=args.warmup_steps + args.steps,
        batch_size=args.batch_size,
        learning_rate=LEARNING_RATE,
        optimizer="adamw",
        warmup_steps=0,
        decay="none",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=device.type == "cuda",
        compile=compiled,
        logging_steps=1,
        seed=0,
        show_progress=False,
        save_final_model=False,
        device=str(device),
    )
    result = Trainer(DenseTask(model, temperature=TEMPERATURE), JsonlExamples(data), training).train()
    records = [
        json.loads(line) for line in (Path(training.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    timed = [r for r in records if r["step"] > args.warmup_steps]
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens_per_second"] * r["seconds"] for r in timed)
    return {
        "steps": len(timed),
        "seconds": seconds,
        "steps_per_s": len(timed) / seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_step": tokens / len(timed),
        "peak_memory_gib": peak_memory_gib(),
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
    }


def run_sentence_transformers(folder: Path, pairs, args, device: torch.device, tmp: Path) -> dict:
    """SentenceTransformerTrainer + MultipleNegativesRankingLoss; where `datasets` (which the trainer
    needs) is not installed, the same steps in a plain loop: tokenize with padding, bf16 autocast
    forward, the loss, backward, clip, AdamW."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    class CountingLoss(MultipleNegativesRankingLoss):
        """MNRL that also counts the real and padded tokens it is given."""

        real = padded = 0

        def forward(self, sentence_features, labels=None):
            for features in sentence_features:
                CountingLoss.real += int(features["attention_mask"].sum())
                CountingLoss.padded += features["attention_mask"].numel()
            return super().forward(sentence_features, labels)

    marks = []  # (time, real tokens so far, padded tokens so far) at the end of each step

    def mark() -> None:
        synchronize()
        marks.append((time.perf_counter(), CountingLoss.real, CountingLoss.padded))

    reset_memory()
    model = SentenceTransformer(str(folder), device=str(device))
    loss = CountingLoss(model, scale=1 / TEMPERATURE)
    try:
        import datasets  # noqa: F401

        baseline = "SentenceTransformerTrainer"
        train_with_trainer(model, loss, pairs, args, device, tmp, mark)
    except ImportError:
        baseline = "plain loop (datasets, which SentenceTransformerTrainer needs, is not installed)"
        train_in_loop(model, loss, pairs, args, device, mark)
    (start, real_start, padded_start), (end, real_end, padded_end) = marks[args.warmup_steps - 1], marks[-1]
    steps = len(marks) - args.warmup_steps
    row = {
        "baseline": baseline,
        "steps": steps,
        "seconds": end - start,
        "steps_per_s": steps / (end - start),
        "tokens_per_s": (real_end - real_start) / (end - start),
        "tokens_per_step": (real_end - real_start) / steps,
        "padded_tokens_per_step": (padded_end - padded_start) / steps,
        "peak_memory_gib": peak_memory_gib(),
        "attn_implementation": getattr(model[0].auto_model.config, "_attn_implementation", None),
    }
    del model, loss
    return row


def train_with_trainer(model, loss, pairs, args, device, tmp: Path, mark) -> None:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            mark()

    dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    training = SentenceTransformerTrainingArguments(
        output_dir=str(tmp / "sentence_transformers_run"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training, train_dataset=dataset, loss=loss, callbacks=[StepClock()]
    )
    trainer.train()


def train_in_loop(model, loss, pairs, args, device, mark) -> None:
    from sentence_transformers.util import batch_to_device

    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    model.train()
    for step in range(args.warmup_steps + args.steps):
        start = step * args.batch_size % (len(order) - args.batch_size + 1)
        batch = [pairs[i] for i in order[start : start + args.batch_size]]
        features = [
            batch_to_device(model.tokenize([pair[side] for pair in batch]), device) for side in (0, 1)
        ]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value = loss(features, None)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="CPU check: tiny model, few pairs and steps")
    parser.add_argument("--pairs", type=int, default=None, help="training pairs (default 20000; 400 small)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 128; 16 small)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per text (default 512; 128 small)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; 4 small)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed first steps (default 10; 2 small)"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled row")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    small = args.small
    args.pairs = args.pairs or (400 if small else 20000)
    args.batch_size = args.batch_size or (16 if small else 128)
    args.max_length = args.max_length or (128 if small else 512)
    args.steps = args.steps or (4 if small else 30)
    args.warmup_steps = args.warmup_steps or (2 if small else 10)
    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")

    start = time.perf_counter()
    pairs = docstring_pairs(args.pairs)
    print(f"{len(pairs)} docstring -> function pairs in {time.perf_counter() - start:.1f} s", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        folder = make_model_folder([t for pair in pairs for t in pair], small, args.max_length, tmp)
        print(f"tokenizer and model folder in {time.perf_counter() - start:.1f} s", flush=True)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in pairs))

        rows["sentence_transformers"] = run_sentence_transformers(folder, pairs, args, device, tmp)
        baseline = rows["sentence_transformers"]
        print(
            f"sentence_transformers ({baseline['baseline']}): {baseline['steps_per_s']:.2f} steps/s",
            flush=True,
        )
        rows["ours"] = run_ours(folder, data, args, device, compiled=False, tmp=tmp)
        print(f"ours: {rows['ours']['steps_per_s']:.2f} steps/s", flush=True)
        if device.type == "cuda" and not args.no_compile:
            rows["ours_compiled"] = run_ours(folder, data, args, device, compiled=True, tmp=tmp)
            print(f"ours_compiled: {rows['ours_compiled']['steps_per_s']:.2f} steps/s", flush=True)

    baseline = rows["sentence_transformers"]
    for row in rows.values():
        row["speedup_steps"] = row["steps_per_s"] / baseline["steps_per_s"]
        row["speedup_tokens"] = row["tokens_per_s"] / baseline["tokens_per_s"]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "sentence_transformers": __import__("sentence_transformers").__version__,
        "precision": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
        "shape": "small" if small else "base",
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "results": rows,
    }
    print(f"\n{len(pairs)} pairs, batch {args.batch_size}, max_length {args.max_length}, {result['device']}")
    print(f"{'':24}{'steps/s':>9}{'k tok/s':>9}{'tok/step':>10}{'peak GiB':>10}{'speed-up':>10}")
    for name, row in rows.items():
        memory = f"{row['peak_memory_gib']:10.1f}" if row["peak_memory_gib"] is not None else f"{'-':>10}"
        print(
            f"{name:24}{row['steps_per_s']:9.2f}{row['tokens_per_s'] / 1e3:9.1f}{row['tokens_per_step']:10.0f}"
            f"{memory}{row['speedup_tokens']:10.2f}"
        )
    write_result(result, args.out)


if __name__ == "__main__":
    main()
