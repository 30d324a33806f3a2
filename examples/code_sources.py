"""Real source code in five languages, and doc comment -> function pair sets built from it.

    PYTHONPATH=. python3 examples/code_sources.py fetch            # -> runs/sources/<language>/<package>/...
    PYTHONPATH=. python3 examples/code_sources.py build            # -> runs/datasets/{train,heldout}/<language>

fetch copies what this machine has and installs a few named packages with their registry's own client
(only source files are kept):

    python      this interpreter's standard library (stdlib/), its site-packages (purelib/), and
                PYTHON_PACKAGES installed with `pip install --target` (extra/)
    java        JAVA_MODULES from the JDK's source archive (lib/src.zip beside the JDK)
    go          the Go standard library (Debian's golang-src, installed with apt-get when missing)
    javascript  npm's own code and the modules it bundles, plus JAVASCRIPT_PACKAGES from npm
    typescript  the .ts sources of TYPESCRIPT_PACKAGES from npm, and typescript's lib/*.d.ts
                (declarations: read only with `build --typescript-declarations`)

build makes two BEIR folders per language with `build_code_dataset` (one process per folder):

    train/<language>     every package but the held-out ones: a little dev and test, the rest train,
                         at most --max-train-pairs pairs, and no query or function text of a held-out pair
    heldout/<language>   only the HELD_OUT packages, every pair in the test split: for evaluation, never
                         for training

Both write manifest.json beside their output: what was fetched (versions, paths) / what was built (pairs
per split, seconds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

LANGUAGES = ("python", "java", "javascript", "typescript", "go")

PYTHON_PACKAGES = {"requests": "2.34.2", "click": "8.5.1", "attrs": "26.1.0"}
# What they install, left out of the purelib/ copy so that they are only ever held out.
PYTHON_PACKAGE_FOLDERS = ("requests", "click", "attr", "attrs")
JAVA_MODULES = (
    *("java.base", "java.sql", "java.net.http", "java.desktop", "java.xml", "java.logging"),
    *("java.management", "java.naming", "java.prefs", "java.rmi", "java.scripting", "java.compiler"),
    "jdk.httpserver",
)
JAVASCRIPT_PACKAGES = {
    **{"lodash": "4.18.1", "ramda": "0.32.0", "async": "3.2.6", "date-fns": "4.4.0", "express": "5.3.0"},
    **{"commander": "14.0.3", "moment": "2.31.0", "three": "0.187.0", "mathjs": "15.2.0"},
    **{"eslint": "10.15.0", "mongoose": "9.12.1", "axios": "1.21.1", "ws": "8.23.0", "koa": "3.3.0"},
    **{"luxon": "3.7.2", "handlebars": "4.7.10", "marked": "18.2.1", "jszip": "3.10.2"},
}
TYPESCRIPT_PACKAGES = {
    **{"rxjs": "7.8.2", "effect": "4.1.0", "zod": "4.6.7", "mobx": "7.1.3", "immer": "11.2.13"},
    **{"@tanstack/query-core": "5.108.4", "@tanstack/router-core": "1.171.39"},
    **{"@reduxjs/toolkit": "2.15.0", "redux": "5.0.1", "@trpc/server": "11.25.2"},
}
TYPESCRIPT_LIB = ("typescript", "5.9.3")  # lib/*.d.ts: the standard library's declarations (7.x ships none)

# Folders (under runs/sources/<language>/) kept for evaluation only.
PYTHON_STDLIB_HELD_OUT = (
    "email",
    "json",
    "http",
    "logging",
    "xml",
    "urllib",
    "asyncio",
    "concurrent",
    "sqlite3",
)
HELD_OUT = {
    "python": (*(f"stdlib/{name}" for name in PYTHON_STDLIB_HELD_OUT), "extra"),
    "java": ("java.base/java/util/concurrent", "java.base/java/time", "java.base/java/text"),
    "go": ("net/http", "encoding/json", "strings"),
    "javascript": ("lodash", "ramda"),
    "typescript": ("rxjs", "immer"),
}

SUFFIXES = {
    "python": (".py",),
    "java": (".java",),
    "go": (".go",),
    "javascript": (".js", ".mjs", ".cjs", ".jsx"),
    "typescript": (".ts", ".tsx", ".mts", ".cts"),
}
SKIPPED_FOLDERS = frozenset({"__pycache__", "node_modules", ".git", "site-packages", "testdata"})


# ---------------------------------------------------------------------------------------------- fetch


def fetch(sources: Path, languages: list[str], force: bool) -> None:
    fetchers = {"python": fetch_python, "java": fetch_java, "go": fetch_go}
    fetchers |= {"javascript": fetch_javascript, "typescript": fetch_typescript}
    manifest_path = sources / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for language in languages:
        target = sources / language
        if target.is_dir() and language in manifest and not force:
            print(f"{target}: already fetched (--force to fetch again)")
            continue
        started = time.perf_counter()
        partial = sources / f".{language}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        record = fetchers[language](partial, sources)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        files = sum(1 for path in target.rglob("*") if path.is_file())
        record |= {"files": files, "seconds": round(time.perf_counter() - started, 1)}
        manifest[language] = record
        write_json(manifest_path, manifest)
        print(f"{target}: {files} files in {record['seconds']} s")


def fetch_python(target: Path, sources: Path) -> dict:
    paths = sysconfig.get_paths()
    copy_sources(Path(paths["stdlib"]), target / "stdlib", SUFFIXES["python"], skip=("test", "tests"))
    copy_sources(Path(paths["purelib"]), target / "purelib", SUFFIXES["python"], skip=PYTHON_PACKAGE_FOLDERS)
    pinned = [f"{name}=={version}" for name, version in PYTHON_PACKAGES.items()]
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target / "extra", *pinned])
    for path in list((target / "extra").rglob("*")):  # keep only the sources
        if path.is_file() and path.suffix != ".py":
            path.unlink()
    return {"stdlib": paths["stdlib"], "purelib": paths["purelib"], "packages": PYTHON_PACKAGES}


def fetch_java(target: Path, sources: Path) -> dict:
    archive = jdk_source_archive()
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.infolist():
            module = member.filename.split("/")[0]
            if module in JAVA_MODULES and member.filename.endswith(".java") and not member.is_dir():
                zipped.extract(member, target)
    return {"archive": str(archive), "modules": list(JAVA_MODULES)}


def jdk_source_archive() -> Path:
    """The JDK 17 source archive if there is one, else the newest other JDK's."""
    candidates = sorted(
        Path("/usr/lib/jvm").glob("*/lib/src.zip"), key=lambda p: ("17" not in p.parent.parent.name, p)
    )
    for candidate in candidates:
        if candidate.resolve().is_file():
            return candidate.resolve()
    raise SystemExit(
        "no JDK source archive (lib/src.zip) under /usr/lib/jvm: apt-get install openjdk-17-source"
    )


