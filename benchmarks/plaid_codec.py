"""PLAID residual codec: per-dimension Lloyd-Max buckets (ours) against ColBERTv2's shared quantile buckets.

Both codecs store a token as its nearest centroid plus `nbits` bits per dimension, so they take the same
bytes; they differ only in the bucket tables. ColBERTv2 splits all residual values, pooled over the
dimensions, into equal-count buckets that decode to the bucket's median; ours fits a least-squared-error
quantizer to each dimension. Both run on the same corpus and the same centroids, for each nbits and each
centroid count asked for, and are measured by:
    squared error       mean squared distance of a token to its decompressed vector
    cosine              mean cosine of a token with its decompressed vector
    ceiling recall      recall@10 of exhaustive MaxSim over the decompressed vectors, against exhaustive
                        MaxSim over the original ones: the best any search over this index can do
    recall at defaults  recall@10 of `PlaidIndex.search` at its default settings, same reference

    PYTHONPATH=. python3 benchmarks/plaid_codec.py --small                      # CPU, synthetic
    PYTHONPATH=. python3 benchmarks/plaid_codec.py --colbert MODEL --corpus BEIR_FOLDER
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from plaid import (
    add_corpus_and_output_options,
    colbert_corpus,
    exhaustive_top_k,
    make_corpus,
    recall,
)

from benchmarks.common import markdown_table, write_result
from mbert_retrieval.index.codec import ResidualCodec, nearest_centroids
from mbert_retrieval.index.kmeans import train_kmeans
from mbert_retrieval.index.plaid import PlaidIndex

SAMPLE_TOKENS = 1 << 15  # residuals the bucket tables are fitted on, as PlaidIndex.build uses


def shared_quantile_codec(centroids: torch.Tensor, sample: torch.Tensor, nbits: int) -> ResidualCodec:
    """ColBERTv2's tables: cutoffs at the 1/n .. (n-1)/n quantiles of all residual values, each bucket
    decoding to the quantile in its middle, one table for every dimension."""
    residuals = (sample.float() - centroids[nearest_centroids(sample, centroids)]).flatten()
    n = 2**nbits
    ordered = residuals.sort().values

    def quantiles(fractions):
        return ordered[(fractions * (len(ordered) - 1)).round().long().to(ordered.device)]

    return ResidualCodec(centroids, quantiles(torch.arange(1, n) / n), quantiles((torch.arange(n) + 0.5) / n))


@torch.inference_mode()
def measure(codec, tokens, lengths, queries, truth) -> dict:
    docs = list(tokens.split(lengths.tolist()))
    index = PlaidIndex(codec)
    index.add([str(i) for i in range(len(docs))], docs)
    decoded = []

    def decompressed(begin, end):
        codes = index._centroid_ids(index.codes[begin:end])
        block = index.codec.decode(codes, index.residuals[begin:end])
        decoded.append((block, tokens[begin:end].float()))
        return block.to(queries.dtype)

    ceiling = exhaustive_top_k(decompressed, lengths, queries, 10)
    squared = sum((d - t).pow(2).sum().item() for d, t in decoded) / len(tokens)
    cosine = sum(F.cosine_similarity(d, t, dim=-1).sum().item() for d, t in decoded) / len(tokens)
    found = [[int(i) for i in row] for row in index.search(queries, 10)[0]]
    return {
        "squared_error": squared,
        "cosine": cosine,
        "ceiling_recall_at_10": recall([row.tolist() for row in ceiling], truth),
        "recall_at_10_default_settings": recall(found, truth),
    }


def table(result: dict) -> str:
    lines = [
        f"PLAID codec, {result['corpus']['documents']} docs / {result['corpus']['tokens']} tokens x "
        f"{result['corpus']['dim']} dims, {result['corpus']['queries']} queries, on {result['device']}",
        f"corpus: {result['corpus']['source']}",
        "",
    ]
    header = [
        "nbits",
        "centroids",
        "buckets",
        "squared error",
        "cosine",
        "ceiling recall@10",
        "recall@10 at defaults",
    ]
    rows = [
        [
            run["nbits"],
            run["n_centroids"],
            name,
            f"{m['squared_error']:.5f}",
            f"{m['cosine']:.4f}",
            f"{m['ceiling_recall_at_10']:.3f}",
            f"{m['recall_at_10_default_settings']:.3f}",
        ]
        for run in result["runs"]
        for name, m in run["codecs"].items()
    ]
    lines += markdown_table(header, rows)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU run on a small synthetic corpus")
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nbits", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--centroid-factors",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="centroid counts as multiples of PlaidIndex.build's default",
    )
    add_corpus_and_output_options(parser, "plaid_codec")
    args = parser.parse_args()
    if (args.colbert is None) != (args.corpus is None):
        parser.error("--colbert and --corpus go together")
    if args.small:
        args.docs, args.queries = 4000, 200
    args.out = args.out or Path(f"benchmarks/results/plaid_codec{'_small' if args.small else ''}.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    start = time.perf_counter()
    if args.colbert is not None:
        tokens, lengths, queries = colbert_corpus(args.colbert, args.corpus, args.docs, args.queries, device)
        source = f"ColBERT {args.colbert.name} over {args.corpus}"
    else:
        vocab = 32768 if args.docs >= 50_000 else 4096
        mean_len = 48 if args.small else 128
        tokens, lengths, queries = make_corpus(args.docs, mean_len, 128, vocab, args.queries, 32, device)
        source = "synthetic, clustered ColBERT-like, see make_corpus in benchmarks/plaid.py"
    queries = queries if device.type == "cuda" else queries.float()
    truth = exhaustive_top_k(lambda b, e: tokens[b:e], lengths, queries, 10)
    print(f"corpus and exhaustive MaxSim in {time.perf_counter() - start:.1f} s", flush=True)

    generator = torch.Generator().manual_seed(0)
    sample_rows = torch.randperm(len(tokens), generator=generator)
    kmeans_sample = tokens[sample_rows[: 256 * 2**16].to(device)].float()
    fit_sample = tokens[sample_rows[:SAMPLE_TOKENS].to(device)].float()
    default_centroids = 2 ** math.floor(math.log2(16 * math.sqrt(len(tokens))))
    result = {
        "benchmark": "plaid_codec",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "corpus": {
            "documents": len(lengths),
            "tokens": len(tokens),
            "dim": tokens.shape[1],
            "queries": len(queries),
            "source": source,
        },
        "runs": [],
    }
    for factor in args.centroid_factors:
        n_centroids = min(int(default_centroids * factor), len(kmeans_sample))
        centroids = F.normalize(train_kmeans(kmeans_sample, n_centroids, 4, 0), dim=-1)
        for nbits in args.nbits:
            codecs = {
                "ColBERTv2 shared quantiles": shared_quantile_codec(centroids, fit_sample, nbits),
                "per-dimension Lloyd-Max": ResidualCodec.fit(centroids, fit_sample, nbits),
            }
            run = {"nbits": nbits, "n_centroids": n_centroids, "centroid_factor": factor, "codecs": {}}
            for name, codec in codecs.items():
                run["codecs"][name] = measure(codec, tokens, lengths, queries, truth)
                print(f"nbits={nbits} centroids={n_centroids} {name}: {run['codecs'][name]}", flush=True)
            result["runs"].append(run)

    write_result(result, args.out, table(result))


if __name__ == "__main__":
    main()
