"""Training data, read on demand so a corpus need not fit in memory.

Every source is a random-access sequence of `Example`s (the trainer shuffles by index). File sources
are scanned once at start: each record is parsed and checked, and only the byte offset of each good
one is kept; the text is read again when the example is used. Bad records (not JSON, missing
fields, empty text, unknown ids) are never used and never silently dropped: they are counted by
reason in `source.problems` and reported.

Sources:
- `JsonlExamples`: one JSON object per line, `{"query", "positive", "negatives": [...]}` (pairs
  when `negatives` is absent), or `{"query", "documents": [...], "scores": [...]}` with teacher
  scores for distillation (the first document is taken as the positive).
- `BeirExamples`: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); every judged
  (query, document) pair with a positive score is one example.
- `HFExamples`: a Hugging Face dataset with query / positive / negative columns.
- `TextCorpus`: plain documents for MLM pretraining (a .jsonl with "text", a .txt with one document
  per line, or a folder where every file is one document).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger("mbert_retrieval")

QUERY_KEYS = ("query", "anchor")
POSITIVE_KEYS = ("positive", "document")


class TrainingDataError(ValueError):
    """Training data that is missing, unreadable, or has no usable record."""


@dataclass
class Example:
    """One query with its documents: `documents[0]` is the positive, the rest are hard negatives.
    `scores` are teacher scores, one per document, for distillation."""

    query: str
    documents: list[str]
    scores: list[float] | None = None

    @property
    def negatives(self) -> list[str]:
        return self.documents[1:]


class ExampleSource(Sequence):
    """A random-access collection of examples with a count of the records that were left out."""

    problems: Counter
    name: str

    def report(self) -> str:
        """One line naming how many records were used and, by reason, how many were not."""
        if not self.problems:
            return f"{self.name}: {len(self)} examples, no bad records"
        bad = ", ".join(f"{count} {reason}" for reason, count in sorted(self.problems.items()))
        return f"{self.name}: {len(self)} examples; left out: {bad}"

    def log_report(self) -> None:
        (logger.warning if self.problems else logger.info)(self.report())


def parse_example(row, num_negatives: int | None = None) -> Example | str:
    """A JSON record as an Example, or the reason it is unusable."""
    if not isinstance(row, dict):
        return "records that are not JSON objects"
    query = next((row[k] for k in QUERY_KEYS if k in row), None)
    if not isinstance(query, str):
        return "records without a 'query' string"
    if not query.strip():
        return "records with an empty query"
    if "documents" in row:
        documents, scores = row["documents"], row.get("scores")
        if not _is_text_list(documents) or not documents:
            return "records whose 'documents' is not a non-empty list of strings"
        if scores is not None and (
            not isinstance(scores, list)
            or len(scores) != len(documents)
            or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
        ):
            return "records whose 'scores' do not give one number per document"
        if not all(d.strip() for d in documents):
            return "records with an empty document"
        if num_negatives is not None:
            documents = documents[: num_negatives + 1]
            scores = scores[: num_negatives + 1] if scores is not None else None
        return Example(query, list(documents), None if scores is None else [float(s) for s in scores])
    positive = next((row[k] for k in POSITIVE_KEYS if k in row), None)
    if not isinstance(positive, str):
        return "records without a 'positive' string"
    if not positive.strip():
        return "records with an empty positive"
    negatives = row.get("negatives", row.get("negative", []))
    if isinstance(negatives, str):
        negatives = [negatives]
    if not _is_text_list(negatives):
        return "records whose 'negatives' is not a list of strings"
    if not all(n.strip() for n in negatives):
        return "records with an empty negative"
    if num_negatives is not None:
        negatives = negatives[:num_negatives]
    return Example(query, [positive, *negatives])


def _is_text_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class JsonlReader:
    """Reads lines of one file by byte offset, keeping the file open between reads."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None

    def line(self, offset: int) -> bytes:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for the reader's life
        self._handle.seek(offset)
        return self._handle.readline()

    def __getstate__(self):  # file handles do not travel to other processes
        return {"path": self.path, "_handle": None}


def scan_lines(path: Path, desc: str) -> Iterable[tuple[int, bytes]]:
    """(byte offset, line) of every non-blank line, with a progress bar over the file's bytes."""
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such file")
    size = path.stat().st_size
    with (
        open(path, "rb") as handle,
        tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=size < 1 << 26) as progress,
    ):
        offset = 0
        for line in handle:
            if line.strip():
                yield offset, line
            offset += len(line)
            progress.update(len(line))


def decode_json(line: bytes):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


