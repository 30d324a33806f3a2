"""`import mbert_retrieval` and `mbert-retrieval --help` stay quick: torch, transformers, faiss and
fastapi are imported by what uses them, not at start-up. Checked by what ends up in sys.modules of
a fresh interpreter (deterministic), with the start-up time printed for the record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mbert_retrieval

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "faiss", "fastapi", "sentence_transformers", "onnxruntime")

REPORT_HEAVY = f"""
import json, sys
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def heavy_modules_after(code: str) -> tuple[list[str], float]:
    """The heavy modules a fresh interpreter has loaded after running `code`, and its run time."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code + REPORT_HEAVY], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def test_importing_the_package_loads_no_heavy_dependency():
    loaded, seconds = heavy_modules_after("import mbert_retrieval")
    print(f"python -c 'import mbert_retrieval': {seconds:.2f} s")
    assert loaded == []


@pytest.mark.parametrize("arguments", [["--help"], ["index-code", "--help"], ["search", "--help"]])
def test_command_line_help_loads_no_heavy_dependency(arguments):
    run_cli = (
        "from mbert_retrieval.cli import app\n"
        "try:\n"
        f"    app({arguments!r})\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\n"
    )
    loaded, seconds = heavy_modules_after(run_cli)
    print(f"mbert-retrieval {' '.join(arguments)}: {seconds:.2f} s")
    assert loaded == []


def test_public_names_still_import_from_the_package():
    for name in mbert_retrieval.__all__:
        assert getattr(mbert_retrieval, name).__name__ == name
        assert name in dir(mbert_retrieval)
    from mbert_retrieval import CheckpointError, DenseRetriever, ModernBertConfig  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        _ = mbert_retrieval.NotAName
