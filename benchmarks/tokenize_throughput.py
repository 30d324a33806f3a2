"""Tokenizing texts cut to a model's max_length: `TextTokenizer.encode` (each text tokenized once,
over-long ones cut from their ids) against the tokenizer's own truncation of the over-long texts
(tokenized a second time), the form before. Real Python functions (as encode_throughput.py cuts
them), the shipped model's tokenizer, the same ids checked, median of the repeats, the forms taking
turns. Prints a table and writes JSON:

    PYTHONPATH=. python3 benchmarks/tokenize_throughput.py --out benchmarks/results/tokenize_throughput.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks.common import cpu_name, write_result
from benchmarks.encode_throughput import python_functions
from mbert_retrieval.models.dense import default_model_dir
from mbert_retrieval.models.encoding import TextTokenizer
from mbert_retrieval.tokenization import load_tokenizer


def retokenizing(tokenizer: TextTokenizer, texts: list[str], max_length: int) -> list:
    """The form before: over-long texts tokenized again by the tokenizer's truncation."""
    ids = tokenizer.encode_whole(texts)
    too_long = [i for i, seq in enumerate(ids) if len(seq) > max_length]
    for i, seq in zip(too_long, tokenizer._encode_truncated([texts[i] for i in too_long], max_length)):
        ids[i] = seq
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/tokenize_throughput.json")
    args = parser.parse_args()
    tokenizer = TextTokenizer(load_tokenizer(default_model_dir()))
    texts = python_functions(args.texts)
    forms = {
        "once": lambda: tokenizer.encode(texts, args.max_length)[0],
        "retokenizing": lambda: retokenizing(tokenizer, texts, args.max_length),
    }
    outputs = {name: [seq.tolist() for seq in form()] for name, form in forms.items()}
    if outputs["once"] != outputs["retokenizing"]:
        raise SystemExit("the two forms gave different ids")
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, form in forms.items():
            started = time.perf_counter()
            form()
            seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    whole = tokenizer.encode_whole(texts)
    result = {
        "device": cpu_name(),
        "threads": os.environ.get("RAYON_NUM_THREADS", f"{len(os.sched_getaffinity(0))} (a thread per core)"),
        "command": "PYTHONPATH=. python3 benchmarks/tokenize_throughput.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "texts": len(texts),
        "over_max_length": sum(len(seq) > args.max_length for seq in whole),
        "tokens_untruncated": sum(len(seq) for seq in whole),
        "texts_per_s": {name: len(texts) / value for name, value in median.items()},
        "speedup": median["retokenizing"] / median["once"],
        "seconds": seconds,
    }
    table = "\n".join(
        [
            f"| form | texts/s ({len(texts)} functions, max_length {args.max_length}) |",
            "| --- | --- |",
            *(f"| {name} | {rate:,.0f} |" for name, rate in result["texts_per_s"].items()),
            f"| speed-up | {result['speedup']:.2f}x |",
        ]
    )
    write_result(result, args.out, table)


if __name__ == "__main__":
    main()
