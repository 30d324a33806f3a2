"""Two GPUs against one: training under torchrun, encoding with one process per GPU, and indexing a
corpus in shards, all in one run on the 2-GPU machine.

Data: docstring -> function pairs cut out with `ast` from the installed Python's standard library and
site-packages (benchmarks/train_throughput.py). Model: ModernBERT-base shape with random weights and a
BPE tokenizer trained here on those texts (benchmarks/common.py), bf16 on the GPUs.

- train: `torchrun --standalone --nproc-per-node 1` and `2` of `mbert-retrieval train dense`, with
  `--compile` and eager (`--modes`; the last one listed, by default eager, is the headline), global
  batch 256, max length 256, the same seed, `--logging-steps 10`; tokens/s over the steps after
  `--warmup-steps`, from the trainer's metrics.jsonl (with `--train-repeats N`, N runs of each taking
  turns, and their medians: figures vary from run to run by more than many changes gain), and the
  largest difference between the first two runs' logged losses (each mode starts from caches
  filled by an untimed run, so no compilation falls in the timed steps; compiled runs also report
  `recompiles_in_timed_steps`, the graphs dynamo compiled after the warm-up on rank 0, from the
  trainer's `compiled_graphs`; with `--compile` the trainer compiles the whole forward in one
  process and each layer under 2, so the compiled pair compares each setting's own best); then
  (`--profile`, the
  default) a few steps of the headline mode on 1 and on 2 GPUs under torch.profiler (MBERT_RETRIEVAL_PROFILE):
  per rank, ms per step of wall time, GPU busy time, NCCL kernels and host time in data, forward,
  backward, optimizer and the loss sync. Also how fast one host process builds global batches (read,
  tokenize, pack), which bounds any run's tokens/s.
- encode: the same documents through an `EncodingPool` of one and of two GPUs (after a warm-up call),
  docs/s of the whole call (sharing out the texts and gathering the vectors included).
- sharded_index: `torchrun --nproc-per-node 2 -m mbert_retrieval.cli index` (two shards, then rank 0
  merges) against `mbert-retrieval index` in one process, for the exact index (flat: every document
  scored, exhaustive MaxSim for ColBERT) and an approximate one (FAISS IVF-PQ when faiss is installed,
  else PLAID over a ColBERT head), on the shipped model's encoder. `recall_vs_single_process` is the
  exact pair's (the merge: identical top 10s up to the bf16 noise between the two encodings); each
  approximate build is also scored against the exact top 10 of the same encoding.

    PYTHONPATH=. python3 benchmarks/multi_gpu.py            # 2 GPUs -> benchmarks/results/multi_gpu.json
    PYTHONPATH=. python3 benchmarks/multi_gpu.py --quick    # CPU check: tiny model, 2 CPU processes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import make_model_folder, write_result
from benchmarks.train_throughput import docstring_pairs

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH, MAX_LENGTH = 256, 256
PROFILE_VARIABLE = "MBERT_RETRIEVAL_PROFILE"  # mbert_retrieval.training.profiling
# seconds of each phase on 2 H200s (eager), from the previous runs, printed before the run starts
EXPECTED_SECONDS = {
    "pairs": 30, "model": 20, "train": 3 * 45 + 3 * 30, "profile": 2 * 50, "encode": 45, "index": 4 * 28,
}  # fmt: skip


# Each setting's value for the --quick CPU check and for the real run, side by side.
SETTINGS = {
    "batch": (16, GLOBAL_BATCH),
    "max_length": (64, MAX_LENGTH),
    "warmup": (2, 10),
    "steps": (2, 30),
    "logging": (2, 10),  # --logging-steps: tokens/s per window of this many steps, losses at their ends
    "encode_docs": (200, 60000),
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


def run(command: list[str], quick: bool, environment: dict | None = None) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    environment = {**subprocess_environment(quick), **(environment or {})}
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"command failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


@contextlib.contextmanager
def phase(phases: dict, name: str):
    """Time a phase of the run into `phases` (seconds) and print it."""
    start = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - start, 1)
    print(f"[{name}: {phases[name]:.0f} s]", flush=True)


# -- training ----------------------------------------------------------------------------------------


def train_run(
    nproc: int,
    model_dir: Path,
    pairs_file: Path,
    output: Path,
    s: dict,
    options: argparse.Namespace,
    compiled: bool,
    max_steps: int | None = None,
    profile_dir: Path | None = None,
    environment: dict | None = None,
) -> list[dict]:
    """`mbert-retrieval train dense` under torchrun; the metrics records that carry a loss and a
    speed. `environment` adds to the subprocess's (e.g. PYTHONPATH for another source tree)."""
    command = torchrun(nproc) + [
        "-m", "mbert_retrieval.cli", "train", "dense", str(model_dir), str(pairs_file),
        "--output-dir", str(output), "--batch-size", str(s["batch"]), "--max-length", str(s["max_length"]),
        "--max-steps", str(max_steps or s["warmup"] + s["steps"]), "--seed", "0",
        "--logging-steps", str(s["logging"]), "--warmup-steps", "0", "--decay", "none",
    ]  # fmt: skip
    command += ["--device", "cpu", "--no-bf16"] if options.quick else ["--bf16"]
    if compiled:
        command.append("--compile")
    environment = {**(environment or {}), **({PROFILE_VARIABLE: str(profile_dir)} if profile_dir else {})}
    run(command, options.quick, environment)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r and "tokens_per_second" in r]


