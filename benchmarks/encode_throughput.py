"""Encoding throughput: DenseRetriever.encode_documents against SentenceTransformer.encode, on the
same weights and the same texts, in the same run.

Texts: Python functions cut out with `ast` from the installed Python's standard library and
site-packages (about 20k, of mixed lengths). Model: ModernBERT-base shape with random weights made
by `transformers`, a BPE tokenizer trained here on those texts (vocab 50368), saved once as a
sentence-transformers folder (mean pooling, normalised) that both load. bf16 on CUDA. Whole calls
are timed (tokenization included), after a warm-up call on a few hundred texts. Prints a table and
writes JSON:

    PYTHONPATH=. python3 benchmarks/encode_throughput.py --out benchmarks/results/encode_throughput.json
    PYTHONPATH=. python3 benchmarks/encode_throughput.py --small     # CPU check: tiny model, few texts

`--compile` adds a row for our encoder with torch.compile'd layers, `--cuda-graphs` one replaying CUDA
graphs (`ModernBert.use_cuda_graphs`); `--devices cuda:0,cuda:1` spreads
our batches over several GPUs.
"""

from __future__ import annotations

import argparse
import ast
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_name, make_model_folder, sample_source_files, write_result
from mbert_retrieval import DenseRetriever

MAX_FUNCTIONS_PER_FILE = 25


def python_functions(limit: int, seed: int = 0) -> list[str]:
    """Source of distinct functions (2+ lines) from the stdlib and site-packages, files in a
    seeded random order so both places are represented."""
    return sample_source_files(function_text, limit, MAX_FUNCTIONS_PER_FILE, seed)


def function_text(node: ast.AST, lines: list[str]) -> str | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.end_lineno is None:
        return None
    if node.end_lineno - node.lineno < 1:
        return None
    return textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="CPU check: tiny model, few texts")
    parser.add_argument(
        "--texts", type=int, default=None, help="number of functions (default 20000; 300 small)"
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per text (default 1024; 256 small)"
    )
    parser.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode batch_size")
    parser.add_argument("--max-tokens-per-batch", type=int, default=32768, help="our packed batch budget")
    parser.add_argument("--devices", default=None, help="comma-separated devices for our encoder")
    parser.add_argument("--compile", action="store_true", help="also time our encoder with compiled layers")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time our encoder replaying CUDA graphs (after --compile: of the compiled layers)",
    )
    parser.add_argument("--out", default="benchmarks/results/encode_throughput.json")
    args = parser.parse_args()
    n_texts = args.texts or (300 if args.small else 20000)
    max_length = args.max_length or (256 if args.small else 1024)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    devices = args.devices.split(",") if args.devices else None

    start = time.perf_counter()
    texts = python_functions(n_texts)
    print(f"{len(texts)} functions in {time.perf_counter() - start:.1f} s", flush=True)
    from sentence_transformers import SentenceTransformer

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = make_model_folder(texts, args.small, max_length, Path(tmp))
        print(f"tokenizer and model folder in {time.perf_counter() - start:.1f} s", flush=True)
        ours = DenseRetriever.from_pretrained(folder, device=device, dtype=dtype)
        st = SentenceTransformer(str(folder), device=str(device), model_kwargs={"dtype": dtype})
    lengths = np.array([len(ids) for ids in ours.tokenize(texts)])
    tokens = int(lengths.sum())
    warmup = texts[:: max(1, len(texts) // 256)]

    rows = {}

    def run_ours(name: str) -> np.ndarray:
        ours.encode_documents(warmup, max_tokens_per_batch=args.max_tokens_per_batch, devices=devices)
        seconds, out = timed(
            lambda: ours.encode_documents(
                texts, max_tokens_per_batch=args.max_tokens_per_batch, devices=devices
            )
        )
        rows[name] = {
            "seconds": seconds,
            "docs_per_s": len(texts) / seconds,
            "tokens_per_s": tokens / seconds,
        }
        print(f"{name}: {seconds:.2f} s", flush=True)
        return out

    ours_embeddings = run_ours("ours")
    st.encode(warmup, batch_size=args.st_batch_size)
    seconds, st_embeddings = timed(
        lambda: st.encode(texts, batch_size=args.st_batch_size, convert_to_numpy=True)
    )
    rows["sentence_transformers"] = {
        "seconds": seconds,
        "docs_per_s": len(texts) / seconds,
        "tokens_per_s": tokens / seconds,
    }
    print(f"sentence_transformers: {seconds:.2f} s", flush=True)
    agreement = {"ours": compare(ours_embeddings, st_embeddings)}
    if args.compile:
        ours.encoder.compile_layers()
        agreement["ours_compiled"] = compare(run_ours("ours_compiled"), st_embeddings)
    if args.cuda_graphs and device.type == "cuda":  # each new padded batch shape is recorded in the timing
        ours.encoder.use_cuda_graphs()
        name = "ours_compiled_graphed" if args.compile else "ours_graphed"
        agreement[name] = compare(run_ours(name), st_embeddings)

    baseline = rows["sentence_transformers"]["seconds"]
    for row in rows.values():
        row["speedup"] = baseline / row["seconds"]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "sentence_transformers": __import__("sentence_transformers").__version__,
        "dtype": str(dtype),
        "shape": "small" if args.small else "base",
        "texts": len(texts),
        "tokens": tokens,
        "mean_tokens": float(lengths.mean()),
        "truncated": int((lengths >= max_length).sum()),
        "max_length": max_length,
        "st_batch_size": args.st_batch_size,
        "st_attn_implementation": getattr(st[0].auto_model.config, "_attn_implementation", None),
        "max_tokens_per_batch": args.max_tokens_per_batch,
        "devices": devices or [str(device)],
        "results": rows,
        "agreement_with_sentence_transformers": agreement,
    }
    print(
        f"\n{len(texts)} texts, {tokens} tokens (mean {lengths.mean():.0f}, max_length {max_length}), {result['device']}"
    )
    print(f"{'':24}{'docs/s':>10}{'M tok/s':>10}{'speed-up':>10}")
    for name, row in rows.items():
        print(f"{name:24}{row['docs_per_s']:10.0f}{row['tokens_per_s'] / 1e6:10.3f}{row['speedup']:10.2f}")
    for name, values in agreement.items():
        print(f"{name} vs sentence-transformers: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
