"""PLAID search: our torch-native PlaidIndex against fast-plaid on the same synthetic ColBERT corpus.

The corpus imitates ColBERT output: unit 128-d token vectors scattered around word vectors, words grouped
in topical fields, each document drawing its tokens from a few fields (Zipf within a field) plus a share
of frequent function words; queries take words of one document, plus query-expansion tokens near the
query's mean. Measured for each engine: build time, bytes per token (on disk and, for ours, in memory),
queries/s over the whole query set, single-query p50/p99 latency, and recall@10 against exhaustive MaxSim
on the original (uncompressed) embeddings. For ours also recall against exhaustive MaxSim over its own
decompressed embeddings, which isolates the search stages from the compression, and how much of that
top 10 each stage keeps: the probed candidates (stage 1) and the shortlist scored exactly (stage 2).
`--settings 4,0,0.45,256 2,64,0.4,512` measures other search settings than the built-in sweep.

    PYTHONPATH=. python3 benchmarks/plaid.py --out benchmarks/results/plaid.json   # CUDA, 100k docs
    PYTHONPATH=. python3 benchmarks/plaid.py --small                               # CPU smoke run

With `--colbert MODEL --corpus BEIR_FOLDER` the corpus is real instead: the first `--docs` documents
and `--queries` queries of the folder, encoded by that ColBERT model. For both kinds of corpus the JSON
records how well the index's codec fits the tokens (mean cosine of a token with its centroid and with
its decompressed vector), which is what tells synthetic data "shaped like real ones" apart.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, write_result
from mbert_retrieval.index.plaid import PlaidIndex

OUR_SETTINGS = [  # (n_probe, n_query_probe, centroid_score_threshold, n_candidates), fastest first
    (1, 0, 0.5, 64),
    (2, 0, 0.45, 128),
    (4, 0, 0.45, 256),
    (8, 0, 0.4, 512),
    (1, 32, 0.45, 128),
    (2, 32, 0.4, 256),
    (4, 64, 0.4, 512),  # PlaidIndex.search's defaults
    (8, 128, 0.4, 1024),
]
FAST_PLAID_SETTINGS = [(2, 256), (4, 1024), (8, 4096)]  # (n_ivf_probe, n_full_scores); the last: defaults


# ------------------------------------------------------------------------------------------ the corpus


def make_corpus(n_docs, mean_len, dim, vocab, n_queries, q_len, device, seed=0, chunk_docs=20_000):
    """Token embeddings [n_tokens, dim] (fp16 on `device`), document lengths, and queries [n_q, q_len, dim]."""
    g = torch.Generator(device=device).manual_seed(seed)
    words_per_field = 64
    n_fields = vocab // words_per_field
    fields = F.normalize(torch.randn(n_fields, dim, generator=g, device=device), dim=-1)
    word_noise = torch.randn(vocab, dim, generator=g, device=device) * math.sqrt(1.5 / dim)
    words = F.normalize(fields.repeat_interleave(words_per_field, 0) + word_noise, dim=-1)
    zipf = 1.0 / torch.arange(1, words_per_field + 1, device=device)
    sigma = math.sqrt(0.2 / dim)  # a token keeps cosine ~0.91 with its word: context varies it

    lengths = (torch.randn(n_docs, generator=g, device=device) * 0.5).exp() * mean_len * 0.88
    lengths = lengths.round().clamp(8, 4 * mean_len).long()
    doc_fields = torch.randint(n_fields, (n_docs, 3), generator=g, device=device)
    fields_used = torch.randint(1, 4, (n_docs,), generator=g, device=device)
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    tokens = torch.empty(int(offsets[-1]), dim, dtype=torch.float16, device=device)
    token_words = torch.empty(len(tokens), dtype=torch.long, device=device)
    for start in range(0, n_docs, chunk_docs):
        docs = torch.arange(start, min(start + chunk_docs, n_docs), device=device)
        doc_of = torch.repeat_interleave(docs, lengths[docs])
        pick = (torch.rand(len(doc_of), generator=g, device=device) * fields_used[doc_of]).long()
        field = doc_fields[doc_of, pick]
        field[torch.rand(len(doc_of), generator=g, device=device) < 0.2] = 0  # function words
        word = field * words_per_field + torch.multinomial(zipf, len(doc_of), True, generator=g)
        noise = torch.randn(len(doc_of), dim, generator=g, device=device) * sigma
        begin, end = int(offsets[docs[0]]), int(offsets[docs[-1] + 1])
        tokens[begin:end] = F.normalize(words[word] + noise, dim=-1).half()
        token_words[begin:end] = word

    source = torch.randint(n_docs, (n_queries,), generator=g, device=device)
    n_content = q_len * 3 // 4
    picks = (
        offsets[source, None]
        + (torch.rand(n_queries, n_content, generator=g, device=device) * lengths[source, None]).long()
    )
    content_noise = torch.randn(n_queries, n_content, dim, generator=g, device=device) * sigma
    content = F.normalize(words[token_words[picks]] + content_noise, dim=-1)
    expansion_noise = torch.randn(n_queries, q_len - n_content, dim, generator=g, device=device)
    expansion = F.normalize(content.mean(1, keepdim=True) + expansion_noise * math.sqrt(0.5 / dim), dim=-1)
    return tokens, lengths, torch.cat([content, expansion], 1).half()


def colbert_corpus(model_dir, beir_dir, n_docs, n_queries, device):
    """Real token embeddings: the first `n_docs` documents and `n_queries` queries of a BEIR folder
    encoded by a ColBERT model, in make_corpus's layout."""
    from mbert_retrieval.models.colbert import ColBERT

    def first_texts(name, n):
        texts = []
        with open(Path(beir_dir) / name, encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                texts.append(" ".join(filter(None, (record.get("title"), record["text"]))))
                if len(texts) == n:
                    break
        return texts

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = ColBERT.from_pretrained(model_dir, device=device, dtype=dtype)
    packed = model.encode_documents(first_texts("corpus.jsonl", n_docs), packed=True, convert_to_tensor=True)
    tokens = packed.embeddings.to(device, torch.float16)
    lengths = torch.from_numpy(packed.offsets).diff().to(device)
    queries = model.encode_queries(first_texts("queries.jsonl", n_queries), convert_to_tensor=True)
    return tokens, lengths, queries.to(device, torch.float16)


@torch.inference_mode()
def codec_fit(index: PlaidIndex, tokens: torch.Tensor, sample: int = 200_000) -> dict:
    """Mean cosine of a token with its centroid and with its decompressed vector (a spread sample)."""
    rows = torch.linspace(0, len(tokens) - 1, min(sample, len(tokens)), device=tokens.device).long()
    original = tokens[rows].float()
    codes = index._centroid_ids(index.codes[rows.to(index.codes.device)])
    centroids = index.codec.centroids.to(original.device)[codes.to(original.device).long()]
    decoded = index.codec.decode(codes, index.residuals[rows.to(index.residuals.device)]).to(original.device)
    return {
        "cosine_to_centroid": F.cosine_similarity(original, centroids, dim=-1).mean().item(),
        "cosine_to_decompressed": F.cosine_similarity(original, decoded.float(), dim=-1).mean().item(),
    }


@torch.inference_mode()
def exhaustive_top_k(token_chunks, lengths, queries, k, chunk_tokens=1 << 16):
    """Exact MaxSim top-k for every query over all documents; `token_chunks(start, end)` gives tokens."""
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    n_docs, device = len(lengths), queries.device
    flat = queries.flatten(0, 1)
    scores = torch.empty(n_docs, len(queries), device=device)
    doc = 0
    while doc < n_docs:  # whole documents per chunk, about chunk_tokens tokens
        last = int(torch.searchsorted(offsets, offsets[doc] + chunk_tokens, right=True)) - 1
        last = min(max(last, doc + 1), n_docs)
        begin, end = int(offsets[doc]), int(offsets[last])
        sims = token_chunks(begin, end).to(flat.dtype) @ flat.T  # [tokens, n_q * L]
        owner = torch.repeat_interleave(torch.arange(last - doc, device=device), lengths[doc:last])
        best = torch.full((last - doc, sims.shape[1]), -math.inf, dtype=sims.dtype, device=device)
        best.scatter_reduce_(0, owner[:, None].expand_as(sims), sims, "amax")
        scores[doc:last] = best.view(last - doc, len(queries), -1).float().sum(-1)
        doc = last
    return scores.topk(k, dim=0).indices.T.cpu()


def recall(found: list[list[int]], truth: torch.Tensor) -> float:
    hits = sum(len(set(row) & set(t)) for row, t in zip(found, truth.tolist()))
    return hits / truth.numel()


# ------------------------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def latencies(search_one, queries, device, n) -> dict:
    times = [timed(lambda q=q: search_one(q[None]), device)[1] for q in queries[:n]]
    times.sort()
    return {
        "p50_ms": 1e3 * statistics.median(times),
        "p99_ms": 1e3 * times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)],
    }


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------- ours