def recompiles(records: list[dict], warmup: int) -> int | None:
    """Graphs compiled after the warm-up steps, from the trainer's `compiled_graphs` counts."""
    counts = [(r["step"], r["compiled_graphs"]) for r in records if "compiled_graphs" in r]
    before = [count for step, count in counts if step <= warmup]
    return counts[-1][1] - before[-1] if counts and before else None


def tokens_per_second(records: list[dict], warmup: int) -> float:
    timed = [r for r in records if r["step"] > warmup]
    tokens = sum(r["tokens_per_second"] * r["seconds"] for r in timed)
    return tokens / sum(r["seconds"] for r in timed)


def train_part(
    model_dir: Path, pairs_file: Path, work: Path, s: dict, options: argparse.Namespace, phases: dict
) -> dict:
    """Each training mode (eager, compiled) on 1 and 2 GPUs; the last mode listed is the headline."""
    result = {"data_pipeline": data_pipeline_rate(model_dir, pairs_file, s), "modes": {}}
    for mode in options.modes.split(","):
        result["modes"][mode] = train_mode(mode, model_dir, pairs_file, work, s, options, phases)
    headline = result["modes"][mode]
    keys = ("one_gpu_tok_s", "two_gpu_tok_s", "speedup", "loss_max_abs_diff", "loss_steps_compared")
    return {"mode": mode, **{key: headline[key] for key in keys}, **result}