def fetch_go(target: Path, sources: Path) -> dict:
    root = go_source_root()
    if root is None:
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "golang-src"])
        root = go_source_root()
    if root is None:
        raise SystemExit(
            "Debian's golang-src did not give a Go standard library under /usr/share or /usr/lib"
        )
    copy_sources(root, target, SUFFIXES["go"], skip=("vendor",))
    return {"source": str(root)}


def go_source_root() -> Path | None:
    roots = [
        p for p in (*Path("/usr/share").glob("go-*/src"), *Path("/usr/lib").glob("go*/src")) if p.is_dir()
    ]
    return sorted(roots, key=lambda p: p.parent.name)[-1].resolve() if roots else None


def fetch_javascript(target: Path, sources: Path) -> dict:
    npm_root = Path(run(["npm", "root", "-g"], capture=True).strip()) / "npm"
    copy_sources(npm_root / "lib", target / "npm" / "lib", SUFFIXES["javascript"])
    bundled = npm_root / "node_modules"
    for package in npm_packages_in(bundled):
        copy_sources(bundled / package, target / package, SUFFIXES["javascript"])
    installed = npm_install(sources, JAVASCRIPT_PACKAGES)
    for name in JAVASCRIPT_PACKAGES:
        shutil.rmtree(target / name, ignore_errors=True)  # an installed package wins over a bundled one
        copy_sources(installed / name, target / name, SUFFIXES["javascript"])
    return {"npm": str(npm_root), "bundled": npm_packages_in(bundled), "packages": JAVASCRIPT_PACKAGES}