@torch.inference_mode()
def stage_recalls(index, queries, truth, n_probe, n_query_probe, threshold, n_candidates, batch_size) -> dict:
    """Share of the `truth` top-10 kept by each search stage: probed (stage 1) and shortlisted (stage 2)."""
    probed = shortlisted = 0
    for begin in range(0, len(queries), batch_size):
        batch = queries[begin : begin + batch_size]
        wanted = truth[begin : begin + batch_size].to(index.device)
        candidates, shortlist, valid = index._shortlist(
            batch, n_probe, n_query_probe, threshold, max(n_candidates, 10)
        )
        probed += int(candidates.gather(1, wanted).sum())
        kept = (shortlist[:, :, None] == wanted[:, None, :]) & valid[:, :, None]
        shortlisted += int(kept.any(1).sum())
    return {"probed_recall": probed / truth.numel(), "shortlisted_recall": shortlisted / truth.numel()}


def bench_ours(tokens, lengths, queries, truth, nbits, args, device, workdir):
    docs = list(tokens.split(lengths.tolist()))
    ids = [str(i) for i in range(len(docs))]

    def build():
        return PlaidIndex.build(docs, ids, nbits=nbits, kmeans_iters=4, device=device, show_progress=False)

    index, build_s = timed(build, device)
    index.save(workdir / "ours")
    disk = folder_bytes(workdir / "ours")

    def decompressed_tokens(begin, end):
        codes = index._centroid_ids(index.codes[begin:end])
        return index.codec.decode(codes, index.residuals[begin:end], queries.dtype)

    truth_decompressed = exhaustive_top_k(decompressed_tokens, lengths.to(device), queries, 10)
    result = {
        "build_s": build_s,
        "n_centroids": index.n_centroids,
        "disk_bytes_per_token": disk / index.n_tokens,
        "memory_bytes_per_token": index.memory_bytes() / index.n_tokens,
        "codec_fit": codec_fit(index, tokens),
        "settings": [],
    }
    for n_probe, n_query_probe, threshold, n_candidates in args.settings:
        params = dict(
            n_probe=n_probe,
            n_query_probe=n_query_probe,
            centroid_score_threshold=threshold,
            n_candidates=n_candidates,
        )

        def search(q, params=params):
            return index.search(q, 10, batch_size=args.batch_size, **params)

        search(queries[: args.batch_size])  # warm-up
        (found, _), seconds = timed(lambda: search(queries), device)
        found = [[int(i) for i in row] for row in found]
        result["settings"].append(
            {
                **params,
                "queries_per_s": len(queries) / seconds,
                **latencies(search, queries, device, args.latency_queries),
                "recall_at_10": recall(found, truth),
                "recall_at_10_vs_decompressed": recall(found, truth_decompressed),
                "stages_vs_decompressed": stage_recalls(
                    index, queries, truth_decompressed, *params.values(), args.batch_size
                ),
            }
        )
    default = [[int(i) for i in row] for row in index.search(queries, 10)[0]]
    result["default_settings"] = {
        "recall_at_10": recall(default, truth),
        "recall_at_10_vs_decompressed": recall(default, truth_decompressed),
    }
    return result