def train_mode(mode, model_dir, pairs_file, work, s, options, phases) -> dict:
    def timed_run(name: str, nproc: int, **extra) -> list[dict]:
        with phase(phases, f"{mode}-{name}"):
            output = work / f"{mode}-{name}"
            return train_run(nproc, model_dir, pairs_file, output, s, options, mode == "compiled", **extra)

    # Untimed: fills inductor's and Triton's caches (eager CUDA runs use Triton kernels too). New
    # shapes can need new kernels after the warm-up steps; from a cold cache each costs seconds
    # inside the timed steps (a first eager run on a fresh machine measured half the next one's speed).
    timed_run("fill-compile-cache", 1)
    pairs = []  # (1-GPU records, 2-GPU records) per repeat, the two taking turns
    for repeat in range(options.train_repeats):
        suffix = f"-{repeat + 1}" if options.train_repeats > 1 else ""
        pairs.append((timed_run(f"train-1{suffix}", 1), timed_run(f"train-2{suffix}", 2)))
    rates = [[tokens_per_second(records, s["warmup"]) for records in pair] for pair in pairs]
    one_tok_s = statistics.median(one for one, _ in rates)
    two_tok_s = statistics.median(two for _, two in rates)
    losses_one = {r["step"]: r["loss"] for r in pairs[0][0]}
    losses_two = {r["step"]: r["loss"] for r in pairs[0][1]}
    common = sorted(set(losses_one) & set(losses_two))
    result = {
        "one_gpu_tok_s": round(one_tok_s),
        "two_gpu_tok_s": round(two_tok_s),
        "speedup": round(two_tok_s / one_tok_s, 3),
        "loss_max_abs_diff": max(abs(losses_one[i] - losses_two[i]) for i in common),
        "loss_steps_compared": common,
    }
    if mode == "compiled":  # graphs dynamo compiled inside the timed steps (rank 0), per run
        result["recompiles_in_timed_steps"] = [
            recompiles(records, s["warmup"]) for pair in pairs for records in pair
        ]
    if options.train_repeats > 1:  # medians above; every repeat here
        result["repeats"] = [
            {"one_gpu_tok_s": round(one), "two_gpu_tok_s": round(two), "speedup": round(two / one, 3)}
            for one, two in rates
        ]
    print(f"{mode}: {result}", flush=True)
    if options.profile and mode == options.modes.split(",")[-1]:  # the headline mode
        result["profile"] = {f"{nproc}_gpu": profile_run(nproc, timed_run, work / mode) for nproc in (1, 2)}
    return result


def data_pipeline_rate(model_dir: Path, pairs_file: Path, s: dict) -> dict:
    """How fast one process builds global batches on the host (read, tokenize, pack), the way each
    training rank does on its prefetch thread: a ceiling on the tokens/s of any run."""
    from mbert_retrieval import DenseRetriever
    from mbert_retrieval.training.arguments import TrainingArguments
    from mbert_retrieval.training.batching import DataPosition
    from mbert_retrieval.training.data import JsonlExamples
    from mbert_retrieval.training.tasks import DenseTask

    task = DenseTask(DenseRetriever.from_pretrained(model_dir, device="cpu"))
    args = TrainingArguments("unused", batch_size=s["batch"], max_steps=1)
    batches = iter(task.training_batches(JsonlExamples(pairs_file), args, DataPosition()))
    next(batches)
    count = s["warmup"]
    start = time.perf_counter()
    tokens = sum(next(batches).num_tokens for _ in range(count))
    seconds = time.perf_counter() - start
    rate = {"ms_per_global_batch": round(1000 * seconds / count, 1), "tok_s": round(tokens / seconds)}
    print(f"batch building on the host: {rate}", flush=True)
    return rate


def profile_run(nproc: int, timed_run, work: Path) -> list[dict]:
    """A few steps under torch.profiler (the trainer's MBERT_RETRIEVAL_PROFILE hook): per rank, ms
    per step of wall time, GPU busy time and host time in each part of the step."""
    from mbert_retrieval.training import profiling

    folder = work / f"profile-{nproc}"
    steps = profiling.WAIT + profiling.WARMUP + profiling.ACTIVE
    timed_run(f"profile-{nproc}", nproc, max_steps=steps, profile_dir=folder)
    summaries = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(nproc)]
    print((folder / "rank0.txt").read_text()[:6000], flush=True)  # the top of rank 0's table
    return summaries


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


