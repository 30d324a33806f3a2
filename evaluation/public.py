"""Public retrieval sets by name: BEIR, MLDR (English) and the CoIR code sets.

Each is read from a local folder when one is there, and otherwise downloaded (BEIR through beir's
downloader; MLDR and CoIR through Hugging Face `datasets`) and saved as a BEIR folder under
`cache_dir`, so later runs work offline. Without a network and without the folder, the error says
which folder layout to provide.

    load_named_dataset("beir:scifact", split="test")
    load_named_dataset("mldr", split="test")
    load_named_dataset("coir:cosqa")
    load_named_dataset("codesearchnet:python")
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mbert_retrieval.evaluation.data import (
    BEIR_LAYOUT,
    DataFormatError,
    RetrievalDataset,
    load_beir,
    read_jsonl,
    save_beir,
)

from mbert_retrieval.files import atomic_write_text

logger = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
MLDR_HUB_ID = "Shitao/MLDR"
CODESEARCHNET_LANGUAGES = ("python", "javascript", "go", "ruby", "java", "php")


@dataclass(frozen=True)
class HubRetrievalSet:
    """A retrieval set on the Hugging Face hub in the CoIR / MTEB layout: configs for corpus, queries
    and qrels (`<prefix>corpus`, `<prefix>queries`, and `<prefix>qrels` or `default`)."""

    hub_id: str
    prefix: str = ""
    qrels_config: str = "default"


CODE_SETS = {
    "cosqa": HubRetrievalSet("CoIR-Retrieval/cosqa"),
    "stackoverflow-qa": HubRetrievalSet("mteb/StackOverflowQA"),
    **{
        f"codesearchnet-{lang}": HubRetrievalSet("CoIR-Retrieval/CodeSearchNet", f"{lang}-", f"{lang}-qrels")
        for lang in CODESEARCHNET_LANGUAGES
    },
}
CODE_ALIASES = {
    "stackqa": "stackoverflow-qa",
    **{f"csn-{lang}": f"codesearchnet-{lang}" for lang in CODESEARCHNET_LANGUAGES},
}


class DatasetUnavailable(DataFormatError):
    """A named data set that is neither on disk nor downloadable right now."""


def default_cache_dir() -> Path:
    return Path(
        os.environ.get("MBERT_RETRIEVAL_DATA", Path.home() / ".cache" / "mbert-retrieval" / "datasets")
    )


def resolve_dataset(
    spec: str | Path, split: str = "test", cache_dir: str | Path | None = None
) -> RetrievalDataset:
    """A BEIR folder path, or a named set (see `load_named_dataset`)."""
    path = Path(spec)
    if path.is_dir():
        return load_beir(path, split)
    if ":" in str(spec) or str(spec).lower() == "mldr":
        return load_named_dataset(str(spec), split, cache_dir)
    raise DataFormatError(f"{spec}: no such folder; a BEIR folder holds {BEIR_LAYOUT}")


def load_named_dataset(
    spec: str, split: str = "test", cache_dir: str | Path | None = None
) -> RetrievalDataset:
    """`beir:<name>`, `mldr[:en]`, `coir:<cosqa|stackoverflow-qa|codesearchnet-<lang>>` or
    `codesearchnet:<lang>`; see the module docstring."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    family, _, name = spec.partition(":")
    family = family.lower()
    if family == "beir" and name:
        return load_public_beir(name, split, cache_dir)
    if family == "mldr":
        if name not in ("", "en"):
            raise DataFormatError(f"only the English MLDR set is supported, not {name!r}")
        return load_mldr(split=split, cache_dir=cache_dir)
    if family in ("coir", "code") and name:
        return load_code_retrieval(name, split, cache_dir)
    if family in ("codesearchnet", "csn") and name:
        return load_code_retrieval(f"codesearchnet-{name}", split, cache_dir)
    raise DataFormatError(
        f"unknown data set {spec!r}: give a BEIR folder, or beir:<name>, mldr, coir:<name> or codesearchnet:<language>"
    )


# ----------------------------------------------------------------------------------------------- BEIR


