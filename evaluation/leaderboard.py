"""Leaderboards: every system of a config on every data set -> a Markdown table, JSON and a plot.

A config (YAML or JSON):

    output: runs/leaderboard          # optional; the CLI's --output wins
    depth: 100                        # documents retrieved per query
    datasets:
      - name: stdlib-code
        data: data/stdlib-code        # a BEIR folder, or beir:<name>, mldr, coir:<name>, codesearchnet:<lang>
        split: test
    systems:
      - name: bm25
        system: bm25
      - name: minilm
        system: /models/all-MiniLM-L6-v2
        index: flat                   # flat | hnsw | ivfpq | plaid
        rerank: /models/my-cross-encoder   # optional

Each (system, data set) run goes to `<output>/runs/<system>__<data set>/` with a `key.json` describing
exactly what ran (config entries, data and model file stamps). A later call whose key matches reuses
the saved metrics instead of running again. The plot puts mean NDCG@10 against encoding throughput
(documents indexed per second).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from mbert_retrieval.evaluation.data import DataFormatError
from mbert_retrieval.evaluation.harness import evaluate_retriever, write_json
from mbert_retrieval.evaluation.metrics import METRICS

from mbert_retrieval.files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

KEY_VERSION = 1


class LeaderboardConfigError(ValueError):
    """A leaderboard config that is missing, unreadable or incomplete."""


@dataclass
class DatasetEntry:
    name: str
    data: str
    split: str = "test"


@dataclass
class SystemEntry:
    name: str
    system: str
    index: str = "flat"
    rerank: str | None = None
    first_stage_k: int = 100


@dataclass
class LeaderboardConfig:
    datasets: list[DatasetEntry]
    systems: list[SystemEntry]
    depth: int = 100
    output: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)


@dataclass
class Entry:
    system: str
    dataset: str
    metrics: dict[str, float]
    info: dict
    cached: bool


# ----------------------------------------------------------------------------------------------- config


def load_config(path: str | Path) -> LeaderboardConfig:
    path = Path(path)
    if not path.is_file():
        raise LeaderboardConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as err:  # yaml and json raise their own parse errors
        raise LeaderboardConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {err}") from err
    return parse_config(raw, path.parent)


def parse_config(raw, base_dir: Path) -> LeaderboardConfig:
    if not isinstance(raw, dict):
        raise LeaderboardConfigError("the config must be a mapping with 'datasets' and 'systems'")
    unknown = set(raw) - {"datasets", "systems", "depth", "output"}
    if unknown:
        raise LeaderboardConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    datasets = [build_entry(DatasetEntry, item, "datasets", "data") for item in list_of(raw, "datasets")]
    systems = [build_entry(SystemEntry, item, "systems", "system") for item in list_of(raw, "systems")]
    for what, entries in (("dataset", datasets), ("system", systems)):
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise LeaderboardConfigError(f"{what} names must be unique, got {names}")
    for dataset in datasets:  # relative folders are relative to the config file
        if not Path(dataset.data).is_absolute() and (base_dir / dataset.data).exists():
            dataset.data = str(base_dir / dataset.data)
    for system in systems:
        for attr in ("system", "rerank"):
            value = getattr(system, attr)
            if value and not Path(value).is_absolute() and (base_dir / value).exists():
                setattr(system, attr, str(base_dir / value))
    depth = raw.get("depth", 100)
    if not isinstance(depth, int) or depth <= 0:
        raise LeaderboardConfigError(f"depth must be a positive integer, got {depth!r}")
    return LeaderboardConfig(datasets, systems, depth, raw.get("output"), base_dir)


def list_of(raw: dict, key: str) -> list:
    items = raw.get(key)
    if not isinstance(items, list) or not items:
        raise LeaderboardConfigError(f"the config needs a non-empty '{key}' list")
    return items


def build_entry(cls, item, section: str, required: str):
    if isinstance(item, str):  # shorthand: just the data set / system spec
        item = {"name": safe_name(Path(item).name or item), required: item}
    if not isinstance(item, dict) or required not in item:
        raise LeaderboardConfigError(f"each entry of '{section}' needs '{required}', got {item!r}")
    item = {"name": safe_name(Path(str(item[required])).name), **item}
    try:
        return cls(**item)
    except TypeError as err:
        raise LeaderboardConfigError(f"'{section}' entry {item!r}: {err}") from err


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "unnamed"


# ---------------------------------------------------------------------------------------------- running


def run_leaderboard(
    config: LeaderboardConfig,
    output_dir: str | Path,
    *,
    force: bool = False,
    device: str | None = None,
    show_progress: bool = True,
) -> list[Entry]:
    """Run (or reuse) every system on every data set, then write leaderboard.md / .json / .png."""
    from mbert_retrieval.evaluation.public import resolve_dataset

    from mbert_retrieval.search.models import build_retriever

    output_dir = Path(output_dir)
    entries = []
    for dataset_entry in config.datasets:
        dataset = None  # loaded only when some system needs to run
        for system_entry in config.systems:
            run_dir = output_dir / "runs" / f"{safe_name(system_entry.name)}__{safe_name(dataset_entry.name)}"
            key = run_key(system_entry, dataset_entry, config.depth)
            cached = None if force else read_cached(run_dir, key)
            if cached is not None:
                logger.info("reusing %s on %s (cached in %s)", system_entry.name, dataset_entry.name, run_dir)
                entries.append(Entry(system_entry.name, dataset_entry.name, *cached, cached=True))
                continue
            if dataset is None:
                dataset = resolve_dataset(dataset_entry.data, dataset_entry.split)
            logger.info("running %s on %s", system_entry.name, dataset_entry.name)
            retriever = build_retriever(
                system_entry.system,
                system_entry.index,
                system_entry.rerank,
                first_stage_k=system_entry.first_stage_k,
                device=device,
                show_progress=show_progress,
            )
            (run_dir / "metrics.json").unlink(missing_ok=True)  # a stale result must not survive a failure
            result = evaluate_retriever(
                retriever, dataset, k=config.depth, output_dir=run_dir, show_progress=show_progress
            )
            write_json(run_dir / "key.json", key)
            entries.append(
                Entry(system_entry.name, dataset_entry.name, result.metrics, result.info, cached=False)
            )
    write_leaderboard(entries, config, output_dir)
    return entries


def run_key(system: SystemEntry, dataset: DatasetEntry, depth: int) -> dict:
    """Everything a result depends on: the entries, plus size and mtime of the data and model files."""
    return {
        "version": KEY_VERSION,
        "system": vars(system),
        "dataset": vars(dataset),
        "depth": depth,
        "stamps": {
            "data": file_stamps(dataset.data),
            "system": file_stamps(system.system.removeprefix("hybrid:").split(":", 1)[-1]),
            "rerank": file_stamps(system.rerank.split(":", 1)[-1]) if system.rerank else None,
        },
    }


def file_stamps(location: str) -> list | None:
    """(relative path, size, mtime) of the files in a folder (two levels deep); None when not a folder."""
    root = Path(location)
    if not root.is_dir():
        return None
    files = sorted(p for pattern in ("*", "*/*") for p in root.glob(pattern) if p.is_file())
    return [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def read_cached(run_dir: Path, key: dict) -> tuple[dict, dict] | None:
    try:
        if json.loads((run_dir / "key.json").read_text()) != json.loads(json.dumps(key)):
            return None
        metrics = json.loads((run_dir / "metrics.json").read_text())
        info = json.loads((run_dir / "info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if set(metrics) != set(METRICS):
        return None
    return metrics, info


# ---------------------------------------------------------------------------------------------- writing


def write_leaderboard(entries: list[Entry], config: LeaderboardConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(entries, config)
    write_json(
        output_dir / "leaderboard.json",
        {"systems": rows, "runs": [vars(e) for e in entries], "depth": config.depth},
    )
    atomic_write_text(output_dir / "leaderboard.md", markdown_table(rows, [d.name for d in config.datasets]))
    plot_quality_vs_throughput(rows, output_dir / "leaderboard.png")


def summarise(entries: list[Entry], config: LeaderboardConfig) -> list[dict]:
    """One row per system: NDCG@10 per data set, the means of every metric, and documents/s."""
    rows = []
    for system in config.systems:
        mine = [e for e in entries if e.system == system.name]
        if not mine:
            continue
        means = {m: sum(e.metrics[m] for e in mine) / len(mine) for m in METRICS}
        speeds = [e.info.get("documents_per_second") for e in mine if e.info.get("documents_per_second")]
        rows.append(
            {
                "system": system.name,
                "spec": system.system,
                "index": system.index,
                "rerank": system.rerank,
                "ndcg@10_per_dataset": {e.dataset: e.metrics["NDCG@10"] for e in mine},
                "mean": means,
                "documents_per_second": sum(speeds) / len(speeds) if speeds else None,
            }
        )
    return sorted(rows, key=lambda row: row["mean"]["NDCG@10"], reverse=True)


def markdown_table(rows: list[dict], dataset_names: list[str]) -> str:
    header = ["system", *dataset_names, "mean NDCG@10", "mean MRR@10", "mean Recall@100", "docs/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    for row in rows:
        per_dataset = [fmt(row["ndcg@10_per_dataset"].get(name)) for name in dataset_names]
        speed = row["documents_per_second"]
        cells = [
            row["system"],
            *per_dataset,
            fmt(row["mean"]["NDCG@10"]),
            fmt(row["mean"]["MRR@10"]),
            fmt(row["mean"]["Recall@100"]),
            f"{speed:,.0f}" if speed else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = "\nNDCG@10 per data set; docs/s: documents encoded and indexed per second.\n"
    return "\n".join(lines) + "\n" + note


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot_quality_vs_throughput(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        speed = row["documents_per_second"]
        if not speed:
            continue
        ax.scatter(speed, row["mean"]["NDCG@10"], s=40)
        ax.annotate(row["system"], (speed, row["mean"]["NDCG@10"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("encoding throughput (documents / s, log scale)")
    ax.set_ylabel("mean NDCG@10")
    ax.set_title("Retrieval quality against encoding throughput")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def require_datasets_exist(config: LeaderboardConfig) -> None:
    """Fail early on a data folder that does not exist (named sets are checked when loaded)."""
    for dataset in config.datasets:
        if ":" not in dataset.data and dataset.data.lower() != "mldr" and not Path(dataset.data).is_dir():
            raise DataFormatError(f"data set {dataset.name!r}: {dataset.data} is not a folder")