def sharded_index_part(
    model_dir: Path, pairs, work: Path, s: dict, kind: str, quick: bool, phases: dict
) -> dict:
    """The approximate index (`kind`) and the exact one (flat: every document scored), each built in
    one process and in two shards + merge. The exact pair checks the merge (top 10s the same up to
    the encodings' bf16 noise); the approximate builds are each scored against the exact top 10 of
    the same encoding, so a sharded build is shown as good as a single one."""
    from mbert_retrieval.models.dense import default_model_dir

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
    base = ["-m", "mbert_retrieval.cli", "index", "--data", str(corpus), "--system", system]
    base += ["--no-progress", *device]
    found, seconds = {}, {}
    for index_kind in ("flat", kind):
        for build, launcher in (("single", [sys.executable]), ("sharded", torchrun(2))):
            name = f"{index_kind}-{build}"
            with phase(phases, f"index-{name}"):
                start = time.perf_counter()
                run([*launcher, *base, "--index", index_kind, "--output", str(work / name)], quick)
                seconds[name] = time.perf_counter() - start
                found[name] = top_ids(work / name, queries, "cpu" if quick else "cuda:0")
    same = sum(a == b for a, b in zip(found["flat-sharded"], found["flat-single"]))
    return {
        "index": kind,
        "model": Path(model_dir).name,
        "docs": len(docs),
        "queries": len(queries),
        "seconds": round(seconds[f"{kind}-sharded"], 1),
        "single_process_seconds": round(seconds[f"{kind}-single"], 1),
        "recall_vs_single_process": recall(found["flat-sharded"], found["flat-single"]),
        "identical_top10_queries": same,
        f"{kind}_recall_vs_single_process": recall(found[f"{kind}-sharded"], found[f"{kind}-single"]),
        f"{kind}_single_recall_vs_exact": recall(found[f"{kind}-single"], found["flat-single"]),
        f"{kind}_sharded_recall_vs_exact": recall(found[f"{kind}-sharded"], found["flat-sharded"]),
    }


def top_ids(index_dir: Path, queries: list[str], device: str) -> list[list[str]]:
    from mbert_retrieval.search.retriever import Retriever

    retriever = Retriever.load(index_dir, device=device)
    return [[hit.id for hit in hits] for hits in retriever.search(queries, k=10)]


def recall(found: list[list[str]], reference: list[list[str]]) -> float:
    """The share of the reference top 10s found in the other top 10s."""
    overlap = sum(len(set(a) & set(b)) for a, b in zip(found, reference))
    return round(overlap / sum(len(b) for b in reference), 4)


