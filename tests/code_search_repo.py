"""A real repository for the code search tests: stdlib packages copied into a temp folder, plus files
that must be skipped (gitignored, binary, not UTF-8, too large, generated, a link leaving the root)."""

from __future__ import annotations

import ast
import os
import shutil
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
OUTSIDE_WORD = "zyxwvoutsider"  # appears only in a file outside the repository

JAVASCRIPT = """\
// Utilities for the web client.
import { get } from './http.js';

/** Fetch the list of users from the server and sort them by name. */
export async function fetchSortedUsers(client) {
  const users = await get(client, '/users');
  return users.sort((a, b) => a.name.localeCompare(b.name));
}

export class Cache {
  constructor(limit) { this.limit = limit; this.items = new Map(); }

  /** Remove the least recently used entry when the cache is full. */
  evictOldest() {
    const first = this.items.keys().next().value;
    this.items.delete(first);
  }
}
"""

GO = """\
package geometry

// Point is a location on the plane.
type Point struct {
	X, Y float64
}

// Distance returns the euclidean distance between two points.
func (p Point) Distance(q Point) float64 {
	return math.Hypot(p.X-q.X, p.Y-q.Y)
}
"""


def make_repository(root: Path, packages: tuple[str, ...] = ("json", "email")) -> Path:
    """Copy stdlib `packages` under `root` and add the files a walk has to skip; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for package in packages:  # a package or a sub-package: "json", "email/mime"
        shutil.copytree(STDLIB / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "web").mkdir()
    (root / "web" / "users.js").write_text(JAVASCRIPT)
    (root / "geometry").mkdir()
    (root / "geometry" / "point.go").write_text(GO)

    (root / ".gitignore").write_text("build/\n*.log\nsecret_*.py\n!secret_but_kept.py\n")
    (root / "build").mkdir()
    (root / "build" / "generated.py").write_text("def ignored_build_function():\n    pass\n")
    (root / "debug.log").write_text("ignored log line\n")
    (root / "secret_key.py").write_text("KEY = 'ignored'\n")
    (root / "secret_but_kept.py").write_text("def kept_by_negation():\n    return 1\n")
    (root / "web" / ".gitignore").write_text("vendor.js\n")
    (root / "web" / "vendor.js").write_text("function ignoredVendor() {}\n")

    (root / "logo.png").write_bytes(bytes(range(256)) * 4)
    (root / "blob.dat.txt").write_bytes(b"text with a \0 byte\n")
    (root / "latin1.py").write_bytes(
        "# -*- coding: latin-1 -*-\ndef caf\xe9():\n    pass\n".encode("latin-1")
    )
    (root / "huge.txt").write_text("filler line\n" * 120_000)  # over 1 MB
    (root / "package-lock.json").write_text('{"lockfileVersion": 3}\n')

    outside = root.parent / f"{root.name}-outside.py"
    outside.write_text(f"def {OUTSIDE_WORD}():\n    '''{OUTSIDE_WORD} lives outside'''\n")
    os.symlink(outside, root / "link_outside.py")
    return root


def documented_functions(root: Path, package: str, limit: int = 12) -> list[tuple[str, str, str]]:
    """(path, symbol, first docstring line) of top-level functions and methods whose docstring's
    first line has five words or more and is unique, taken evenly over the package."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        for node in ast.parse(path.read_text()).body:
            members = [(node.name, node)] if isinstance(node, ast.FunctionDef) else []
            if isinstance(node, ast.ClassDef):
                members = [(f"{node.name}.{m.name}", m) for m in node.body if isinstance(m, ast.FunctionDef)]
            for symbol, function in members:
                docstring = ast.get_docstring(function)
                if docstring and len(docstring.split("\n")[0].split()) >= 5:
                    found.append((relative, symbol, docstring.split("\n")[0].strip()))
    counts = {}
    for _, _, line in found:
        counts[line] = counts.get(line, 0) + 1
    found = [f for f in found if counts[f[2]] == 1]
    step = max(1, len(found) // limit)
    return found[::step][:limit]


def index_and_search_json(runner, app, tmp_path: Path, cpu_backend: str) -> str:
    """`index-code` over the stdlib's json package, then `search-code` for a phrase its decoder
    answers, both on `cpu_backend`: the search's first output line."""
    repo, index = tmp_path / "repo", tmp_path / "index"
    shutil.copytree(STDLIB / "json", repo / "json", ignore=shutil.ignore_patterns("__pycache__"))
    built = runner.invoke(app, ["index-code", str(repo), "--index", str(index), "--cpu-backend", cpu_backend])
    assert built.exit_code == 0, built.output
    query = ["decode", "a", "json", "string"]
    found = runner.invoke(app, ["search-code", str(index), *query, "--cpu-backend", cpu_backend])
    assert found.exit_code == 0, found.output
    return found.output.splitlines()[0]