# ----------------------------------------------------------------------------------------- fast-plaid


def bench_fast_plaid(tokens, lengths, queries, truth, nbits, args, device, workdir):
    try:
        from fast_plaid import search as fp_search
    except Exception as err:  # not installed, or built for another torch
        return {"skipped": f"fast_plaid not importable: {type(err).__name__}: {err}"}
    docs = list(tokens.float().cpu().split(lengths.tolist()))
    path = workdir / "fast_plaid"

    def build():
        index = fp_search.FastPlaid(index=str(path), device=str(device))
        index.create(documents_embeddings=docs, kmeans_niters=4, nbits=nbits)
        return index

    index, build_s = timed(build, device)
    result = {
        "version": importlib.metadata.version("fast-plaid"),
        "build_s": build_s,
        "disk_bytes_per_token": folder_bytes(path) / len(tokens),
        "settings": [],
    }
    cpu_queries = queries.float().cpu()
    for n_probe, n_full in FAST_PLAID_SETTINGS:
        params = dict(n_ivf_probe=n_probe, n_full_scores=n_full)

        def search(q, params=params):
            return index.search(queries_embeddings=q, top_k=10, show_progress=False, **params)

        search(cpu_queries[: args.batch_size])  # warm-up
        found, seconds = timed(lambda: search(cpu_queries), device)
        found = [[int(doc) for doc, _ in row] for row in found]
        result["settings"].append(
            {
                **params,
                "queries_per_s": len(queries) / seconds,
                **latencies(search, cpu_queries, device, args.latency_queries),
                "recall_at_10": recall(found, truth),
            }
        )
    return result


