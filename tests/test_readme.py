"""The READMEs' examples run as written.

Python blocks run one by one, each in a fresh namespace, in a scratch folder holding the files they
name (`data/email`, `train.jsonl`, ...). Model names that stand for the reader's own models (the hub
id `answerdotai/ModernBERT-base`, `path/to/...`) are replaced by tiny models made here; the code
search example gets the shipped model. A block preceded by `<!-- not-tested: why -->` is only
compiled, and its imports resolved. Shell blocks are checked, not run: every `mbert-retrieval`
command and option they use exists, every `make` target is in the Makefile, every script exists.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mbert_retrieval.evaluation.data import save_beir
from typer.main import get_command

from mbert_retrieval.cli import app
from mbert_retrieval.models.dense import default_model_dir

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", REPO / "mbert_retrieval" / "default_model" / "README.md"]
NOT_TESTED = re.compile(r"<!--\s*not-tested:\s*(.+?)\s*-->")
MOST_NOT_TESTED = 2  # blocks that cannot run here (a long training run, ...): keep this number small


@dataclass
class Block:
    file: Path
    line: int  # of the opening fence
    language: str
    code: str
    not_tested: str | None  # the reason, when marked

    @property
    def name(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_TESTED.search(before)
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path, i + 1, fence.group(1), code, marker.group(1) if marker else None))
        i = end + 1
    return blocks


BLOCKS = [block for path in READMES for block in code_blocks(path)]
PYTHON = [b for b in BLOCKS if b.language == "python"]
SHELL = [b for b in BLOCKS if b.language in ("bash", "sh", "shell")]


def test_the_readmes_have_examples_and_few_untested_ones():
    assert len(PYTHON) >= 6 and len(SHELL) >= 4
    untested = [b.name for b in BLOCKS if b.not_tested]
    assert len(untested) <= MOST_NOT_TESTED, untested


# -- Python ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, hf_mlm_dir) -> tuple[Path, dict[str, str]]:
    """A scratch folder with the files the examples name, and the model names to replace."""
    from mbert_retrieval import ColBERT, CrossEncoder, DenseRetriever

    root = tmp_path_factory.mktemp("readme")
    models = root / "models"
    torch.manual_seed(0)
    DenseRetriever.from_pretrained(hf_mlm_dir, device="cpu").save_pretrained(models / "dense")
    ColBERT.from_pretrained(hf_mlm_dir, device="cpu").save_pretrained(models / "colbert")
    CrossEncoder.from_pretrained(hf_mlm_dir, device="cpu").save_pretrained(models / "cross-encoder")

    corpus = {
        "d1": {"title": "", "text": "def parse_address(text):\n    return email.utils.parseaddr(text)"},
        "d2": {"title": "", "text": "def sort_list(xs):\n    return sorted(xs)"},
        "d3": {"title": "", "text": "def read_file(path):\n    return open(path).read()"},
    }
    queries = {"q1": "parse an email address", "q2": "sort a list"}
    qrels = {"test": {"q1": {"d1": 1}, "q2": {"d2": 1}}, "dev": {"q1": {"d1": 1}}}
    save_beir(root / "data" / "email", corpus, queries, qrels)
    save_beir(root / "data" / "dev", corpus, queries, qrels)
    pairs = [{"query": q, "positive": corpus[d]["text"]} for q, d in (("q1", "d1"), ("q2", "d2"))]
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    repo = root / "repo" / "json"
    repo.mkdir(parents=True)
    (repo / "decoder.py").write_text(
        'def parse_json(text):\n    """Parse a json string."""\n    return loads(text)\n\n\n'
        'def dump_json(value):\n    """Write a value as json."""\n    return dumps(value)\n'
    )
    names = {
        "answerdotai/ModernBERT-base": hf_mlm_dir,
        "path/to/modernbert": hf_mlm_dir,
        "path/to/dense": models / "dense",
        "path/to/pylate-model": models / "colbert",
        "path/to/reranker": models / "cross-encoder",
        "path/to/cross-encoder": models / "cross-encoder",
        "path/to/dense-model": default_model_dir(),
        "path/to/repo": root / "repo",
    }
    return root, {name: str(path) for name, path in names.items()}


def with_local_models(code: str, names: dict[str, str]) -> str:
    for name, path in names.items():
        code = code.replace(f'"{name}"', repr(path))
    return code


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_example(block: Block, workspace, monkeypatch):
    compiled = compile(block.code, block.name, "exec")
    if block.not_tested:
        check_imports(block)
        pytest.skip(f"not run: {block.not_tested}")
    root, names = workspace
    monkeypatch.chdir(root)
    exec(compile(with_local_models(block.code, names), block.name, "exec"), {"__name__": "readme"})
    assert compiled is not None


def check_imports(block: Block) -> None:
    for node in ast.walk(ast.parse(block.code)):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.name}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


# -- shell -------------------------------------------------------------------------------------------


def shell_commands(block: Block) -> list[list[str]]:
    """Each command of the block as words (continuation lines joined, comments and env settings dropped)."""
    text = block.code.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))


def check_cli(words: list[str]) -> None:
    """`mbert-retrieval <command> [<subcommand>] [--options]`: each exists."""
    command = get_command(app)
    rest = list(words)
    while rest and hasattr(command, "commands") and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    assert not hasattr(command, "commands"), f"{' '.join(words)}: no such command"
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in rest:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            assert option in options, f"{' '.join(words[:2])} has no option {option}"


@pytest.mark.parametrize("block", SHELL, ids=[b.name for b in SHELL])
def test_shell_example_commands_exist(block: Block):
    for words in shell_commands(block):
        program = words[0]
        if program == "mbert-retrieval":
            check_cli(words[1:])
        elif program == "torchrun":
            module = words.index("-m")
            assert words[module + 1] == "mbert_retrieval.cli"
            check_cli(words[module + 2 :])
        elif program == "make":
            targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
            assert set(targets) <= make_targets(), targets
        elif program in ("python", "python3"):
            assert (REPO / words[1]).is_file(), f"{block.name}: {words[1]} does not exist"
        else:
            pytest.fail(f"{block.name}: unknown program {program!r} (teach this test about it)")