def fetch_typescript(target: Path, sources: Path) -> dict:
    installed = npm_install(sources, dict([TYPESCRIPT_LIB, *TYPESCRIPT_PACKAGES.items()]))
    for name in TYPESCRIPT_PACKAGES:
        copy_sources(installed / name, target / name, SUFFIXES["typescript"])
    copy_sources(installed / TYPESCRIPT_LIB[0] / "lib", target / "typescript-lib", (".d.ts",))
    return {"packages": TYPESCRIPT_PACKAGES, "declarations": dict([TYPESCRIPT_LIB])}


def npm_install(sources: Path, packages: dict[str, str]) -> Path:
    prefix = sources / ".npm"
    pinned = [f"{name}@{version}" for name, version in packages.items()]
    run(["npm", "install", "--prefix", prefix, "--ignore-scripts", "--no-audit", "--no-fund", *pinned])
    return prefix / "node_modules"


def npm_packages_in(folder: Path) -> list[str]:
    """Package folders: `name`, or `@scope/name`."""
    names = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("@"):
            names += [f"{entry.name}/{inner.name}" for inner in sorted(entry.iterdir()) if inner.is_dir()]
        elif entry.is_dir() and not entry.name.startswith("."):
            names.append(entry.name)
    return names


def copy_sources(source: Path, target: Path, suffixes: tuple[str, ...], skip: tuple[str, ...] = ()) -> None:
    """Copy the files ending in `suffixes`; linked folders are not entered, linked files not copied."""
    skipped = SKIPPED_FOLDERS.union(skip)
    for folder, dirs, names in os.walk(source):
        dirs[:] = [d for d in dirs if d not in skipped]
        for name in names:
            path = Path(folder, name)
            if name.endswith(suffixes) and not path.is_symlink() and path.is_file():
                destination = target / path.relative_to(source)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, destination)


def run(command: list, capture: bool = False) -> str:
    command = [str(part) for part in command]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return result.stdout or ""


# ---------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildSettings:
    max_train_pairs: int | None = 60_000
    dev_fraction: float = 0.02
    test_fraction: float = 0.02
    workers: int = os.cpu_count() or 1
    typescript_declarations: bool = False
    held_out: dict = field(default_factory=lambda: HELD_OUT)