# -- the run -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="CPU check: tiny model, 2 CPU processes, few steps"
    )
    parser.add_argument(
        "--index", default="auto", choices=["auto", "ivfpq", "plaid"], help="approximate index kind"
    )
    parser.add_argument(
        "--modes",
        default="compiled,eager",
        help="training modes to run, comma-separated (eager, compiled); the last one is the headline "
        "(by default eager: what `train` runs without --compile)",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the timed runs, profile a few training steps per rank on 1 and 2 GPUs",
    )
    parser.add_argument(
        "--train-repeats",
        type=int,
        default=1,
        help="1- and 2-GPU training runs per mode, taking turns; the JSON has their medians",
    )
    parser.add_argument(
        "--parts", default="train,encode,index", help="comma-separated subset of train,encode,index"
    )
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/multi_gpu.json)")
    options = parser.parse_args()
    s = settings(options.quick)
    gpus = torch.cuda.device_count()
    if not options.quick and gpus < 2:
        sys.exit(f"this benchmark needs 2 GPUs, found {gpus} (use --quick for a CPU check)")
    out = Path(
        options.out or ("/tmp/multi_gpu_quick.json" if options.quick else "benchmarks/results/multi_gpu.json")
    )
    expected = {k: v for k, v in EXPECTED_SECONDS.items() if options.profile or k != "profile"}
    print(f"expected on 2 H200s: {sum(expected.values())} s ({expected})", flush=True)

    started = time.perf_counter()
    phases: dict[str, float] = {}
    # the training runs take one pass over these; encoding repeats them up to encode_docs
    n_pairs = max((s["warmup"] + s["steps"]) * s["batch"], s["index_docs"])
    with phase(phases, "pairs"):
        pairs = docstring_pairs(n_pairs)
    print(f"{len(pairs)} docstring -> function pairs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = [text for pair in pairs for text in pair]
        with phase(phases, "model"):
            model_dir = make_model_folder(texts, options.quick, s["max_length"], work)
        pairs_file = work / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in pairs))
        docs = [d for _, d in pairs]
        docs = (docs * (s["encode_docs"] // len(docs) + 1))[: s["encode_docs"]]

        result = {
            "device": "cpu (quick check)" if options.quick else torch.cuda.get_device_name(0),
            "gpus": 2 if options.quick else gpus,
            "command": "PYTHONPATH=. python3 " + " ".join(["benchmarks/multi_gpu.py", *sys.argv[1:]]),
            "phases_s": phases,
        }
        # written after each part, so a run cut short keeps what it measured
        parts = options.parts.split(",")
        if "train" in parts:
            result["train"] = train_part(model_dir, pairs_file, work, s, options, phases)
            write_result(result, out)
        if "encode" in parts:
            with phase(phases, "encode"):
                result["encode"] = encode_part(model_dir, docs, options.quick)
            write_result(result, out)
        if "index" in parts:
            result["sharded_index"] = sharded_index_part(
                model_dir, pairs, work, s, options.index, options.quick, phases
            )
            write_result(result, out)

    print_table(result, time.perf_counter() - started)


def print_table(result: dict, seconds: float) -> None:
    print(
        f"\n{result['device']}, {result['gpus']} GPUs, {platform.python_version()}, whole run {seconds:.0f} s"
    )
    print("phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["phases_s"].items()))
    print("| workload | 1 GPU | 2 GPUs | speedup |")
    print("| --- | --- | --- | --- |")
    train, encode = result.get("train"), result.get("encode")
    if train:
        print(
            f"| train dense, {train['mode']} (tok/s) | {train['one_gpu_tok_s']:,} "
            f"| {train['two_gpu_tok_s']:,} | {train['speedup']:.2f}x |"
        )
    if encode:
        print(
            f"| encode (docs/s) | {encode['one_gpu_docs_s']:,} | {encode['two_gpu_docs_s']:,} "
            f"| {encode['speedup']:.2f}x |"
        )
    if train:
        print_training_details(train)
    if "sharded_index" in result:
        print_index_details(result["sharded_index"])


def print_training_details(train: dict) -> None:
    print(f"batch building on one host process: {train['data_pipeline']}")
    for mode, numbers in train["modes"].items():
        print(
            f"{mode}: 1 GPU {numbers['one_gpu_tok_s']:,} tok/s, 2 GPUs {numbers['two_gpu_tok_s']:,} "
            f"({numbers['speedup']:.2f}x); losses at steps {numbers['loss_steps_compared']} differ by at "
            f"most {numbers['loss_max_abs_diff']:.2e}"
        )
        print_profiles(mode, numbers.get("profile", {}))


def print_profiles(mode: str, profiles: dict) -> None:
    for name, ranks in profiles.items():
        for r in ranks:
            host = ", ".join(f"{k} {v:.1f}" for k, v in r["host_ms_per_step"].items())
            print(
                f"profile {mode} {name} rank {r['rank']} (ms/step over {r['steps']}): wall {r['wall_ms_per_step']:.1f}, "
                f"GPU busy {r['gpu_busy_ms_per_step']:.1f}, NCCL kernels {r['nccl_kernel_ms_per_step']:.1f}; "
                f"host: {host}"
            )


def print_index_details(index: dict) -> None:
    kind = index["index"]
    print(
        f"sharded index, 2 ranks + merge, {index['docs']} docs, {index['queries']} queries: exact (flat) "
        f"recall@10 vs one process {index['recall_vs_single_process']:.4f}, identical top 10 for "
        f"{index['identical_top10_queries']}/{index['queries']}; {kind} vs one process "
        f"{index[f'{kind}_recall_vs_single_process']:.4f}; {kind} vs exact: single "
        f"{index[f'{kind}_single_recall_vs_exact']:.4f}, sharded {index[f'{kind}_sharded_recall_vs_exact']:.4f}; "
        f"{kind} build {index['single_process_seconds']} s in one process, {index['seconds']} s sharded"
    )


if __name__ == "__main__":
    main()