class JsonlExamples(ExampleSource):
    """Examples from a JSONL file (see the module docstring for the record shapes).

    `num_negatives` keeps at most that many hard negatives per example.
    """

    def __init__(self, path: str | Path, num_negatives: int | None = None):
        self.path = Path(path)
        self.name = str(self.path)
        self.num_negatives = num_negatives
        self.problems: Counter = Counter()
        offsets = []
        for offset, line in scan_lines(self.path, f"reading {self.path.name}"):
            row = decode_json(line)
            parsed = parse_example(row, num_negatives) if row is not None else "lines that are not valid JSON"
            if isinstance(parsed, str):
                self.problems[parsed] += 1
            else:
                offsets.append(offset)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._reader = JsonlReader(self.path)
        if not len(self.offsets):
            raise TrainingDataError(f"{self.path}: no usable training record ({self.report()})")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Example:
        return parse_example(json.loads(self._reader.line(int(self.offsets[index]))), self.num_negatives)


class BeirExamples(ExampleSource):
    """Every (query, document) pair judged relevant (score > 0) in `qrels/<split>.tsv` of a BEIR
    folder. Queries are held in memory; for the corpus only each document's byte offset is."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        self.name = f"{self.folder} [{split}]"
        self.problems: Counter = Counter()
        if not (self.folder / "corpus.jsonl").is_file():
            raise TrainingDataError(f"{self.folder}: not a BEIR folder (corpus.jsonl is missing)")
        self.corpus_offsets = self._scan_corpus()
        self.queries = self._read_queries()
        self.pairs = self._read_qrels(self.folder / "qrels" / f"{split}.tsv")
        self._reader = JsonlReader(self.folder / "corpus.jsonl")
        if not self.pairs:
            raise TrainingDataError(f"{self.name}: no usable judged pair ({self.report()})")

    def _scan_corpus(self) -> dict[str, int]:
        offsets: dict[str, int] = {}
        for offset, doc_id, row in self._rows_with_ids("corpus.jsonl", "indexing corpus", "corpus"):
            if not document_text(row).strip():
                self.problems["documents with empty text"] += 1
            elif doc_id in offsets:
                self.problems["duplicate document ids"] += 1
            else:
                offsets[doc_id] = offset
        return offsets

    def _read_queries(self) -> dict[str, str]:
        queries: dict[str, str] = {}
        for _, query_id, row in self._rows_with_ids("queries.jsonl", "reading queries", "query"):
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                self.problems["queries with empty text"] += 1
            else:
                queries.setdefault(query_id, row["text"])
        return queries

    def _rows_with_ids(self, name: str, desc: str, kind: str) -> Iterator[tuple[int, str, dict]]:
        """(byte offset, id, row) of each line of a BEIR .jsonl file; lines without an id are counted."""
        for offset, line in scan_lines(self.folder / name, desc):
            row = decode_json(line)
            if isinstance(row, dict) and isinstance(row.get("_id"), str | int):
                yield offset, str(row["_id"]), row
            else:
                self.problems[f"{kind} lines without an '_id'"] += 1

    def _read_qrels(self, path: Path) -> list[tuple[str, str]]:
        if not path.is_file():
            available = sorted(p.stem for p in (self.folder / "qrels").glob("*.tsv"))
            raise TrainingDataError(f"{path} is missing (splits available: {', '.join(available) or 'none'})")
        pairs = []
        with path.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 3 or not row[2].strip().lstrip("-").isdigit():
                    if number > 1:  # the first line is the header
                        self.problems["qrels lines that are not 'query-id, corpus-id, score'"] += 1
                    continue
                query_id, doc_id, score = (cell.strip() for cell in row)
                if int(score) <= 0:
                    continue
                if query_id not in self.queries:
                    self.problems["qrels naming an unknown or empty query"] += 1
                elif doc_id not in self.corpus_offsets:
                    self.problems["qrels naming an unknown or empty document"] += 1
                else:
                    pairs.append((query_id, doc_id))
        return pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        query_id, doc_id = self.pairs[index]
        return Example(self.queries[query_id], [self.document(doc_id)])

    def document(self, doc_id: str) -> str:
        return document_text(json.loads(self._reader.line(self.corpus_offsets[doc_id])))


def document_text(row: dict) -> str:
    """Title and text joined by a space, as the evaluation reads BEIR documents."""
    title, text = row.get("title") or "", row.get("text") or ""
    if not isinstance(title, str) or not isinstance(text, str):
        return ""
    return f"{title} {text}".strip() if title else text


class HFExamples(ExampleSource):
    """A Hugging Face dataset (a `datasets.Dataset`, or a hub name loaded with `load_dataset`) whose
    columns hold the query, the positive and optionally hard negatives (one column per negative, or
    one column holding a list)."""

    def __init__(
        self,
        dataset,
        split: str = "train",
        query_column: str = "query",
        positive_column: str = "positive",
        negative_columns: Sequence[str] = (),
        num_negatives: int | None = None,
    ):
        if isinstance(dataset, str):
            try:
                from datasets import load_dataset
            except ImportError as err:
                raise TrainingDataError("Hugging Face datasets need `pip install datasets`") from err
            self.name = f"{dataset} [{split}]"
            dataset = load_dataset(dataset, split=split)
        else:
            self.name = getattr(getattr(dataset, "info", None), "dataset_name", None) or "dataset"
        missing = [
            c for c in (query_column, positive_column, *negative_columns) if c not in dataset.column_names
        ]
        if missing:
            raise TrainingDataError(
                f"{self.name}: no column(s) {', '.join(missing)}; columns are {', '.join(dataset.column_names)}"
            )
        self.dataset = dataset
        self.columns = (query_column, positive_column, tuple(negative_columns))
        self.num_negatives = num_negatives
        self.problems: Counter = Counter()
        good = []
        for index in tqdm(range(len(dataset)), desc="checking dataset", disable=len(dataset) < 100_000):
            parsed = self._parse(dataset[index])
            if isinstance(parsed, str):
                self.problems[parsed] += 1
            else:
                good.append(index)
        self.indices = np.asarray(good, dtype=np.int64)
        if not len(self.indices):
            raise TrainingDataError(f"{self.name}: no usable training record ({self.report()})")

    def _parse(self, row: dict) -> Example | str:
        query_column, positive_column, negative_columns = self.columns
        negatives = []
        for column in negative_columns:
            value = row[column]
            negatives.extend(value if isinstance(value, list) else [value])
        record = {"query": row[query_column], "positive": row[positive_column], "negatives": negatives}
        return parse_example(record, self.num_negatives)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Example:
        return self._parse(self.dataset[int(self.indices[index])])


def load_examples(
    spec: str | Path, split: str = "train", num_negatives: int | None = None, **hf_columns
) -> ExampleSource:
    """A BEIR folder, a JSONL file, or `hf:<dataset name>` for a Hugging Face dataset."""
    spec_text = str(spec)
    if spec_text.startswith("hf:"):
        return HFExamples(spec_text[3:], split=split, num_negatives=num_negatives, **hf_columns)
    path = Path(spec)
    if path.is_dir():
        return BeirExamples(path, split)
    if path.is_file():
        return JsonlExamples(path, num_negatives)
    raise TrainingDataError(
        f"{spec}: not found; give a BEIR folder, a .jsonl file of examples, or hf:<dataset name>"
    )


# -- plain text for MLM ------------------------------------------------------------------------------


class TextCorpus:
    """Documents for MLM pretraining, read on demand: a .jsonl file ("text" per line), a .txt file
    (one document per line), or a folder where every file matching `pattern` is one document."""

    def __init__(self, path: str | Path, pattern: str = "**/*"):
        self.path = Path(path)
        self.name = str(self.path)
        self.problems: Counter = Counter()
        self.files: list[Path] = []
        self.entries: list[tuple[int, int]] = []  # (file index, byte offset or -1 for a whole file)
        if self.path.is_dir():
            self._index_folder(pattern)
        elif self.path.suffix == ".jsonl":
            self._index_lines(json_lines=True)
        elif self.path.is_file():
            self._index_lines(json_lines=False)
        else:
            raise TrainingDataError(f"{self.path}: no such file or folder")
        self.readers = [JsonlReader(f) for f in self.files]
        if not self.entries:
            raise TrainingDataError(f"{self.path}: no usable document ({self.report()})")

    def _index_folder(self, pattern: str) -> None:
        for file in sorted(p for p in self.path.glob(pattern) if p.is_file()):
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                self.problems["files that are not UTF-8 text"] += 1
                continue
            if not text.strip():
                self.problems["empty files"] += 1
                continue
            self.files.append(file)
            self.entries.append((len(self.files) - 1, -1))

    def _index_lines(self, json_lines: bool) -> None:
        self.files.append(self.path)
        for offset, line in scan_lines(self.path, f"indexing {self.path.name}"):
            text = self._line_text(line, json_lines)
            if text is None:
                self.problems["lines without a 'text' string"] += 1
            elif not text.strip():
                self.problems["documents with empty text"] += 1
            else:
                self.entries.append((0, offset))

    def _line_text(self, line: bytes, json_lines: bool) -> str | None:
        if not json_lines:
            try:
                return line.decode("utf-8")
            except UnicodeDecodeError:
                return None
        row = decode_json(line)
        return row.get("text") if isinstance(row, dict) and isinstance(row.get("text"), str) else None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> str:
        file_index, offset = self.entries[index]
        if offset < 0:
            return self.files[file_index].read_text(encoding="utf-8")
        return self._line_text(self.readers[file_index].line(offset), self.path.suffix == ".jsonl").strip()

    def report(self) -> str:
        bad = ", ".join(f"{count} {reason}" for reason, count in sorted(self.problems.items()))
        return f"{self.name}: {len(self)} documents" + (f"; left out: {bad}" if bad else ", no bad records")

    def log_report(self) -> None:
        (logger.warning if self.problems else logger.info)(self.report())