# ------------------------------------------------------------------------------------------ reporting


def best_at_recall(settings: list[dict], floor: float) -> dict | None:
    eligible = [s for s in settings if s["recall_at_10"] >= floor]
    return max(eligible, key=lambda s: s["queries_per_s"]) if eligible else None


def compare(ours: dict, theirs: dict) -> list[dict]:
    """For each fast-plaid setting: our fastest setting with at least its recall, and the speed ratio."""
    rows = []
    for their in theirs.get("settings", []):
        our = best_at_recall(ours["settings"], their["recall_at_10"])
        speedup = our["queries_per_s"] / their["queries_per_s"] if our else None
        rows.append({"fast_plaid": their, "ours_fastest_at_equal_or_better_recall": our, "speedup": speedup})
    return rows


SEARCH_COLUMNS = [
    "nbits",
    "engine",
    "n_probe / n_query_probe / threshold / candidates",
    "recall@10",
    "vs decompressed",
    "probed / shortlisted",
    "queries/s",
    "p50 ms",
    "p99 ms",
]
SIZE_COLUMNS = ["nbits", "engine", "build s", "bytes/token on disk", "bytes/token in memory"]


def search_cells(s: dict) -> list[str]:
    """The search table's cells after nbits and engine, for one setting's measurements."""
    knobs = " / ".join(str(v) for k, v in s.items() if k.startswith(("n_", "centroid")))
    versus = f"{s['recall_at_10_vs_decompressed']:.3f}" if "recall_at_10_vs_decompressed" in s else ""
    stages = s.get("stages_vs_decompressed")
    stages = f"{stages['probed_recall']:.3f} / {stages['shortlisted_recall']:.3f}" if stages else ""
    speed = [f"{s['queries_per_s']:.0f}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}"]
    return [knobs, f"{s['recall_at_10']:.3f}", versus, stages, *speed]


def table(result: dict) -> str:
    corpus = result["corpus"]
    lines = [
        f"PLAID search, {corpus['documents']} docs / {corpus['tokens']} tokens x {corpus['dim']} dims, "
        f"{corpus['queries']} queries x {corpus['query_tokens']} tokens, top 10, on {result['device']}",
        "",
    ]
    search_rows, size_rows = [], []
    for run in result["runs"]:
        for engine in ("ours", "fast_plaid"):
            block = run[engine]
            if "skipped" in block:
                search_rows.append([run["nbits"], engine, f"skipped: {block['skipped']}", *[""] * 6])
                continue
            search_rows += [[run["nbits"], engine, *search_cells(s)] for s in block["settings"]]
            memory = f"{block['memory_bytes_per_token']:.1f}" if "memory_bytes_per_token" in block else ""
            size_rows.append(
                [
                    run["nbits"],
                    engine,
                    f"{block['build_s']:.1f}",
                    f"{block['disk_bytes_per_token']:.1f}",
                    memory,
                ]
            )
    lines += markdown_table(SEARCH_COLUMNS, search_rows)
    lines += ["", *markdown_table(SIZE_COLUMNS, size_rows)]
    for run in result["runs"]:
        for row in run.get("comparison", []):
            their, our = row["fast_plaid"], row["ours_fastest_at_equal_or_better_recall"]
            if our:
                lines.append(
                    f"\nnbits={run['nbits']}: fast-plaid n_ivf_probe={their['n_ivf_probe']}, "
                    f"n_full_scores={their['n_full_scores']}: recall {their['recall_at_10']:.3f} at "
                    f"{their['queries_per_s']:.0f} q/s; ours at recall {our['recall_at_10']:.3f}: "
                    f"{our['queries_per_s']:.0f} q/s ({row['speedup']:.1f}x)"
                )
    return "\n".join(lines)


