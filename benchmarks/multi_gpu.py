"""Two GPUs against one: training under torchrun, encoding with one process per GPU, and indexing a
corpus in shards, all in one run on the 2-GPU machine.

Data: docstring -> function pairs cut out with `ast` from the installed Python's standard library and
site-packages (benchmarks/train_throughput.py). Model: ModernBERT-base shape with random weights and a
BPE tokenizer trained here on those texts (benchmarks/common.py), bf16 on the GPUs.

- train: `torchrun --standalone --nproc-per-node 1` and `2` of `mbert-retrieval train dense --compile`, global
  batch 256, max length 256, the same seed; after `--warmup-steps` logged steps, tokens/s over the next
  `--steps` from the trainer's metrics.jsonl, and the largest difference between the two runs' per-step
  losses.
- encode: the same documents through an `EncodingPool` of one and of two GPUs (after a warm-up call),
  docs/s of the whole call (sharing out the texts and gathering the vectors included).
- sharded_index: `torchrun --nproc-per-node 2 -m mbert_retrieval.cli index` (two shards, then rank 0
  merges) against `mbert-retrieval index` in one process, same settings: seconds of the sharded run and
  the recall of its top 10 against the single-process index's top 10. The index is FAISS IVF-PQ when
  faiss is installed, else PLAID over a ColBERT head (the JSON says which), on the shipped model's encoder.

    PYTHONPATH=. python3 benchmarks/multi_gpu.py            # 2 GPUs -> benchmarks/results/multi_gpu.json
    PYTHONPATH=. python3 benchmarks/multi_gpu.py --quick    # CPU check: tiny model, 2 CPU processes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import make_model_folder
from benchmarks.train_throughput import docstring_pairs

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH, MAX_LENGTH = 256, 256


# Each setting's value for the --quick CPU check and for the real run, side by side.
SETTINGS = {
    "batch": (16, GLOBAL_BATCH),
    "max_length": (64, MAX_LENGTH),
    "warmup": (1, 10),
    "steps": (2, 60),
    "encode_docs": (200, 120000),
    "index_docs": (260, 10000),
    "queries": (20, 200),
}


def settings(quick: bool) -> dict:
    return {name: quick_value if quick else value for name, (quick_value, value) in SETTINGS.items()}


def subprocess_environment(quick: bool) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    if quick:
        environment["OMP_NUM_THREADS"] = "1"
    return environment


def run(command: list[str], quick: bool) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, env=subprocess_environment(quick), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"command failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


# -- training ----------------------------------------------------------------------------------------


def train_run(
    nproc: int, model_dir: Path, pairs_file: Path, output: Path, s: dict, quick: bool
) -> list[dict]:
    command = torchrun(nproc) + [
        "-m", "mbert_retrieval.cli", "train", "dense", str(model_dir), str(pairs_file),
        "--output-dir", str(output), "--batch-size", str(s["batch"]), "--max-length", str(s["max_length"]),
        "--max-steps", str(s["warmup"] + s["steps"]), "--seed", "0", "--logging-steps", "1",
        "--warmup-steps", "0", "--decay", "none",
    ]  # fmt: skip
    command += ["--device", "cpu", "--no-bf16"] if quick else ["--bf16", "--compile"]
    run(command, quick)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r and "tokens_per_second" in r]


def tokens_per_second(records: list[dict], warmup: int) -> float:
    timed = [r for r in records if r["step"] > warmup]
    tokens = sum(r["tokens_per_second"] * r["seconds"] for r in timed)
    return tokens / sum(r["seconds"] for r in timed)


def train_part(model_dir: Path, pairs_file: Path, work: Path, s: dict, quick: bool) -> dict:
    one = train_run(1, model_dir, pairs_file, work / "train-1", s, quick)
    two = train_run(2, model_dir, pairs_file, work / "train-2", s, quick)
    losses_one = {r["step"]: r["loss"] for r in one}
    losses_two = {r["step"]: r["loss"] for r in two}
    common = sorted(set(losses_one) & set(losses_two))
    one_tok_s, two_tok_s = tokens_per_second(one, s["warmup"]), tokens_per_second(two, s["warmup"])
    return {
        "one_gpu_tok_s": round(one_tok_s),
        "two_gpu_tok_s": round(two_tok_s),
        "speedup": round(two_tok_s / one_tok_s, 3),
        "loss_max_abs_diff": max(abs(losses_one[i] - losses_two[i]) for i in common),
    }


# -- encoding ----------------------------------------------------------------------------------------


def encode_part(model_dir: Path, docs: list[str], quick: bool) -> dict:
    from mbert_retrieval import DenseRetriever
    from mbert_retrieval.models.processes import EncodingPool

    model = DenseRetriever.from_pretrained(model_dir, device="cpu" if quick else "cuda:0")
    rates, outputs = {}, {}
    for n, devices in ((1, ["cuda:0"]), (2, ["cuda:0", "cuda:1"])):
        if quick:
            devices = ["cpu"] * n
        with EncodingPool(model, devices) as pool:
            pool.run("encode_documents", docs[: max(1, len(docs) // 20)])  # start-up: CUDA, kernels
            start = time.perf_counter()
            outputs[n] = pool.run("encode_documents", docs)
            rates[n] = len(docs) / (time.perf_counter() - start)
        print(f"encode on {devices}: {rates[n]:,.0f} docs/s", flush=True)
    difference = float(np.abs(outputs[1] - outputs[2]).max())
    print(f"largest difference between the 1- and 2-process vectors: {difference:.2e}", flush=True)
    return {
        "one_gpu_docs_s": round(rates[1], 1),
        "two_gpu_docs_s": round(rates[2], 1),
        "speedup": round(rates[2] / rates[1], 3),
    }


# -- indexing in shards ------------------------------------------------------------------------------


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def sharded_index_part(model_dir: Path, pairs, work: Path, s: dict, kind: str, quick: bool) -> dict:
    from mbert_retrieval.models.dense import default_model_dir
    from mbert_retrieval.search.retriever import Retriever

    if kind == "auto":
        kind = "ivfpq" if has_faiss() else "plaid"
    # the shipped (trained) encoder where there is one: a random model's rankings are near-ties, which
    # the bf16 noise between any two encodings of the corpus reorders
    model_dir = default_model_dir() or model_dir
    system = str(model_dir)
    if kind == "plaid":
        from mbert_retrieval.models.colbert import ColBERT

        system = str(work / "colbert")
        ColBERT.from_pretrained(model_dir, device="cpu").save_pretrained(system)
    corpus = work / "corpus.jsonl"
    docs = pairs[: s["index_docs"]]
    corpus.write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": d}) + "\n" for i, (_, d) in enumerate(docs))
    )
    queries = [q for q, _ in docs[:: max(1, len(docs) // s["queries"])]][: s["queries"]]
    device = ["--device", "cpu"] if quick else []
    base = ["-m", "mbert_retrieval.cli", "index", "--data", str(corpus), "--system", system, "--index", kind]
    base += ["--no-progress", *device]
    run([sys.executable, *base, "--output", str(work / "single")], quick)
    start = time.perf_counter()
    run(torchrun(2) + [*base, "--output", str(work / "sharded")], quick)
    seconds = time.perf_counter() - start
    search_device = "cpu" if quick else "cuda:0"
    found = {}
    for name in ("single", "sharded"):
        retriever = Retriever.load(work / name, device=search_device)
        found[name] = [[h.id for h in hits] for hits in retriever.search(queries, k=10)]
    overlap = sum(len(set(a) & set(b)) for a, b in zip(found["sharded"], found["single"]))
    recall = overlap / sum(len(b) for b in found["single"])
    return {
        "index": kind,
        "model": Path(model_dir).name,
        "docs": len(docs),
        "seconds": round(seconds, 1),
        "recall_vs_single_process": recall,
    }


# -- the run -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="CPU check: tiny model, 2 CPU processes, few steps"
    )
    parser.add_argument(
        "--index", default="auto", choices=["auto", "ivfpq", "plaid"], help="sharded index kind"
    )
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/multi_gpu.json)")
    args = parser.parse_args()
    s = settings(args.quick)
    gpus = torch.cuda.device_count()
    if not args.quick and gpus < 2:
        sys.exit(f"this benchmark needs 2 GPUs, found {gpus} (use --quick for a CPU check)")
    out = Path(
        args.out or ("/tmp/multi_gpu_quick.json" if args.quick else "benchmarks/results/multi_gpu.json")
    )

    started = time.perf_counter()
    n_pairs = max((s["warmup"] + s["steps"]) * s["batch"], s["encode_docs"], s["index_docs"])
    pairs = docstring_pairs(n_pairs)
    print(f"{len(pairs)} docstring -> function pairs in {time.perf_counter() - started:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = [text for pair in pairs for text in pair]
        model_dir = make_model_folder(texts, args.quick, s["max_length"], work)
        pairs_file = work / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in pairs))
        docs = [d for _, d in pairs]
        docs = (docs * (s["encode_docs"] // len(docs) + 1))[: s["encode_docs"]]

        result = {
            "device": "cpu (quick check)" if args.quick else torch.cuda.get_device_name(0),
            "gpus": 2 if args.quick else gpus,
            "command": "PYTHONPATH=. python3 " + " ".join(["benchmarks/multi_gpu.py", *sys.argv[1:]]),
        }
        # written after each part, so a run cut short keeps what it measured
        result["train"] = train_part(model_dir, pairs_file, work, s, args.quick)
        write_json(result, out)
        result["encode"] = encode_part(model_dir, docs, args.quick)
        write_json(result, out)
        sharded = sharded_index_part(model_dir, pairs, work, s, args.index, args.quick)
        result["sharded_index"] = sharded
        write_json(result, out)

    print_table(result, sharded["index"], time.perf_counter() - started)
    print(f"wrote {out}")


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def print_table(result: dict, index_kind: str, seconds: float) -> None:
    train, encode, index = result["train"], result["encode"], result["sharded_index"]
    print(
        f"\n{result['device']}, {result['gpus']} GPUs, {platform.python_version()}, whole run {seconds:.0f} s"
    )
    print("| workload | 1 GPU | 2 GPUs | speedup |")
    print("| --- | --- | --- | --- |")
    print(
        f"| train dense (tok/s) | {train['one_gpu_tok_s']:,} | {train['two_gpu_tok_s']:,} | {train['speedup']:.2f}x |"
    )
    print(
        f"| encode (docs/s) | {encode['one_gpu_docs_s']:,} | {encode['two_gpu_docs_s']:,} | {encode['speedup']:.2f}x |"
    )
    print(f"losses, 1 vs 2 GPUs: largest difference {train['loss_max_abs_diff']:.2e}")
    print(
        f"sharded index ({index_kind}, 2 ranks + merge): {index['docs']} docs in {index['seconds']} s, "
        f"recall@10 vs one process {index['recall_vs_single_process']:.4f}"
    )


if __name__ == "__main__":
    main()
