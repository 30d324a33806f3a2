"""Retrieval data sets in the BEIR layout, read strictly and written atomically.

A BEIR folder:

    corpus.jsonl        {"_id": "d1", "title": "...", "text": "..."}   one document per line
    queries.jsonl       {"_id": "q1", "text": "..."}                   one query per line
    qrels/test.tsv      query-id <tab> corpus-id <tab> score            with a header row
    qrels/dev.tsv, qrels/train.tsv (optional)

Malformed lines are errors that name the file and line. Softer problems (a duplicate id, a qrels row
naming a query or document that does not exist) are skipped, counted in `RetrievalDataset.problems`
and logged once per kind.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mbert_retrieval.files import atomic_write_text

logger = logging.getLogger(__name__)

BEIR_LAYOUT = (
    "corpus.jsonl ({'_id', 'title', 'text'} per line), queries.jsonl ({'_id', 'text'} per line) "
    "and qrels/<split>.tsv (query-id, corpus-id, score; with a header row)"
)
MAX_REPORTED_ERRORS = 10

Corpus = dict[str, dict[str, str]]
Qrels = dict[str, dict[str, int]]


class DataFormatError(ValueError):
    """A data set that is missing, empty or malformed; the message names the file and line."""


@dataclass
class RetrievalDataset:
    """A corpus, queries and relevance judgements, in the dict shapes BEIR and pytrec_eval use."""

    corpus: Corpus  # doc id -> {"title": ..., "text": ...}
    queries: dict[str, str]  # query id -> text
    qrels: Qrels  # query id -> {doc id: relevance}
    name: str = ""
    split: str = "test"
    problems: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if not self.corpus:
            raise DataFormatError(f"{self.name or 'data set'}: the corpus is empty")

    @property
    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    def document_texts(self, ids: list[str] | None = None) -> list[str]:
        """What a model reads for each document: the title and text joined by a space."""
        ids = self.doc_ids if ids is None else ids
        return [document_text(self.corpus[i]) for i in ids]

    def summary(self) -> str:
        judged = sum(len(docs) for docs in self.qrels.values())
        return (
            f"{self.name or 'data set'} [{self.split}]: {len(self.corpus)} documents, "
            f"{len(self.queries)} queries, {judged} judgements"
        )


def document_text(document: dict[str, str]) -> str:
    title, text = document.get("title") or "", document.get("text") or ""
    return f"{title} {text}".strip() if title else text


# ------------------------------------------------------------------------------------------- reading


def load_beir(folder: str | Path, split: str = "test", name: str | None = None) -> RetrievalDataset:
    """Load a BEIR folder; the queries kept are those judged in `qrels/<split>.tsv`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: no such folder; a BEIR folder holds {BEIR_LAYOUT}")
    problems: Counter = Counter()
    corpus = read_corpus(folder / "corpus.jsonl", problems)
    queries = read_queries(folder / "queries.jsonl", problems)
    qrels = read_qrels(qrels_path(folder, split), problems)
    qrels = drop_unknown(qrels, queries, corpus, problems)
    queries = {qid: queries[qid] for qid in qrels}
    report_problems(folder, problems)
    return RetrievalDataset(corpus, queries, qrels, name or folder.name, split, problems)


def qrels_path(folder: Path, split: str) -> Path:
    path = folder / "qrels" / f"{split}.tsv"
    if not path.exists():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise DataFormatError(
            f"{path} is missing (splits available: {', '.join(available) or 'none'}); "
            f"a BEIR folder holds {BEIR_LAYOUT}"
        )
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; every malformed line is reported together."""
    if not path.exists():
        raise DataFormatError(f"{path} is missing; a BEIR folder holds {BEIR_LAYOUT}")
    errors = []
    rows = []
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"line {number}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            errors.append(f"line {number}: expected a JSON object, got {type(row).__name__}")
            continue
        rows.append((number, row))
    raise_errors(path, errors)
    return iter(rows)


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file. A folder, an unreadable file or bytes that are not UTF-8 raise
    DataFormatError naming the file (and the line)."""
    if path.is_dir():
        raise DataFormatError(f"{path} is a folder, not a file")
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataFormatError(
                        f"{path}: line {number} is not UTF-8 text (a binary file?)"
                    ) from None
    except OSError as err:
        raise DataFormatError(f"{path}: cannot be read ({err.strerror or err})") from err


def read_corpus(path: Path, problems: Counter) -> Corpus:
    corpus: Corpus = {}
    errors = []
    for number, row in read_jsonl(path):
        doc_id, text = row.get("_id"), row.get("text")
        title = row.get("title") or ""
        if not isinstance(doc_id, str | int) or doc_id == "":
            errors.append(f"line {number}: missing '_id'")
        elif not isinstance(text, str) or not isinstance(title, str):
            errors.append(f"line {number}: 'text' and 'title' must be strings")
        elif str(doc_id) in corpus:
            problems["duplicate document ids (later copies ignored)"] += 1
        else:
            corpus[str(doc_id)] = {"title": title, "text": text}
    raise_errors(path, errors)
    if not corpus:
        raise DataFormatError(f"{path}: the corpus is empty")
    return corpus


