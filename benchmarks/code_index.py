"""Code index: full build against an incremental update after editing one file, and search latency.

The repository is a copy of standard-library packages; the model a random-weight ModernBERT (base
shape on CUDA, tiny with --small) with a BPE tokenizer trained on the same sources: timings do not
depend on the weights. Measured: full build (walk, chunk, encode, write), an update after appending a
function to one file, an update with nothing changed, and single-query search latency per ranking mode.

    PYTHONPATH=. python3 benchmarks/code_index.py --out benchmarks/results/code_index.json   # CUDA
    PYTHONPATH=. python3 benchmarks/code_index.py --small                                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_name, write_result
from mbert_retrieval.code.index import CodeIndex, build_code_index
from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.tokenization import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PACKAGES = ("json", "email", "http", "asyncio", "unittest", "xml", "importlib", "logging", "concurrent")
SMALL_PACKAGES = ("json", "email")
QUERIES = ["parse a json string", "send an http request", "run the event loop", "assert two lists are equal"]


def make_model(directory: Path, small: bool) -> Path:
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    texts = [p.read_text(errors="ignore") for p in sorted(STDLIB.glob("*.py"))[:200]]
    train_tokenizer(texts, vocab_size=1000 if small else 8000, save_directory=directory)
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)
    if not small:
        shape = dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12)
    config = ModernBertConfig(
        vocab_size=1000 if small else 8000,
        max_position_embeddings=1024,
        pad_token_id=2,
        cls_token_id=0,
        sep_token_id=1,
        bos_token_id=0,
        eos_token_id=1,
        **shape,
    )
    torch.manual_seed(0)
    ModernBertForMaskedLM(config).save_pretrained(directory)
    return directory


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny model and two packages (CPU)")
    parser.add_argument("--model", help="a dense model folder to use instead of a random one")
    parser.add_argument("--out", default="benchmarks/results/code_index.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = tmp / "repo"
        for package in SMALL_PACKAGES if args.small else PACKAGES:
            shutil.copytree(STDLIB / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
        model_dir = args.model or make_model(tmp / "model", args.small)
        model = DenseRetriever.from_pretrained(model_dir)

        full, full_s = timed(
            lambda: build_code_index(repo, tmp / "index", model, model_name="bench", show_progress=False)
        )
        target = repo / "json" / "decoder.py"
        target.write_text(target.read_text() + "\n\ndef appended(x):\n    '''An edit.'''\n    return x\n")
        update, update_s = timed(
            lambda: build_code_index(repo, tmp / "index", model, model_name="bench", show_progress=False)
        )
        same, same_s = timed(
            lambda: build_code_index(repo, tmp / "index", model, model_name="bench", show_progress=False)
        )

        index = CodeIndex.load(tmp / "index")
        latency = {}
        for mode in ("dense", "bm25", "hybrid"):
            index.search(model, QUERIES[0], k=10, mode=mode)  # warm-up
            times = [timed(lambda q=q: index.search(model, q, k=10, mode=mode))[1] for q in QUERIES * 5]
            latency[mode] = {"p50_ms": 1000 * statistics.median(times), "max_ms": 1000 * max(times)}

    rows = [
        ("full build", full_s, full.files, full.chunks_encoded),
        ("update, one file edited", update_s, update.files_changed, update.chunks_encoded),
        ("update, nothing changed", same_s, 0, same.chunks_encoded),
    ]
    print(f"{'run':<26}{'seconds':>9}{'files changed':>15}{'chunks encoded':>16}")
    for name, seconds, files, encoded in rows:
        print(f"{name:<26}{seconds:>9.2f}{files:>15}{encoded:>16}")
    print(f"speed-up of the one-file update: {full_s / update_s:.1f}x  ({full.chunks} chunks in the index)")
    for mode, values in latency.items():
        print(f"search {mode:<7} p50 {values['p50_ms']:.1f} ms  max {values['max_ms']:.1f} ms")

    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "small": args.small,
        "chunks": full.chunks,
        "files": full.files,
        "runs": [{"run": n, "seconds": s, "files_changed": f, "chunks_encoded": e} for n, s, f, e in rows],
        "search_latency": latency,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
