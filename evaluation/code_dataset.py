"""Build a CodeSearchNet-style retrieval set from any tree of Python source, offline.

Every documented function (module-level functions and methods, not functions nested in functions)
gives one query and one relevant document:

    query     the first paragraph of the docstring, whitespace collapsed
    document  the function's source with the docstring removed (decorators kept, dedented)

Files are grouped into units (one per module, or one per top-level package) and whole units are
assigned to train / dev / test, so no source file ever gives pairs to two splits. The corpus holds
every function of every split; each split's qrels point only at its own functions.
"""

from __future__ import annotations

import ast
import json
import logging
import random
import re
import textwrap
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from evaluation.data import DataFormatError, save_beir
from mbert_retrieval.modeling.io import atomic_write_text

logger = logging.getLogger(__name__)

SplitBy = Literal["module", "package"]
SPLITS = ("train", "dev", "test")
DEFAULT_EXCLUDED_DIRS = ("test", "tests", "__pycache__", ".git", "site-packages")


@dataclass
class CodeFunction:
    """One documented function found in the tree."""

    doc_id: str
    path: str  # relative to the source root, with forward slashes
    name: str  # qualified: Class.method
    query: str
    code: str


@dataclass
class CodeDatasetSummary:
    folder: str
    functions: dict[str, int]  # split -> pairs
    units: dict[str, list[str]]  # split -> modules or packages
    files_read: int
    files_skipped: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> functions skipped


