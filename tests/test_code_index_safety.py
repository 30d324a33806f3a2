"""What the code index must never do: serve secrets, read through links out of the tree, trust damaged
or edited metadata, stop a whole build for one odd file, or leave module code without a name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from code_search_repo import STDLIB

from mbert_retrieval.code import index as code_index
from mbert_retrieval.code.chunking import chunk_file
from mbert_retrieval.code.encoders import load_encoder
from mbert_retrieval.code.index import POINTER, CodeIndex, build_code_index, document_text
from mbert_retrieval.code.walk import _walk, read_source, scan_repository
from mbert_retrieval.index.storage import IndexFormatError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OUTSIDE_WORD = "zyxwvoutsider"
SECRET_WORD = "hunter2topsecret"
SECRET_FILES = {
    ".env": f"API_TOKEN={SECRET_WORD}\n",
    ".env.production": f"DB_PASSWORD={SECRET_WORD}\n",
    "prod.env": f"PASSWORD={SECRET_WORD}\n",
    "id_rsa": f"-----BEGIN RSA PRIVATE KEY-----\n{SECRET_WORD}\n-----END RSA PRIVATE KEY-----\n",
    "keys/id_ed25519": f"{SECRET_WORD}\n",
    "tls/server.pem": f"{SECRET_WORD}\n",
    "tls/server.key": f"{SECRET_WORD}\n",
    "tls/client.p12": f"{SECRET_WORD}\n",
    "tls/client.pfx": f"{SECRET_WORD}\n",
    ".netrc": f"machine example.com login me password {SECRET_WORD}\n",
    ".pgpass": f"localhost:5432:db:me:{SECRET_WORD}\n",
    ".npmrc": f"//registry.npmjs.org/:_authToken={SECRET_WORD}\n",
    ".pypirc": f"[pypi]\npassword = {SECRET_WORD}\n",
    "config/credentials.json": f'{{"secret": "{SECRET_WORD}"}}\n',
    "config/credentials": f"{SECRET_WORD}\n",
    "config/secrets.yaml": f"token: {SECRET_WORD}\n",
    "deploy/deploy_key": f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET_WORD}\n-----END OPENSSH PRIVATE KEY-----\n",
    ".ssh/config": f"Host x\n  IdentityFile {SECRET_WORD}\n",
}
KEPT_FILES = {  # look a little like secrets, but are code or public
    "auth/credentials.py": "def load_credentials(path):\n    return open(path).read()\n",
    "config/secrets.py": "def rotate_secrets(store):\n    return store.rotate()\n",
    "keys/id_ed25519.pub": "ssh-ed25519 AAAAC3Nza public key\n",
    "app.py": "def handle_request(request):\n    return request.path\n",
}


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.fixture(scope="module")
def model(hf_mlm_dir):
    return load_encoder(str(hf_mlm_dir))


# --------------------------------------------------------------------------------- secrets and links


def test_secret_looking_files_are_skipped_unless_asked_for(tmp_path):
    write_files(tmp_path, {**SECRET_FILES, **KEPT_FILES})
    scan = scan_repository(tmp_path)
    assert set(scan.files) == set(KEPT_FILES)
    assert scan.skipped["secret"] == len(SECRET_FILES)  # .ssh/ holds one file and counts once, as a folder
    assert all(SECRET_WORD not in f.text for f in scan.files.values())

    everything = scan_repository(tmp_path, include_secrets=True)
    assert set(everything.files) == set(SECRET_FILES) | set(KEPT_FILES)
    assert everything.skipped["secret"] == 0


def test_index_code_reports_skipped_secrets_and_indexes_them_only_when_asked(model, tmp_path):
    repo = tmp_path / "repo"
    write_files(repo, {**SECRET_FILES, **KEPT_FILES})
    report = build_code_index(repo, tmp_path / "index", model, model_name="tiny", show_progress=False)
    assert report.skipped["secret"] == len(SECRET_FILES)
    assert "secret" in report.summary() and "--include-secrets" in report.summary()
    index = CodeIndex.load(tmp_path / "index")
    assert not any(SECRET_WORD in c.text for c in index.chunks)
    assert not index.search(model, SECRET_WORD, k=5, mode="bm25")

    report = build_code_index(
        repo, tmp_path / "index", model, model_name="tiny", show_progress=False, include_secrets=True
    )
    assert "secret" not in report.skipped
    hits = CodeIndex.load(tmp_path / "index").search(model, SECRET_WORD, k=50, mode="bm25")
    assert {h.path for h in hits} == set(SECRET_FILES)


def test_no_walk_follows_a_link_out_of_the_tree(tmp_path):
    root, outside = tmp_path / "repo", tmp_path / "outside"
    write_files(root, {"pkg/inside.py": "def inside():\n    return 1\n"})
    write_files(outside, {"leak.py": f"def {OUTSIDE_WORD}():\n    return 2\n"})
    os.symlink(outside / "leak.py", root / "file_link.py")
    os.symlink(outside, root / "folder_link")
    os.symlink(root / "pkg", root / "inner_link")  # inside the tree, but a link: not followed either
    os.makedirs(root / ".git" / "info")
    os.symlink(outside / "leak.py", root / ".git" / "info" / "exclude")
    scan = scan_repository(root)
    assert set(scan.files) == {"pkg/inside.py"}
    assert scan.skipped["symlink"] == 3
    assert all(OUTSIDE_WORD not in f.text for f in scan.files.values())


def test_a_folder_swapped_for_a_link_during_the_walk_is_not_read(tmp_path):
    root, outside = tmp_path / "repo", tmp_path / "outside"
    write_files(root, {"pkg/mod.py": "def mod():\n    return 1\n"})
    write_files(outside, {"mod.py": f"def {OUTSIDE_WORD}():\n    return 2\n"})
    [relative] = list(_walk(root.resolve(), __import__("collections").Counter()))
    shutil.rmtree(root / "pkg")
    os.symlink(outside, root / "pkg")  # the walk saw a folder; the read would now leave the tree
    assert read_source(root.resolve(), relative, 1_000_000) == (None, "symlink")


# ---------------------------------------------------------------------------- one odd file, no crash


def test_a_file_name_that_is_not_utf8_is_indexed_under_a_readable_path(model, tmp_path):
    repo = tmp_path / "repo"
    write_files(repo, {"app.py": KEPT_FILES["app.py"]})
    try:
        (repo / os.fsdecode(b"caf\xe9.py")).write_text("def latte_art():\n    return 'foam'\n")
        (repo / os.fsdecode(b"caf\xe8.py")).write_text("def espresso():\n    return 'crema'\n")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    report = build_code_index(repo, tmp_path / "index", model, model_name="tiny", show_progress=False)
    index = CodeIndex.load(tmp_path / "index")
    assert "caf\ufffd.py" in index.files  # both names read the same: the second is counted, not indexed
    assert report.skipped["duplicate_name"] == 1
    assert all(c.path.encode("utf-8") for c in index.chunks)  # no lone surrogates
    assert {h.path for h in index.search(model, "latte_art espresso", k=5, mode="bm25")} == {"caf\ufffd.py"}


DEEP_PYTHON = "x = (\n" + "\n".join(["1 +" * 1000] * 200) + " 1)\n"  # 200 000 terms, short lines


def test_deeply_nested_source_falls_back_to_line_windows():
    chunks = chunk_file("pkg/deep.py", DEEP_PYTHON)
    assert chunks and {c.kind for c in chunks} == {"module"} and {c.symbol for c in chunks} == {"pkg.deep"}
    assert chunks[0].start_line == 1 and chunks[-1].end_line == len(DEEP_PYTHON.splitlines())
    deep_js = "const x = " + "[" * 100_000 + "]" * 100_000 + ";\nfunction after() { return 1; }\n"
    assert chunk_file("deep.js", deep_js)  # tree-sitter's walk is depth-bounded


def test_one_odd_file_never_stops_a_build(model, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    write_files(
        repo, {"deep.py": DEEP_PYTHON, "app.py": KEPT_FILES["app.py"], "odd.py": "def odd():\n  pass\n"}
    )
    real_chunk_file = code_index.chunk_file

    def chunker_with_a_bug(path, text, settings=None):
        if path == "odd.py":
            raise IndexError("a chunker bug")
        return real_chunk_file(path, text, settings)

    monkeypatch.setattr(code_index, "chunk_file", chunker_with_a_bug)
    report = build_code_index(repo, tmp_path / "index", model, model_name="tiny", show_progress=False)
    index = CodeIndex.load(tmp_path / "index")
    assert {c.path for c in index.chunks} == {"deep.py", "app.py"}
    assert report.skipped["unchunkable"] == 1


# ------------------------------------------------------------------------------------- module symbols


def test_module_level_chunks_are_named_after_their_module():
    code = "import os\nimport sys\n\nLIMIT = 10\n\ndef f():\n    return LIMIT\n"
    symbols = {c.kind: c.symbol for c in chunk_file("pkg/sub/mod.py", code)}
    assert symbols == {"module": "pkg.sub.mod", "function": "f"}
    assert {c.symbol for c in chunk_file("pkg/__init__.py", code) if c.kind == "module"} == {"pkg"}
    js = "import { a } from './a.js';\nconst LIMIT = 10;\nfunction f() { return LIMIT; }\n"
    assert {c.symbol for c in chunk_file("web/app.js", js) if c.kind == "module"} == {"web/app.js"}
    assert {c.symbol for c in chunk_file("docs/notes.md", "# Notes\nline\n")} == {"docs/notes.md"}
    module = next(c for c in chunk_file("pkg/sub/mod.py", code) if c.kind == "module")
    assert document_text(module) == f"pkg/sub/mod.py \n{module.text}"  # what is encoded is unchanged


# ---------------------------------------------------------------------------------- checked metadata

METADATA_FILES = ("index.json", "chunks.json", "dense/manifest.json", "bm25/manifest.json")
QUERIES = ("decode a JSON document", "escape a string", "scanner")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    tmp = tmp_path_factory.mktemp("checked")
    repo = tmp / "repo"
    shutil.copytree(STDLIB / "json", repo / "json", ignore=shutil.ignore_patterns("__pycache__"))
    build_code_index(repo, tmp / "index", model, model_name="tiny", show_progress=False)
    return tmp / "index"


def results(index: CodeIndex, model) -> list:
    return [
        [
            (h.path, h.start_line, h.symbol, h.text, round(h.score, 5))
            for h in index.search(model, q, k=8, mode=m)
        ]
        for q in QUERIES
        for m in ("dense", "bm25")
    ]


def live_folder(index_dir: Path) -> Path:
    return index_dir / json.loads((index_dir / POINTER).read_text())["snapshot"]


def damaged_variants(data: bytes):
    """(description, damaged bytes): bit flips, a digit changed, a byte cut, one added, a truncation."""
    for position in sorted(
        {0, 1, len(data) // 7, len(data) // 3, len(data) // 2, 2 * len(data) // 3, len(data) - 2}
    ):
        byte = data[position]
        yield f"bit flip at {position}", data[:position] + bytes([byte ^ 0x01]) + data[position + 1 :]
        yield f"byte cut at {position}", data[:position] + data[position + 1 :]
        yield f"byte added at {position}", data[:position] + b" " + data[position:]
        yield f"truncated at {position}", data[:position]
    for digit in b"0123456789":  # a number changed: a line number, a count, a setting
        position = data.find(bytes([digit]), len(data) // 2)
        if position >= 0:
            changed = bytes([ord("0") + (digit - ord("0") + 1) % 10])
            yield f"digit changed at {position}", data[:position] + changed + data[position + 1 :]


def test_every_damaged_metadata_byte_is_refused_or_harmless(saved, model, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(saved, index_dir)
    expected = results(CodeIndex.load(index_dir), model)
    folder = live_folder(index_dir)
    targets = [index_dir / POINTER] + [folder / name for name in METADATA_FILES]
    outcomes = {"refused": 0, "harmless": 0}
    for path in targets:
        original = path.read_bytes()
        for what, damaged in damaged_variants(original):
            path.write_bytes(damaged)
            try:
                index = CodeIndex.load(index_dir)
            except IndexFormatError as err:
                message = str(err)
                assert "\n" not in message and str(index_dir) in message, (path, what, message)
                outcomes["refused"] += 1
            else:
                assert path.name == POINTER, f"{path} {what}: a checksummed file was damaged unnoticed"
                assert results(index, model) == expected, f"{path} {what} changed the results"
                outcomes["harmless"] += 1
            finally:
                path.write_bytes(original)
    assert outcomes["refused"] >= 5 * 20
    assert results(CodeIndex.load(index_dir), model) == expected


def repin(index_dir: Path) -> None:
    """Recompute the checksums after an edit, as someone editing the files by hand could."""
    folder = live_folder(index_dir)
    meta = json.loads((folder / "index.json").read_text())
    meta["checksums"] = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in meta["checksums"]
    }
    (folder / "index.json").write_text(json.dumps(meta))
    pointer = json.loads((index_dir / POINTER).read_text())
    pointer["index_sha256"] = hashlib.sha256((folder / "index.json").read_bytes()).hexdigest()
    (index_dir / POINTER).write_text(json.dumps(pointer))


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def set_first_chunk_path(path: str):
    def change(rows):
        rows[0]["path"] = path

    return change


EDITS = {
    "metric": ("dense/manifest.json", lambda m: m.update(metric="l2"), "metric 'l2'"),
    "unknown metric": ("dense/manifest.json", lambda m: m.update(metric="cosine"), "metric"),
    "root elsewhere": ("index.json", lambda m: m.update(root="/etc"), None),
    "relative root": ("index.json", lambda m: m.update(root="repo"), "'root'"),
    "root with ..": ("index.json", lambda m: m.update(root=m["root"] + "/../../etc"), "'root'"),
    "chunk path ..": ("chunks.json", set_first_chunk_path("../../etc/shadow"), "not a relative path"),
    "absolute chunk path": ("chunks.json", set_first_chunk_path("/etc/shadow"), "not a relative path"),
    "chunk path not indexed": ("chunks.json", set_first_chunk_path("json/other.py"), "not among"),
    "file path ..": ("index.json", lambda m: m["files"].update({"../x.py": {"sha256": "0"}}), "file path"),
    "fusion mode": ("index.json", lambda m: m["fusion"].update(mode="magic"), "'fusion'"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_metadata_is_refused_with_or_without_fixed_checksums(saved, tmp_path, edit):
    name, change, repinned_message = EDITS[edit]
    index_dir = tmp_path / "index"
    shutil.copytree(saved, index_dir)
    edit_json(live_folder(index_dir) / name, change)
    with pytest.raises(IndexFormatError, match="checksum") as refused:
        CodeIndex.load(index_dir)
    assert str(live_folder(index_dir) / name) in str(refused.value)
    repin(index_dir)  # the values themselves are checked too, whatever the checksums say
    if repinned_message is None:  # another absolute folder with fixed checksums is a valid index
        assert CodeIndex.load(index_dir).root == Path("/etc")
        return
    with pytest.raises(IndexFormatError, match=repinned_message):
        CodeIndex.load(index_dir)


def make_legacy(index_dir: Path) -> None:
    """Rewrite an index as the release before checksums saved it."""
    folder = live_folder(index_dir)
    edit_json(folder / "index.json", lambda m: (m.pop("checksums"), m.update(format_version=1)))
    (index_dir / POINTER).write_text(json.dumps({"format_version": 1, "snapshot": folder.name}) + "\n")


def test_an_index_from_the_release_before_checksums_says_how_to_rebuild_it(saved, model, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(saved, index_dir)
    root = json.loads((live_folder(index_dir) / "index.json").read_text())["root"]
    make_legacy(index_dir)
    with pytest.raises(IndexFormatError) as refused:
        CodeIndex.load(index_dir)
    message = str(refused.value)
    assert (
        "earlier release" in message
        and f"mbert-retrieval index-code {root} --index {index_dir} --full" in message
    )
    report = build_code_index(root, index_dir, model, model_name="tiny", show_progress=False)
    assert report.full  # an update over an old index rebuilds it
    assert len(CodeIndex.load(index_dir)) == report.chunks