def add_corpus_and_output_options(parser: argparse.ArgumentParser, name: str) -> None:
    """--colbert / --corpus (a real corpus instead of the synthetic one) and --out."""
    parser.add_argument("--colbert", type=Path, default=None, help="ColBERT folder: a real corpus")
    parser.add_argument("--corpus", type=Path, default=None, help="BEIR folder encoded by --colbert")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default: benchmarks/results/{name}[_small].json"
    )


def _setting(text: str) -> tuple[int, int, float, int]:
    n_probe, n_query_probe, threshold, n_candidates = text.split(",")
    return int(n_probe), int(n_query_probe), float(threshold), int(n_candidates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU smoke run on a tiny corpus")
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--mean-len", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nbits", type=int, nargs="+", default=None, help="default: 2 4 (--small: 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--no-fast-plaid", action="store_true")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="N_PROBE,N_QUERY_PROBE,THRESHOLD,CANDIDATES",
        help="our search settings to measure (default: a fixed sweep, fastest first)",
    )
    add_corpus_and_output_options(parser, "plaid")
    args = parser.parse_args()
    if args.small:
        args.docs, args.mean_len, args.queries, args.latency_queries = 2000, 48, 64, 16
    args.nbits = args.nbits or ([2] if args.small else [2, 4])
    args.settings = [_setting(text) for text in args.settings] if args.settings else OUR_SETTINGS
    if args.out is None:
        args.out = Path(f"benchmarks/results/plaid{'_small' if args.small else ''}.json")
    if (args.colbert is None) != (args.corpus is None):
        parser.error("--colbert and --corpus go together")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dim, q_len = 128, 32
    vocab = 32768 if args.docs >= 50_000 else 4096

    start = time.perf_counter()
    if args.colbert is not None:
        tokens, lengths, queries = colbert_corpus(args.colbert, args.corpus, args.docs, args.queries, device)
        args.docs, args.queries, (q_len, dim) = len(lengths), len(queries), queries.shape[1:]
        source = f"ColBERT {args.colbert.name} over {args.corpus}"
    else:
        tokens, lengths, queries = make_corpus(
            args.docs, args.mean_len, dim, vocab, args.queries, q_len, device
        )
        source = "synthetic, clustered ColBERT-like, see make_corpus in benchmarks/plaid.py"
    queries = queries if device.type == "cuda" else queries.float()
    corpus_s = time.perf_counter() - start

    def original_tokens(begin, end):
        return tokens[begin:end]

    truth, exhaustive_s = timed(lambda: exhaustive_top_k(original_tokens, lengths, queries, 10), device)
    print(
        f"corpus {args.docs} docs / {len(tokens)} tokens in {corpus_s:.1f} s; exhaustive MaxSim "
        f"for {args.queries} queries in {exhaustive_s:.1f} s"
    )
    result = {
        "benchmark": "plaid",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "corpus": {
            "documents": args.docs,
            "tokens": len(tokens),
            "mean_tokens": len(tokens) / args.docs,
            "dim": dim,
            "vocabulary": vocab if args.colbert is None else None,
            "queries": args.queries,
            "query_tokens": q_len,
            "source": source,
        },
        "exhaustive_maxsim_s": exhaustive_s,
        "runs": [],
    }
    for nbits in args.nbits:
        with tempfile.TemporaryDirectory() as tmp:
            run = {"nbits": nbits}
            run["ours"] = bench_ours(tokens, lengths, queries, truth, nbits, args, device, Path(tmp))
            shutil.rmtree(Path(tmp) / "ours", ignore_errors=True)
            if args.no_fast_plaid:
                run["fast_plaid"] = {"skipped": "--no-fast-plaid"}
            else:
                run["fast_plaid"] = bench_fast_plaid(
                    tokens, lengths, queries, truth, nbits, args, device, Path(tmp)
                )
            run["comparison"] = compare(run["ours"], run["fast_plaid"])
        result["runs"].append(run)
        print(f"nbits={nbits} done")

    write_result(result, args.out, table(result))


if __name__ == "__main__":
    main()
