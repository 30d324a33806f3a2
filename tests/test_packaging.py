"""What the wheel installs: `mbert_retrieval` and its subpackages, with the repository's `evaluation/`
folder as `mbert_retrieval.evaluation` (no top-level `evaluation`, a name another distribution uses);
and the same name works in a source checkout."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_arguments(monkeypatch) -> dict:
    """The keyword arguments setup.py hands to setuptools."""
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **arguments: captured.update(arguments))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


def test_the_wheel_installs_the_harnesses_inside_the_library(setup_arguments):
    packages = set(setup_arguments["packages"])
    assert {p.split(".")[0] for p in packages} == {"mbert_retrieval"}
    assert "mbert_retrieval.evaluation" in packages
    assert setup_arguments["package_dir"] == {"mbert_retrieval.evaluation": "evaluation"}
    assert (ROOT / "evaluation" / "metrics.py").is_file()


def test_every_source_folder_is_a_package(setup_arguments):
    folders = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "mbert_retrieval").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert folders <= set(setup_arguments["packages"])


def test_pyproject_leaves_the_package_list_to_setup_py():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "packages" not in config.get("tool", {}).get("setuptools", {})


def test_the_harnesses_import_under_the_library_name():
    code = (
        "import mbert_retrieval.evaluation.metrics as m; "
        "print(m.evaluate_run({'q': {'d1': 1}}, {'q': {'d2': 2.0, 'd1': 1.0}})['MRR@10'])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(0.5)


def test_nothing_imports_a_top_level_evaluation_package():
    """A module imported as both `evaluation.x` and `mbert_retrieval.evaluation.x` would be two
    modules, with two of every error class."""
    pattern = re.compile(r"^\s*(from|import) evaluation\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("mbert_retrieval", "evaluation", "tests", "benchmarks", "examples")
        for path in (ROOT / folder).rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    code = "import sys, mbert_retrieval.cli, mbert_retrieval.evaluation; print('evaluation' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_code_search_never_imports_the_server():
    """server/ is built on code/, never the other way: code search works without FastAPI, and the
    command line registers `serve` without importing it."""
    pattern = re.compile(r"^\s*(from|import) mbert_retrieval\.server\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "mbert_retrieval" / "code").rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    code = "import sys, mbert_retrieval.cli; print(sorted({'fastapi', 'uvicorn'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
