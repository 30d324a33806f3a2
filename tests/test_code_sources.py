"""examples/code_sources.py build: held-out packages only in the held-out set, and never in training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mbert_retrieval.evaluation.data import load_beir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

FUNC = "// {name} returns the {what} of the input.\nfunc {name}(s string) int {{\n\treturn len(s) + {n}\n}}\n"


@pytest.fixture
def code_sources(monkeypatch):
    pytest.importorskip("tree_sitter_language_pack")
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the build's worker processes import it too
    import code_sources

    yield code_sources
    sys.modules.pop("code_sources", None)


def write_go(path: Path, functions: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(FUNC.format(name=name, what=what, n=n) for n, (name, what) in enumerate(functions))
    path.write_text(f"package {path.parent.name}\n\n{body}")


def test_build_keeps_held_out_packages_out_of_training(code_sources, tmp_path):
    go = tmp_path / "sources" / "go"
    write_go(go / "strings" / "strings.go", [("Count", "number of runes"), ("Index", "first position")])
    write_go(go / "net" / "http" / "client.go", [("Get", "response body"), ("Post", "posted form")])
    # the same function as a held-out one, in a training package: left out of training
    write_go(go / "bytes" / "bytes.go", [("Count", "number of runes"), ("Fields", "split fields")])
    for package in ("fmt", "io", "os", "sort", "path"):
        write_go(
            go / package / f"{package}.go",
            [(f"{package.title()}A", f"{package} value"), (f"{package.title()}B", "sum")],
        )
    write_go(go / "strings2" / "x.go", [("Other", "other thing")])  # a name that starts like a held-out one

    settings = code_sources.BuildSettings(
        max_train_pairs=None,
        dev_fraction=0.1,
        test_fraction=0.1,
        workers=2,
        held_out={"go": ("strings", "net/http")},
    )
    out = tmp_path / "datasets"
    code_sources.build(tmp_path / "sources", out, ["go"], settings)

    held_out = load_beir(out / "heldout" / "go", "test")
    assert set(held_out.corpus) == {
        "strings/strings.go:Count",
        "strings/strings.go:Index",
        "net/http/client.go:Get",
        "net/http/client.go:Post",
    }
    train_ids = set()
    for split in ("train", "dev", "test"):
        train_ids |= {doc for docs in load_beir(out / "train" / "go", split).qrels.values() for doc in docs}
    corpus_ids = {json.loads(line)["_id"] for line in (out / "train" / "go" / "corpus.jsonl").open()}
    assert "bytes/bytes.go:Count" not in corpus_ids  # its query is a held-out query
    assert train_ids == corpus_ids
    assert not any(doc.startswith(("strings/", "net/http/")) for doc in corpus_ids)
    assert {"bytes/bytes.go:Fields", "strings2/x.go:Other"} <= corpus_ids
    assert len(corpus_ids) == 12
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["languages"]["go"]
    assert record["train"]["removed_as_held_out"] == 1
    assert sum(record["train"]["functions"].values()) == 12
    assert record["heldout"]["functions"] == {"train": 0, "dev": 0, "test": 4}