def read_queries(path: Path, problems: Counter) -> dict[str, str]:
    queries: dict[str, str] = {}
    errors = []
    for number, row in read_jsonl(path):
        query_id, text = row.get("_id"), row.get("text")
        if not isinstance(query_id, str | int) or query_id == "":
            errors.append(f"line {number}: missing '_id'")
        elif not isinstance(text, str):
            errors.append(f"line {number}: 'text' must be a string")
        elif str(query_id) in queries:
            problems["duplicate query ids (later copies ignored)"] += 1
        else:
            queries[str(query_id)] = text
    raise_errors(path, errors)
    return queries


def read_qrels(path: Path, problems: Counter) -> Qrels:
    qrels: Qrels = {}
    errors = []
    for number, row in enumerate(tsv_rows(path), start=1):
        if not row or not "".join(row).strip():
            continue
        if number == 1 and not row[-1].strip().lstrip("-").isdigit():
            continue  # the header row
        if len(row) != 3:
            errors.append(f"line {number}: expected 3 tab-separated columns, got {len(row)}")
            continue
        query_id, doc_id, score = (cell.strip() for cell in row)
        try:
            relevance = int(score)
        except ValueError:
            errors.append(f"line {number}: score {score!r} is not an integer")
            continue
        if doc_id in qrels.setdefault(query_id, {}):
            problems["duplicate qrels rows (later copies ignored)"] += 1
            continue
        qrels[query_id][doc_id] = relevance
    raise_errors(path, errors)
    return qrels


def tsv_rows(path: Path) -> Iterator[list[str]]:
    rows = csv.reader(text_lines(path), delimiter="\t")
    try:
        yield from rows
    except csv.Error as err:
        raise DataFormatError(f"{path}: line {rows.line_num}: not tab-separated text ({err})") from None


def drop_unknown(qrels: Qrels, queries: dict[str, str], corpus: Corpus, problems: Counter) -> Qrels:
    kept: Qrels = {}
    for query_id, docs in qrels.items():
        if query_id not in queries:
            problems["qrels rows naming unknown queries (ignored)"] += len(docs)
            continue
        known = {doc_id: rel for doc_id, rel in docs.items() if doc_id in corpus}
        if len(known) < len(docs):
            problems["qrels rows naming unknown documents (ignored)"] += len(docs) - len(known)
        if known:
            kept[query_id] = known
    if not kept:
        raise DataFormatError("no qrels row names a known query and a known document")
    return kept


def raise_errors(path: Path, errors: list[str]) -> None:
    if not errors:
        return
    shown = "; ".join(errors[:MAX_REPORTED_ERRORS])  # one line: a log or a terminal shows it whole
    more = f"; and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
    raise DataFormatError(f"{path}: {len(errors)} malformed line(s): {shown}{more}")


def report_problems(source: Path | str, problems: Counter) -> None:
    for what, count in sorted(problems.items()):
        if count:
            logger.warning("%s: %d %s", source, count, what)


# ------------------------------------------------------------------------------------------- writing


def save_beir(
    folder: str | Path,
    corpus: Corpus,
    queries: dict[str, str],
    qrels_by_split: dict[str, Qrels],
    *,
    query_metadata: dict[str, dict] | None = None,
) -> Path:
    """Write a BEIR folder (each file atomically). A document's "metadata" entry, and a query's entry
    in `query_metadata`, are written as the record's "metadata" (the loaders ignore it)."""
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        folder / "corpus.jsonl",
        "".join(
            json.dumps({"_id": i, "title": d.get("title", ""), "text": d["text"], **metadata_of(d)}) + "\n"
            for i, d in corpus.items()
        ),
    )
    query_metadata = query_metadata or {}
    atomic_write_text(
        folder / "queries.jsonl",
        "".join(
            json.dumps({"_id": i, "text": t, **metadata_of({"metadata": query_metadata.get(i)})}) + "\n"
            for i, t in queries.items()
        ),
    )
    for split, qrels in qrels_by_split.items():
        rows = ["query-id\tcorpus-id\tscore\n"]
        rows += [f"{q}\t{d}\t{rel}\n" for q, docs in qrels.items() for d, rel in docs.items()]
        atomic_write_text(folder / "qrels" / f"{split}.tsv", "".join(rows))
    return folder


def metadata_of(record: dict) -> dict:
    return {"metadata": record["metadata"]} if record.get("metadata") else {}