def build_code_dataset(
    source_root: str | Path,
    out_dir: str | Path,
    *,
    split_by: SplitBy = "module",
    test_fraction: float = 0.2,
    dev_fraction: float = 0.1,
    min_query_words: int = 3,
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDED_DIRS,
    max_functions: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> CodeDatasetSummary:
    """Turn the Python files under `source_root` into a BEIR folder at `out_dir`.

    Writes corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv and build.json (what went where).
    `max_functions` keeps at most that many pairs, taking whole units in the split order.
    """
    source_root = Path(source_root)
    if not source_root.is_dir():
        raise DataFormatError(f"{source_root}: no such folder")
    if not 0 < test_fraction < 1 or not 0 <= dev_fraction < 1 or test_fraction + dev_fraction >= 1:
        raise ValueError("test_fraction and dev_fraction must be in [0, 1) and leave room for train")
    if split_by not in ("module", "package"):
        raise ValueError(f"split_by must be 'module' or 'package', got {split_by!r}")

    files = python_files(source_root, exclude_dirs)
    skipped: Counter = Counter()
    by_unit: dict[str, list[CodeFunction]] = {}
    files_skipped = 0
    for path in tqdm(files, desc="reading sources", unit="file", disable=not show_progress):
        relative = path.relative_to(source_root).as_posix()
        functions = extract_functions(path, relative, min_query_words, skipped)
        if functions is None:
            files_skipped += 1
            continue
        if functions:
            by_unit.setdefault(unit_of(relative, split_by), []).extend(functions)

    by_unit = {unit: funcs for unit, funcs in by_unit.items() if funcs}
    if not by_unit:
        raise DataFormatError(f"{source_root}: no documented Python functions found")
    units = assign_units(by_unit, test_fraction, dev_fraction, seed)
    pairs = {split: [f for unit in units[split] for f in by_unit[unit]] for split in SPLITS}
    if max_functions is not None:
        pairs, units = cap_pairs(pairs, units, by_unit, max_functions, test_fraction, dev_fraction)
    pairs = drop_repeated(pairs, skipped)

    out_dir = Path(out_dir)
    corpus = {f.doc_id: {"title": "", "text": f.code} for split in SPLITS for f in pairs[split]}
    queries = {query_id(f): f.query for split in SPLITS for f in pairs[split]}
    qrels = {split: {query_id(f): {f.doc_id: 1} for f in pairs[split]} for split in SPLITS}
    save_beir(out_dir, corpus, queries, qrels)

    summary = CodeDatasetSummary(
        folder=str(out_dir),
        functions={split: len(pairs[split]) for split in SPLITS},
        units={split: units[split] for split in SPLITS},
        files_read=len(files) - files_skipped,
        files_skipped=files_skipped,
        skipped=dict(skipped),
    )
    record = {
        "source_root": str(source_root.resolve()),
        "split_by": split_by,
        "seed": seed,
        **asdict(summary),
    }
    atomic_write_text(out_dir / "build.json", json.dumps(record, indent=2) + "\n")
    return summary


def query_id(function: CodeFunction) -> str:
    return f"q:{function.doc_id}"


# -------------------------------------------------------------------------------------- finding code


def python_files(root: Path, exclude_dirs: tuple[str, ...]) -> list[Path]:
    excluded = set(exclude_dirs)
    return sorted(
        path
        for path in root.rglob("*.py")
        if not excluded.intersection(path.relative_to(root).parts[:-1]) and path.is_file()
    )


def unit_of(relative_path: str, split_by: SplitBy) -> str:
    """The module (the file) or the package (the first folder; a top-level file is its own unit)."""
    parts = relative_path.split("/")
    return relative_path if split_by == "module" or len(parts) == 1 else parts[0]


def extract_functions(
    path: Path, relative: str, min_query_words: int, skipped: Counter
) -> list[CodeFunction] | None:
    """The documented functions of one file, or None when the file cannot be read or parsed."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    lines = source.splitlines()
    functions, seen_ids = [], Counter()
    for node, qualname in walk_definitions(tree):
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        query = first_paragraph(docstring)
        if len(query.split()) < min_query_words:
            skipped["query shorter than min_query_words"] += 1
            continue
        code = source_without_docstring(node, lines)
        if code is None:
            skipped["no code besides the docstring"] += 1
            continue
        doc_id = f"{relative}:{qualname}"
        seen_ids[doc_id] += 1
        if seen_ids[doc_id] > 1:  # the same name defined twice (e.g. under if/else)
            doc_id = f"{doc_id}@{node.lineno}"
        functions.append(CodeFunction(doc_id, relative, qualname, query, code))
    return functions


def walk_definitions(tree: ast.Module):
    """(function node, qualified name) for module-level functions and methods of (nested) classes."""
    stack = [(tree.body, "")]
    while stack:
        body, prefix = stack.pop(0)
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield node, prefix + node.name
            elif isinstance(node, ast.ClassDef):
                stack.append((node.body, f"{prefix}{node.name}."))


def first_paragraph(docstring: str) -> str:
    paragraph = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def source_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The function's lines minus the docstring's lines; None if nothing but the docstring remains or the
    docstring shares a line with other code."""
    docstring = node.body[0]
    rest = node.body[1:]
    if not rest or all(is_placeholder(statement) for statement in rest):
        return None
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    doc_start, doc_end = docstring.lineno, docstring.end_lineno
    before = lines[doc_start - 1][: docstring.col_offset]
    after = lines[doc_end - 1][docstring.end_col_offset :]
    if before.strip() or after.strip():
        return None
    kept = lines[first - 1 : doc_start - 1] + lines[doc_end : node.end_lineno]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def is_placeholder(statement: ast.stmt) -> bool:
    """`pass`, `...` or `raise NotImplementedError`: a body that says nothing."""
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return statement.value.value is Ellipsis
    if isinstance(statement, ast.Raise) and statement.exc is not None:
        exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


# -------------------------------------------------------------------------------------------- splits


def assign_units(
    by_unit: dict[str, list[CodeFunction]], test_fraction: float, dev_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Shuffle the units (seeded); give each split one, then each next unit to the split furthest below
    its share of the functions."""
    needed = 2 + (dev_fraction > 0)
    if len(by_unit) < needed:
        raise DataFormatError(
            f"found documented functions in only {len(by_unit)} unit(s); splitting into "
            f"{', '.join(SPLITS[-needed:])} needs at least {needed} (try split_by='module' or a larger tree)"
        )
    order = sorted(by_unit)
    random.Random(seed).shuffle(order)
    total = sum(len(funcs) for funcs in by_unit.values())
    targets = {"test": test_fraction, "dev": dev_fraction, "train": 1 - test_fraction - dev_fraction}
    targets = {split: share * total for split, share in targets.items()}
    units: dict[str, list[str]] = {split: [] for split in SPLITS}
    counts = Counter()
    used = [split for split in SPLITS if targets[split] > 0]
    for split in used:
        units[split].append(order.pop(0))  # every split starts with one unit, so none is empty
        counts[split] = len(by_unit[units[split][0]])
    for unit in order:
        split = max(used, key=lambda s: targets[s] - counts[s])
        units[split].append(unit)
        counts[split] += len(by_unit[unit])
    return units


def cap_pairs(pairs, units, by_unit, max_functions, test_fraction, dev_fraction):
    """Keep about max_functions pairs, in the same split proportions, dropping whole units."""
    shares = {"test": test_fraction, "dev": dev_fraction, "train": 1 - test_fraction - dev_fraction}
    capped_pairs, capped_units = {}, {}
    for split in SPLITS:
        budget = max(1, round(shares[split] * max_functions)) if units[split] else 0
        kept_units, kept = [], []
        for unit in units[split]:
            if kept and len(kept) + len(by_unit[unit]) > budget:
                continue
            kept_units.append(unit)
            kept.extend(by_unit[unit])
        capped_pairs[split], capped_units[split] = kept, kept_units
    return capped_pairs, capped_units


def drop_repeated(pairs: dict[str, list[CodeFunction]], skipped: Counter) -> dict[str, list[CodeFunction]]:
    """A query text or a document seen before is dropped (test first, then dev, then train): each query
    has one right answer, and no test query or document reappears in training."""
    seen_queries, seen_code, kept = set(), set(), {}
    for split in ("test", "dev", "train"):
        kept[split] = []
        for function in pairs[split]:
            if function.query in seen_queries or function.code in seen_code:
                skipped["repeated query or code"] += 1
                continue
            seen_queries.add(function.query)
            seen_code.add(function.code)
            kept[split].append(function)
    return kept