def load_public_beir(name: str, split: str = "test", cache_dir: str | Path | None = None) -> RetrievalDataset:
    """A public BEIR set (scifact, nfcorpus, fiqa, ...): `cache_dir/<name>`, downloaded when missing."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / name
    if not (folder / "corpus.jsonl").exists():
        download_beir(name, cache_dir)
    return load_beir(folder, split, name=name)


def download_beir(name: str, cache_dir: Path) -> Path:
    from beir import util

    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / f"{name}.zip"
    try:
        util.download_and_unzip(BEIR_URL.format(name=name), str(cache_dir))
    except Exception as err:  # requests, zipfile and OS errors: all mean "not available now"
        archive.unlink(missing_ok=True)
        raise DatasetUnavailable(
            f"could not download the BEIR set {name!r} ({type(err).__name__}: {err}). Offline, put it at "
            f"{cache_dir / name}/ with {BEIR_LAYOUT}, or pass that folder to --data."
        ) from err
    archive.unlink(missing_ok=True)
    return cache_dir / name


# ------------------------------------------------------------------------------------ Hugging Face sets


def load_hub_set(hub: HubRetrievalSet, split: str, name: str, cache_dir: Path) -> RetrievalDataset:
    """A CoIR-layout hub set, cached as a BEIR folder under cache_dir/<name>."""
    folder = cache_dir / name
    if not (folder / "corpus.jsonl").exists():
        corpus, queries, qrels = fetch_hub_set(hub, folder)
        save_beir(folder, corpus, queries, qrels)
    return load_beir(folder, split, name=name)


def fetch_hub_set(hub: HubRetrievalSet, folder: Path):
    datasets = import_datasets(folder)
    try:
        corpus_rows = first_split(datasets.load_dataset(hub.hub_id, f"{hub.prefix}corpus"))
        query_rows = first_split(datasets.load_dataset(hub.hub_id, f"{hub.prefix}queries"))
        qrels_splits = datasets.load_dataset(hub.hub_id, hub.qrels_config)
    except Exception as err:  # offline, missing repo or config: datasets raises many types
        raise unavailable(hub.hub_id, folder, err) from err
    corpus = {str(r["_id"]): {"title": r.get("title") or "", "text": r["text"]} for r in corpus_rows}
    queries = {str(r["_id"]): r["text"] for r in query_rows}
    qrels = {}
    for split_name, rows in qrels_splits.items():
        split_qrels = qrels.setdefault(split_name, {})
        for row in rows:
            split_qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    return corpus, queries, qrels


def load_code_retrieval(
    name: str, split: str = "test", cache_dir: str | Path | None = None
) -> RetrievalDataset:
    """CoSQA, StackOverflow-QA or CodeSearchNet (one language) in the CoIR layout.

    A local copy is any BEIR folder at `cache_dir/<name>` (CoIR's own downloads are BEIR folders)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = CODE_ALIASES.get(name.lower(), name.lower())
    if name not in CODE_SETS:
        raise DataFormatError(f"unknown code retrieval set {name!r}; known: {', '.join(sorted(CODE_SETS))}")
    return load_hub_set(CODE_SETS[name], split, name, cache_dir)


# ------------------------------------------------------------------------------------------------ MLDR


def load_mldr(folder: str | Path | None = None, split: str = "test", cache_dir: str | Path | None = None):
    """English MLDR (long documents, up to ~8k tokens; encode them whole with a long max_length).

    `folder`: a local copy, either a BEIR folder or MLDR's own files (`corpus.jsonl` with
    {"docid", "text"} and `<split>.jsonl` with {"query_id", "query", "positive_passages"}).
    Without it, `cache_dir/mldr-en` is used, filled from the hub when missing."""
    if folder is not None:
        return load_mldr_folder(Path(folder), split)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / "mldr-en"
    if not (folder / "qrels" / f"{split}.tsv").exists():
        save_mldr_from_hub(folder, split)
    return load_beir(folder, split, name="mldr-en")


def load_mldr_folder(folder: Path, split: str) -> RetrievalDataset:
    if (folder / "qrels").is_dir():
        return load_beir(folder, split, name="mldr-en")
    queries_file = folder / f"{split}.jsonl"
    if not queries_file.exists():
        raise DataFormatError(
            f"{folder}: neither a BEIR folder ({BEIR_LAYOUT}) nor MLDR's files "
            f"(corpus.jsonl with docid/text and {split}.jsonl with query_id/query/positive_passages)"
        )
    corpus = {
        str(r["docid"]): {"title": "", "text": r["text"]} for r in read_plain_jsonl(folder / "corpus.jsonl")
    }
    queries, qrels = mldr_queries(read_plain_jsonl(queries_file))
    converted = folder / f".beir-{split}"
    save_beir(converted, corpus, queries, {split: qrels})
    return load_beir(converted, split, name="mldr-en")


def save_mldr_from_hub(folder: Path, split: str) -> None:
    datasets = import_datasets(folder)
    try:
        rows = datasets.load_dataset(MLDR_HUB_ID, "en", split=split)
        corpus_rows = datasets.load_dataset(MLDR_HUB_ID, "corpus-en", split="corpus")
    except Exception as err:  # offline, missing repo or config: datasets raises many types
        raise unavailable(MLDR_HUB_ID, folder, err) from err
    corpus = {str(r["docid"]): {"title": "", "text": r["text"]} for r in corpus_rows}
    queries, qrels = mldr_queries(rows)
    existing = {}
    if (folder / "queries.jsonl").exists():  # other splits saved before share the folder
        existing = {r["_id"]: r["text"] for r in read_plain_jsonl(folder / "queries.jsonl")}
    save_beir(folder, corpus, {**existing, **queries}, {split: qrels})


def mldr_queries(rows) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    queries, qrels = {}, {}
    for row in rows:
        query_id = str(row["query_id"])
        queries[query_id] = row["query"]
        qrels[query_id] = {str(p["docid"]): 1 for p in row["positive_passages"]}
    return queries, qrels


def load_mldr_training(folder: str | Path | None = None, cache_dir: str | Path | None = None) -> list[dict]:
    """MLDR's in-domain training split: [{"query", "positive": [texts], "negatives": [texts]}].

    From `folder/train.jsonl` (MLDR's own format) or the hub (cached as cache_dir/mldr-en/train.jsonl)."""
    if folder is not None:
        path = Path(folder) / "train.jsonl"
        if not path.exists():
            raise DataFormatError(
                f"{path} is missing (MLDR training file: query_id/query/positive_passages/negative_passages)"
            )
        rows = read_plain_jsonl(path)
    else:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache_dir / "mldr-en" / "train.jsonl"
        if path.exists():
            rows = read_plain_jsonl(path)
        else:
            datasets = import_datasets(path.parent)
            try:
                rows = list(datasets.load_dataset(MLDR_HUB_ID, "en", split="train"))
            except Exception as err:  # offline, missing repo or config
                raise unavailable(MLDR_HUB_ID, path.parent, err) from err
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return [
        {
            "query": r["query"],
            "positive": [p["text"] for p in r["positive_passages"]],
            "negatives": [p["text"] for p in r.get("negative_passages") or []],
        }
        for r in rows
    ]


# -------------------------------------------------------------------------------------------- helpers


def import_datasets(folder: Path):
    try:
        import datasets
    except ImportError as err:
        raise DatasetUnavailable(
            f"the `datasets` package is needed to download this set (pip install 'mbert-retrieval[eval]'), "
            f"or provide it at {folder} with {BEIR_LAYOUT}"
        ) from err
    return datasets


def first_split(dataset_dict):
    return next(iter(dataset_dict.values()))


def unavailable(hub_id: str, folder: Path, err: Exception) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"could not load {hub_id!r} from the Hugging Face hub ({type(err).__name__}: {str(err)[:200]}). "
        f"Offline, provide it at {folder}/ with {BEIR_LAYOUT}, or pass such a folder to --data."
    )


def read_plain_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]
