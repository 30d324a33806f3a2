"""Writes tests/data/saved_code_index/: a code index (`build_code_index`, code index format 2) of a
tiny repository, encoded by the hashing model, and the hits it gave in each search mode.

Run once from the repository root, on the version whose format the folder keeps:
    PYTHONPATH=.:tests python tests/data/write_saved_code_index.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hashing_models import HashingEncoder

from mbert_retrieval.code.index import CodeIndex, build_code_index

HERE = Path(__file__).parent / "saved_code_index"
FILES = {
    "text/json_io.py": '''"""Reading and writing JSON."""

import json


def parse_json_string(text):
    """Parse a json string into a dict."""
    return json.loads(text)


class JsonWriter:
    """Write values as JSON to a file."""

    def write_file(self, path, value):
        """Write one value to a file as JSON."""
        with open(path, "w") as handle:
            json.dump(value, handle)
''',
    "text/lists.py": '''def sort_numbers(numbers):
    """Sort a list of numbers in place."""
    numbers.sort()
    return numbers


def merge_sorted(first, second):
    """Merge two sorted lists into one list."""
    return sorted(first + second)
''',
    "web/http.js": """/** Send an http request and read the reply. */
export async function fetchReply(url) {
  const reply = await fetch(url);
  return reply.text();
}
""",
}
QUERIES = ["parse a json string", "sort numbers", "read the http reply", "write a file"]
MODES = ("dense", "bm25", "hybrid")


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for name, text in FILES.items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(text)
        model = HashingEncoder()
        build_code_index(repo, HERE / "index", model, model_name="hashing-dense", show_progress=False)
    index = CodeIndex.load(HERE / "index")
    hits = {
        mode: [
            [[h.path, h.start_line, h.symbol, h.score] for h in index.search(model, q, k=4, mode=mode)]
            for q in QUERIES
        ]
        for mode in MODES
    }
    (HERE / "expected_hits.json").write_text(json.dumps({"queries": QUERIES, "hits": hits}, indent=1))
    (HERE / "index" / ".lock").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
