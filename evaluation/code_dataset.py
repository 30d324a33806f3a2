"""Build a CodeSearchNet-style retrieval set from a tree of Python, Java, JavaScript, TypeScript or Go
source, offline.

Every documented function gives one query and one relevant document:

    query     the first paragraph of the docstring or doc comment, as plain text, whitespace collapsed
    document  the function's source without its docstring / doc comment (decorators kept, dedented)

Python: module-level functions and methods (not functions nested in functions), read with `ast`. The
other languages (Javadoc, JSDoc / TSDoc, Go doc comments) are read with tree-sitter: see
evaluation/doc_comments.py. The language comes from the file suffix; every corpus and query record
carries it in its "metadata".

Left out: test folders and files, vendored folders, minified or generated files (not for Python),
TypeScript declaration files (unless asked for), and symbolic links leading out of the tree (linked
folders are never entered). A file that cannot be read or parsed (too deeply nested, say) is skipped and
counted.

Files are grouped into units (one per module, or one per top-level package) and whole units are
assigned to train / dev / test, so no source file ever gives pairs to two splits. The corpus holds
every function of every split; each split's qrels point only at its own functions.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import random
import re
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from mbert_retrieval.evaluation.data import DataFormatError, save_beir
from mbert_retrieval.evaluation.doc_comments import Documented, documented_definitions
from tqdm.auto import tqdm

from mbert_retrieval.files import atomic_write_text

logger = logging.getLogger(__name__)

SplitBy = Literal["module", "package"]
SPLITS = ("train", "dev", "test")
DEFAULT_EXCLUDED_DIRS = (
    *("test", "tests", "__tests__", "__mocks__", "testdata"),
    *("__pycache__", ".git", "site-packages", "node_modules", "bower_components", "vendor", "third_party"),
)
LANGUAGES = ("python", "java", "javascript", "typescript", "go")
LANGUAGE_NAMES = {
    "python": "Python",
    "java": "Java",
    "javascript": "JavaScript",
    "typescript": "TypeScript",
    "go": "Go",
}
SUFFIXES = {
    ".py": "python",
    ".java": "java",
    **dict.fromkeys((".js", ".mjs", ".cjs", ".jsx"), "javascript"),
    **dict.fromkeys((".ts", ".tsx", ".mts", ".cts"), "typescript"),
    ".go": "go",
}
DECLARATION_SUFFIXES = (".d.ts", ".d.mts", ".d.cts")
TEST_FILE = re.compile(r"(_test\.go|\.(test|spec)\.[cm]?[jt]sx?)$")
MINIFIED_FILE = re.compile(r"([.-]min|\.bundle)\.[cm]?js$")
BUNDLE_DIRS = frozenset({"dist", "build", "bundle", "bundles", "umd"})
GENERATED_MARKER = re.compile(r"^// Code generated .* DO NOT EDIT\.$|@generated\b", re.MULTILINE)
MAX_LINE_CHARS = 500  # a longer line means minified or generated code
MAX_MEAN_LINE_CHARS = 200


@dataclass
class CodeFunction:
    """One documented function found in the tree."""

    doc_id: str
    path: str  # relative to the source root, with forward slashes
    name: str  # qualified: Class.method
    query: str
    code: str
    language: str = "python"


@dataclass
class CodeDatasetSummary:
    folder: str
    functions: dict[str, int]  # split -> pairs
    units: dict[str, list[str]]  # split -> modules or packages
    files_read: int
    files_skipped: int  # files that could not be read or parsed
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> functions skipped
    file_problems: dict[str, int] = field(default_factory=dict)  # reason -> files skipped
    files_left_out: dict[str, int] = field(default_factory=dict)  # reason -> files not read on purpose
    languages: dict[str, int] = field(default_factory=dict)  # language -> pairs, all splits


def build_code_dataset(
    source_root: str | Path,
    out_dir: str | Path,
    *,
    split_by: SplitBy = "module",
    test_fraction: float = 0.2,
    dev_fraction: float = 0.1,
    min_query_words: int = 3,
    exclude_dirs: Sequence[str] = DEFAULT_EXCLUDED_DIRS,
    include_dirs: Sequence[str] | None = None,
    languages: Sequence[str] = LANGUAGES,
    typescript_declarations: bool = False,
    max_functions: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> CodeDatasetSummary:
    """Turn the source files under `source_root` into a BEIR folder at `out_dir`.

    Writes corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv and build.json (what went where).
    `exclude_dirs`: a name leaves out every folder of that name; a path with a slash ("net/http",
    "strings/") leaves out that one folder under the root. `include_dirs`: read only these folders
    (paths under the root). `typescript_declarations`: also read .d.ts files (doc comment -> signature).
    `test_fraction=1` (with `dev_fraction=0`) puts every pair in test: an evaluation-only set.
    `max_functions` keeps at most that many pairs, taking whole units in the split order.
    """
    source_root = Path(source_root)
    if not source_root.is_dir():
        raise DataFormatError(f"{source_root}: no such folder")
    evaluation_only = test_fraction == 1 and dev_fraction == 0
    fractions_ok = 0 < test_fraction < 1 and 0 <= dev_fraction < 1 and test_fraction + dev_fraction < 1
    if not (fractions_ok or evaluation_only):
        raise ValueError("test_fraction and dev_fraction must be in [0, 1) and leave room for train")
    if split_by not in ("module", "package"):
        raise ValueError(f"split_by must be 'module' or 'package', got {split_by!r}")
    if not languages or set(languages) - set(LANGUAGES):
        raise ValueError(f"languages must be among {', '.join(LANGUAGES)}, got {', '.join(languages)}")

    left_out: Counter = Counter()
    files = source_files(
        source_root, languages, exclude_dirs, include_dirs, typescript_declarations, left_out
    )
    skipped: Counter = Counter()
    problems: Counter = Counter()
    by_unit: dict[str, list[CodeFunction]] = {}
    files_read = 0
    for path, language in tqdm(files, desc="reading sources", unit="file", disable=not show_progress):
        relative = path.relative_to(source_root).as_posix()
        functions = extract_functions(path, relative, language, min_query_words, skipped, problems, left_out)
        if functions is None:
            continue
        files_read += 1
        if functions:
            by_unit.setdefault(unit_of(relative, split_by), []).extend(functions)

    if not by_unit:
        raise DataFormatError(f"{source_root}: {nothing_found(languages)}")
    if evaluation_only:
        units = {"train": [], "dev": [], "test": sorted(by_unit)}
    else:
        units = assign_units(by_unit, test_fraction, dev_fraction, seed)
    pairs = {split: [f for unit in units[split] for f in by_unit[unit]] for split in SPLITS}
    if max_functions is not None:
        pairs, units = cap_pairs(pairs, units, by_unit, max_functions, test_fraction, dev_fraction)
    pairs = drop_repeated(pairs, skipped)

    out_dir = Path(out_dir)
    kept = [f for split in SPLITS for f in pairs[split]]
    corpus = {f.doc_id: {"title": "", "text": f.code, "metadata": {"language": f.language}} for f in kept}
    queries = {query_id(f): f.query for f in kept}
    query_metadata = {query_id(f): {"language": f.language} for f in kept}
    qrels = {split: {query_id(f): {f.doc_id: 1} for f in pairs[split]} for split in SPLITS if pairs[split]}
    save_beir(out_dir, corpus, queries, qrels, query_metadata=query_metadata)
    for split in set(SPLITS) - set(qrels):  # an empty split has no qrels file, not a stale one
        (out_dir / "qrels" / f"{split}.tsv").unlink(missing_ok=True)

    summary = CodeDatasetSummary(
        folder=str(out_dir),
        functions={split: len(pairs[split]) for split in SPLITS},
        units={split: units[split] for split in SPLITS},
        files_read=files_read,
        files_skipped=sum(problems.values()),
        skipped=dict(skipped),
        file_problems=dict(problems),
        files_left_out=dict(left_out),
        languages=dict(Counter(f.language for f in kept)),
    )
    record = {
        "source_root": str(source_root.resolve()),
        "split_by": split_by,
        "seed": seed,
        "include_dirs": list(include_dirs) if include_dirs is not None else None,
        "exclude_dirs": list(exclude_dirs),
        **asdict(summary),
    }
    atomic_write_text(out_dir / "build.json", json.dumps(record, indent=2) + "\n")
    return summary


def query_id(function: CodeFunction) -> str:
    return f"q:{function.doc_id}"


def nothing_found(languages: Sequence[str]) -> str:
    first, *others = [LANGUAGE_NAMES[language] for language in languages]
    if not others:
        return f"no documented {first} functions found"
    listed = others[0] if len(others) == 1 else f"{', '.join(others[:-1])} or {others[-1]}"
    return f"no documented {first} functions found, nor {listed} ones"


# -------------------------------------------------------------------------------------- finding code


def source_files(
    root: Path,
    languages: Sequence[str],
    exclude_dirs: Sequence[str],
    include_dirs: Sequence[str] | None,
    typescript_declarations: bool,
    left_out: Counter,
) -> list[tuple[Path, str]]:
    """(path, language) of every source file to read, sorted. Linked folders are not entered; a linked
    file counts only when it points inside the tree."""
    excluded_names = {d for d in exclude_dirs if "/" not in d}
    excluded_paths = {d.strip("/") for d in exclude_dirs if "/" in d}
    included = None if include_dirs is None else {d.strip("/") for d in include_dirs}
    real_root = root.resolve()
    found = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder).relative_to(root).as_posix()
        prefix = "" if here == "." else f"{here}/"
        dirs[:] = [
            d
            for d in dirs
            if d not in excluded_names
            and prefix + d not in excluded_paths
            and (included is None or any(related(prefix + d, path) for path in included))
        ]
        if included is not None and not any(within(here, path) for path in included):
            continue
        for name in names:
            path = Path(folder, name)
            language = language_of(name, languages, typescript_declarations, left_out)
            if language is None:
                continue
            if TEST_FILE.search(name):
                left_out["test file"] += 1
            elif path.is_symlink() and not path.resolve().is_relative_to(real_root):
                left_out["symbolic link out of the tree"] += 1
            elif not is_utf8(prefix + name):
                left_out["file name not valid UTF-8"] += 1
            elif path.is_file():
                found.append((path, language))
    return sorted(found)


def within(relative: str, folder: str) -> bool:
    return relative == folder or relative.startswith(f"{folder}/")


def related(relative: str, folder: str) -> bool:
    """`relative` is inside `folder` or on the way to it."""
    return within(relative, folder) or within(folder, relative)


def language_of(name: str, languages: Sequence[str], declarations: bool, left_out: Counter) -> str | None:
    language = SUFFIXES.get(os.path.splitext(name)[1])
    if language not in languages:
        return None
    if name.endswith(DECLARATION_SUFFIXES) and not declarations:
        left_out["TypeScript declaration file"] += 1
        return None
    return language


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the file name, kept as surrogates
        return False
    return True


def minified_or_generated(relative: str, text: str) -> bool:
    """A minified file, a bundle with a source map, or a file that says it was generated."""
    if MINIFIED_FILE.search(relative) or GENERATED_MARKER.search(text[:4096]):
        return True
    if BUNDLE_DIRS.intersection(relative.split("/")[:-1]) and "sourceMappingURL=" in text[-2048:]:
        return True
    lines = text.splitlines()
    return bool(lines) and (
        len(text) / len(lines) > MAX_MEAN_LINE_CHARS or max(map(len, lines)) > MAX_LINE_CHARS
    )


def unit_of(relative_path: str, split_by: SplitBy) -> str:
    """The module (the file) or the package (the first folder; a top-level file is its own unit)."""
    parts = relative_path.split("/")
    return relative_path if split_by == "module" or len(parts) == 1 else parts[0]


def extract_functions(
    path: Path,
    relative: str,
    language: str,
    min_query_words: int,
    skipped: Counter,
    problems: Counter,
    left_out: Counter,
) -> list[CodeFunction] | None:
    """The documented functions of one file; None when the file is skipped (counted in `problems`) or
    left out as minified or generated (counted in `left_out`)."""
    found = read_definitions(path, relative, language, problems, left_out)
    if found is None:
        return None
    functions, seen_ids = [], Counter()
    for definition in found:
        if len(definition.query.split()) < min_query_words:
            skipped["query shorter than min_query_words"] += 1
            continue
        if definition.code is None:
            skipped[definition.problem] += 1
            continue
        doc_id = f"{relative}:{definition.name}"
        seen_ids[doc_id] += 1
        if seen_ids[doc_id] > 1:  # the same name defined twice (e.g. under if/else, or overloads)
            doc_id = f"{doc_id}@{definition.line}"
        functions.append(
            CodeFunction(doc_id, relative, definition.name, definition.query, definition.code, language)
        )
    return functions


def read_definitions(
    path: Path, relative: str, language: str, problems: Counter, left_out: Counter
) -> list[Documented] | None:
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems["not UTF-8 text"] += 1
        return None
    except OSError:
        problems["unreadable"] += 1
        return None
    if language != "python" and minified_or_generated(relative, source):
        left_out["minified or generated"] += 1
        return None
    try:
        if language == "python":
            return python_definitions(source)
        return other_definitions(source, relative, language)
    except (RecursionError, MemoryError):
        problems["nested too deeply to parse"] += 1
        logger.warning("%s: nested too deeply to parse; skipped", path)
    except (SyntaxError, ValueError):
        problems["does not parse"] += 1
    except GrammarMissing as err:
        left_out[str(err)] += 1
    return None


def python_definitions(source: str) -> list[Documented]:
    """The documented Python functions (module level and methods)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []
    for node, qualname in walk_definitions(tree):
        docstring = ast.get_docstring(node, clean=True)
        if docstring:
            code = source_without_docstring(node, lines)
            problem = "no code besides the docstring" if code is None else None
            found.append(Documented(qualname, node.lineno, first_paragraph(docstring), code, problem))
    return found


class GrammarMissing(Exception):
    """No tree-sitter grammar for a language; the message says why, for the count of files left out."""


def other_definitions(source: str, relative: str, language: str) -> list[Documented]:
    """The documented functions of a Java, JavaScript, TypeScript or Go file, read with tree-sitter."""
    try:
        return documented_definitions(
            source,
            language,
            tsx=relative.endswith(".tsx"),
            declarations=relative.endswith(DECLARATION_SUFFIXES),
        )
    except ImportError as err:  # tree-sitter-language-pack comes with the `server` extra
        raise GrammarMissing("no tree-sitter grammars (pip install tree-sitter-language-pack)") from err


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