def build(sources: Path, out: Path, languages: list[str], options: BuildSettings) -> None:
    missing = [language for language in languages if not (sources / language).is_dir()]
    if missing:
        raise SystemExit(f"no sources for {', '.join(missing)} under {sources}: run `fetch` first")
    started = time.perf_counter()
    jobs = [(language, part) for part in ("heldout", "train") for language in languages]
    workers = max(1, min(options.workers, len(jobs)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {job: pool.submit(build_one, sources, out, *job, options) for job in jobs}
        results = {job: future.result() for job, future in futures.items()}
    manifest = {
        "seconds": round(time.perf_counter() - started, 1),
        "held_out": options.held_out,
        "languages": {},
    }
    for language in languages:
        train = results[language, "train"]
        left = drop_held_out_texts(out / "train" / language, out / "heldout" / language)
        removed = sum(train["functions"].values()) - sum(left.values())
        train |= {"functions": {**train["functions"], **left}, "removed_as_held_out": removed}
        manifest["languages"][language] = {"train": train, "heldout": results[language, "heldout"]}
    write_json(out / "manifest.json", manifest)
    print(f"{'language':12s} {'train':>7s} {'dev':>6s} {'test':>6s} {'held-out':>9s}")
    for language, record in manifest["languages"].items():
        train = record["train"]["functions"]
        print(
            f"{language:12s} {train['train']:7d} {train['dev']:6d} {train['test']:6d} "
            f"{record['heldout']['functions']['test']:9d}"
        )
    print(f"built in {manifest['seconds']} s -> {out}/train/<language>, {out}/heldout/<language>")


def build_one(sources: Path, out: Path, language: str, part: str, options: BuildSettings) -> dict:
    from mbert_retrieval.evaluation.code_dataset import DEFAULT_EXCLUDED_DIRS, build_code_dataset

    started = time.perf_counter()
    common = dict(
        languages=(language,),
        typescript_declarations=options.typescript_declarations,
        show_progress=False,
    )
    held_out = options.held_out[language]
    if part == "heldout":
        summary = build_code_dataset(
            sources / language,
            out / part / language,
            include_dirs=held_out,
            test_fraction=1,
            dev_fraction=0,
            **common,
        )
    else:
        summary = build_code_dataset(
            sources / language,
            out / part / language,
            exclude_dirs=(*DEFAULT_EXCLUDED_DIRS, *(f"{path}/" for path in held_out)),
            test_fraction=options.test_fraction,
            dev_fraction=options.dev_fraction,
            max_functions=options.max_train_pairs,
            **common,
        )
    return {
        "folder": summary.folder,
        "functions": summary.functions,
        "files_read": summary.files_read,
        "files_skipped": summary.files_skipped,
        "file_problems": summary.file_problems,
        "files_left_out": summary.files_left_out,
        "skipped": summary.skipped,
        "seconds": round(time.perf_counter() - started, 1),
    }


def drop_held_out_texts(train: Path, heldout: Path) -> dict[str, int]:
    """Remove from the training set every pair whose query or function text is also a held-out pair's
    (the same function copied into two packages, say): its qrels row, its query and its document.
    Returns the pairs left per split."""
    held_queries = {record["text"] for _, record in read_jsonl(heldout / "queries.jsonl")}
    held_code = {record["text"] for _, record in read_jsonl(heldout / "corpus.jsonl")}
    bad = {
        record["_id"] for _, record in read_jsonl(train / "queries.jsonl") if record["text"] in held_queries
    }
    bad |= {record["_id"] for _, record in read_jsonl(train / "corpus.jsonl") if record["text"] in held_code}
    dropped, left = set(), {}
    for qrels in sorted((train / "qrels").glob("*.tsv")):
        header, *rows = qrels.read_text().splitlines(keepends=True)
        kept = []
        for row in rows:
            query, document = row.split("\t")[:2]
            if query in bad or document in bad:
                dropped |= {query, document}
            else:
                kept.append(row)
        left[qrels.stem] = len(kept)
        if len(kept) < len(rows):
            atomic_write(qrels, "".join([header, *kept]))
    for name in ("queries.jsonl", "corpus.jsonl") if dropped else ():
        kept_lines = [line for line, record in read_jsonl(train / name) if record["_id"] not in dropped]
        atomic_write(train / name, "".join(kept_lines))
    return left


def read_jsonl(path: Path):
    """(line, record) for every line of a JSON-lines file."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield line, json.loads(line)


# -------------------------------------------------------------------------------------------- helpers


def write_json(path: Path, value) -> None:
    atomic_write(path, json.dumps(value, indent=2) + "\n")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["fetch", "build"])
    parser.add_argument("--sources", type=Path, default=Path("runs/sources"))
    parser.add_argument("--out", type=Path, default=Path("runs/datasets"), help="build: output folder")
    parser.add_argument("--languages", default=",".join(LANGUAGES), help="comma-separated")
    parser.add_argument("--force", action="store_true", help="fetch: fetch again what is already there")
    parser.add_argument("--max-train-pairs", type=int, default=60_000, help="build: cap per language")
    parser.add_argument("--dev-fraction", type=float, default=0.02, help="build: share of training units")
    parser.add_argument("--test-fraction", type=float, default=0.02, help="build: share of training units")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="build: processes")
    parser.add_argument(
        "--typescript-declarations",
        action="store_true",
        help="build: also .d.ts doc comment -> signature pairs",
    )
    args = parser.parse_args()
    languages = [name.strip() for name in args.languages.split(",") if name.strip()]
    unknown = sorted(set(languages) - set(LANGUAGES))
    if unknown:
        parser.error(f"unknown language(s) {', '.join(unknown)}; choose among {', '.join(LANGUAGES)}")
    if args.command == "fetch":
        fetch(args.sources, languages, args.force)
    else:
        settings = BuildSettings(
            args.max_train_pairs,
            args.dev_fraction,
            args.test_fraction,
            args.workers,
            args.typescript_declarations,
        )
        build(args.sources, args.out, languages, settings)


if __name__ == "__main__":
    main()
