"""Pieces the benchmarks share: real Python sources and samples of them, a random ModernBERT saved
as a DenseRetriever folder, and writing a result and its table."""

from __future__ import annotations

import ast
import json
import platform
import random
import sysconfig
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from mbert_retrieval import DenseRetriever
from mbert_retrieval.files import atomic_write_text
from mbert_retrieval.tokenization import special_token_ids, train_tokenizer


def make_model_folder(texts: list[str], small: bool, max_length: int, directory: Path) -> Path:
    """Train the tokenizer, build random ModernBERT weights, save as a sentence-transformers folder."""
    from transformers import ModernBertConfig, ModernBertModel

    vocab = 4096 if small else 50368
    bare = directory / "bare"
    tokenizer = train_tokenizer(texts, vocab_size=vocab, save_directory=bare)
    shape = (
        dict(
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=2,
            local_attention=32,
        )
        if small
        else {}  # ModernBERT-base: 22 layers, hidden 768, 12 heads, GeGLU 1152, window 128
    )
    config = ModernBertConfig(
        vocab_size=vocab,
        max_position_embeddings=8192,
        **special_token_ids(tokenizer),
        **shape,
    )
    torch.manual_seed(0)
    ModernBertModel(config).save_pretrained(bare)
    folder = directory / "sentence_transformers"
    DenseRetriever.from_pretrained(bare, max_length=max_length, device="cpu").save_pretrained(folder)
    return folder


def parsed_source_files(seed: int = 0) -> Iterator[tuple[list[str], ast.Module]]:
    """(lines, syntax tree) of every readable Python file of the stdlib and site-packages, files in a
    seeded random order so both places are represented."""
    paths = sysconfig.get_paths()
    roots = {Path(paths["stdlib"]), Path(paths["purelib"])}
    files = sorted({f for root in roots for f in root.rglob("*.py")})
    random.Random(seed).shuffle(files)
    for file in files:
        try:
            source = file.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        yield source.splitlines(), tree


Item = TypeVar("Item")


def sample_source_files(
    extract: Callable[[ast.AST, list[str]], Item | None],
    limit: int,
    per_file: int,
    seed: int = 0,
    key: Callable[[Item], Hashable] = lambda item: item,
) -> list[Item]:
    """Up to `limit` distinct items (by `key`), at most `per_file` from any one source file;
    `extract(node, lines)` makes an item of a syntax node, or None to pass over it."""
    items: list[Any] = []
    seen: set = set()
    for lines, tree in parsed_source_files(seed):
        taken = 0
        for node in ast.walk(tree):
            item = extract(node, lines)
            if item is None or key(item) in seen:
                continue
            seen.add(key(item))
            items.append(item)
            taken += 1
            if taken == per_file or len(items) == limit:
                break
        if len(items) == limit:
            break
    return items


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, then one line per row."""
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def write_result(result: dict, out: str | Path, table: str | None = None) -> None:
    """The result as JSON at `out` and, when given, its table beside it as .md (printed first)."""
    out = Path(out)
    if table is not None:
        print("\n" + table)
        atomic_write_text(out.with_suffix(".md"), table + "\n")
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}" + (f" and {out.with_suffix('.md')}" if table is not None else ""), flush=True)


INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # onnxruntime picks these by itself
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # bfloat16 matrix units, bfloat16 dot products


def cpu_name() -> str:
    """Model name, family / model numbers and the int8 dot-product and bfloat16 instructions the CPU
    has: the same name covers CPUs with and without them, and they decide the int8 and bf16 paths'
    speed."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    int8 = [flag for flag in INT8_DOT_PRODUCT_FLAGS if flag in flags] or ["none (avx2 only)"]
    bf16 = [flag for flag in BF16_FLAGS if flag in flags] or ["none"]
    return (
        f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')}; int8 dot products: {', '.join(int8)}; bf16: {', '.join(bf16)})"
    )


def microseconds(fn) -> float:
    """Median GPU time of one call, from CUDA-graph replays (no launch overhead)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median")


def recorder(row: dict) -> Callable:
    """record(name, fn): fn's microseconds into row[name]; a launch shape that fails is reported in
    row[name + "_error"], not fatal to the sweep."""

    def record(name: str, fn) -> None:
        try:
            row[name] = microseconds(fn)
        except Exception as err:
            row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:300]

    return record


def run_sweep(
    doc: str, name: str, measure: Callable[[list[int]], dict], workloads: list, shipped: dict | None = None
) -> None:
    """A kernel sweep's command line (`--out`, default benchmarks/results/<name>.json): `measure`
    gets each variable-length workload (the encoder benchmark's) as its sequence lengths and
    returns that workload's row; the JSON is written after each row, the table printed at the end."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{name}.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"{name}.py times CUDA kernels: run it on a GPU")
    generator = torch.Generator().manual_seed(1)
    results = {"device": torch.cuda.get_device_name(), "command": "python3 " + " ".join(sys.argv)}
    if shipped:
        results["shipped"] = shipped
    for workload in workloads:
        if workload.mean is not None:
            results[workload.name] = measure(workload.lengths(generator))
            write_result(results, args.out)  # after each workload
    print_sweep(results)


def print_sweep(results: dict) -> None:
    """Each workload's row of a kernel sweep, us per call."""
    for name, row in results.items():
        if isinstance(row, dict) and "tokens" in row:
            print(f"\n{name} ({row['tokens']} tokens), us per call (CUDA-graph replays):")
            for key, value in row.items():
                if key != "tokens":
                    print(f"  {key:32s} {value if isinstance(value, str) else f'{value:8.1f}'}")
