"""Saved indexes: round trips, the manifest, and what happens to damaged folders or interrupted saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mbert_retrieval.index.plaid import PlaidIndex
from mbert_retrieval.index.storage import IndexFormatError

F = torch.nn.functional
REPO = Path(__file__).resolve().parents[1]


def small_corpus(n_docs=200, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    topics = F.normalize(torch.randn(20, dim, generator=g), dim=-1)
    lengths = torch.randint(5, 30, (n_docs,), generator=g).tolist()
    docs = [
        F.normalize(
            topics[torch.randint(20, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g), dim=-1
        )
        for n in lengths
    ]
    queries = F.normalize(
        topics[torch.randint(20, (6, 16), generator=g)] + 0.3 * torch.randn(6, 16, dim, generator=g), dim=-1
    )
    return docs, [f"d{i}" for i in range(n_docs)], queries


@pytest.fixture
def plaid(tmp_path):
    docs, ids, queries = small_corpus()
    index = PlaidIndex.build(
        docs, ids, n_centroids=64, device="cpu", show_progress=False, model_name="colbert-x"
    )
    return index, queries


def data_files(directory: Path) -> dict[str, Path]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {name: directory / manifest["data"] / name for name in manifest["files"]}


def test_plaid_round_trip(plaid, tmp_path):
    index, queries = plaid
    index.save(tmp_path / "idx")
    loaded = PlaidIndex.load(tmp_path / "idx", device="cpu", expected_model="colbert-x")
    assert loaded.ids == index.ids and loaded.model_name == "colbert-x"
    for name in ("codes", "residuals", "doc_lengths", "ivf_docs", "ivf_offsets"):
        assert torch.equal(getattr(loaded, name), getattr(index, name)), name
    assert torch.equal(loaded.codec.centroids, index.codec.centroids)
    before, after = index.search(queries, k=5), loaded.search(queries, k=5)
    assert before[0] == after[0] and np.array_equal(before[1], after[1])

    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["index_type"] == "plaid"
    assert manifest["dim"] == 64 and manifest["nbits"] == 2 and manifest["model_name"] == "colbert-x"
    assert manifest["n_documents"] == 200 and manifest["n_tokens"] == index.n_tokens
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


def test_saving_again_replaces_the_data_and_leaves_one_version(plaid, tmp_path):
    index, _ = plaid
    index.save(tmp_path / "idx")
    index.delete(["d0", "d1"])
    index.save(tmp_path / "idx")
    assert len(PlaidIndex.load(tmp_path / "idx", device="cpu")) == 198
    assert len([p for p in (tmp_path / "idx").iterdir() if p.is_dir()]) == 1


def test_mismatched_model_is_refused(plaid, tmp_path):
    index, _ = plaid
    index.save(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="built with model 'colbert-x'"):
        PlaidIndex.load(tmp_path / "idx", device="cpu", expected_model="another-model")


def test_truncated_file_is_detected(plaid, tmp_path):
    index, _ = plaid
    index.save(tmp_path / "idx")
    path = data_files(tmp_path / "idx")["documents.safetensors"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IndexFormatError, match="truncated"):
        PlaidIndex.load(tmp_path / "idx", device="cpu")


def test_edited_file_is_detected(plaid, tmp_path):
    index, _ = plaid
    index.save(tmp_path / "idx")
    path = data_files(tmp_path / "idx")["documents.safetensors"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="checksum"):
        PlaidIndex.load(tmp_path / "idx", device="cpu")


def test_missing_or_corrupt_manifest_and_wrong_index_type(plaid, tmp_path):
    index, _ = plaid
    with pytest.raises(IndexFormatError, match="does not exist"):
        PlaidIndex.load(tmp_path / "nothing-here", device="cpu")
    index.save(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").write_text("{ not json")
    with pytest.raises(IndexFormatError, match="corrupt manifest"):
        PlaidIndex.load(tmp_path / "idx", device="cpu")
    index.save(tmp_path / "other")
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({**manifest, "index_type": "faiss"}))
    with pytest.raises(IndexFormatError, match="not a 'plaid' index"):
        PlaidIndex.load(tmp_path / "other", device="cpu")


def test_refuses_to_save_over_a_folder_that_is_not_an_index(plaid, tmp_path):
    index, _ = plaid
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(IndexFormatError, match="not an index"):
        index.save(tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import torch
    import mbert_retrieval.index.storage as storage
    from mbert_retrieval.index.{module} import {cls}

    real_write = storage.atomic_write

    def slow_write(path, write):  # each data file is written, then the process stalls
        real_write(path, write)
        print("wrote", path.name, flush=True)
        time.sleep(60)

    storage.atomic_write = slow_write
    index = {cls}.load(sys.argv[1])
    {change}
    index.save(sys.argv[1])
    """
)


def save_and_kill(directory: Path, module: str, cls: str, change: str) -> None:
    """Run a save of `directory` in a subprocess and SIGKILL it after its first data file is written."""
    script = KILLED_SAVE.format(module=module, cls=cls, change=change)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        line = process.stdout.readline().decode()
        assert line.startswith("wrote"), process.stderr.read().decode()
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_plaid_save_killed_midway_leaves_the_old_index_loadable(plaid, tmp_path):
    index, queries = plaid
    index.save(tmp_path / "idx")
    save_and_kill(tmp_path / "idx", "plaid", "PlaidIndex", "index.delete(index.ids[:50])")
    assert any(p.name.startswith(".staging-") for p in (tmp_path / "idx").iterdir()), "the kill came too late"
    survivor = PlaidIndex.load(tmp_path / "idx", device="cpu")
    assert survivor.ids == index.ids
    assert survivor.search(queries, k=5)[0] == index.search(queries, k=5)[0]
    survivor.save(tmp_path / "idx")  # the next save clears what the killed one left
    assert not any(p.name.startswith(".staging-") for p in (tmp_path / "idx").iterdir())


@pytest.mark.slow
def test_faiss_save_killed_midway_leaves_the_old_index_loadable(tmp_path):
    pytest.importorskip("faiss")
    from mbert_retrieval.index.faiss_index import FaissIndex

    vectors = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    index = FaissIndex(16, model_name="dense-x")
    index.add([f"d{i}" for i in range(100)], vectors)
    index.save(tmp_path / "idx")
    save_and_kill(tmp_path / "idx", "faiss_index", "FaissIndex", "index.delete(index.ids[:50])")
    survivor = FaissIndex.load(tmp_path / "idx", expected_model="dense-x")
    assert len(survivor) == 100 and survivor.search(vectors[:3], k=1)[0] == [["d0"], ["d1"], ["d2"]]


def test_faiss_damaged_files_and_model_mismatch(tmp_path):
    pytest.importorskip("faiss")
    from mbert_retrieval.index.faiss_index import FaissIndex

    index = FaissIndex(16, model_name="dense-x")
    index.add(["a", "b"], np.eye(2, 16, dtype=np.float32))
    index.save(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="built with model"):
        FaissIndex.load(tmp_path / "idx", expected_model="dense-y")
    path = data_files(tmp_path / "idx")["index.faiss"]
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(IndexFormatError, match="truncated"):
        FaissIndex.load(tmp_path / "idx")


STALLED_SAVE = textwrap.dedent(
    """
    import sys, tempfile, time
    import mbert_retrieval.index.storage as storage
    from mbert_retrieval.index.plaid import PlaidIndex

    def stalled_manifest_write(path, text):  # the temp file exists, the rename never comes
        tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        print("stalled", flush=True)
        time.sleep(60)

    storage.atomic_write_text = stalled_manifest_write
    index = PlaidIndex.load(sys.argv[1])
    index.delete(index.ids[:50])
    index.save(sys.argv[1])
    """
)


def left_by_saves(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((".staging-", ".manifest.json.")))


@pytest.mark.slow
def test_what_killed_saves_leave_is_removed_by_the_next_load_or_save(plaid, tmp_path):
    index, queries = plaid
    folder = tmp_path / "idx"
    index.save(folder)
    save_and_kill(folder, "plaid", "PlaidIndex", "index.delete(index.ids[:50])")
    assert [n[:9] for n in left_by_saves(folder)] == [".staging-"]
    loaded = PlaidIndex.load(folder, device="cpu")  # no save runs now: the staging folder goes
    assert left_by_saves(folder) == []
    assert loaded.ids == index.ids and loaded.search(queries, k=5)[0] == index.search(queries, k=5)[0]

    stalled = subprocess.Popen(
        [sys.executable, "-c", STALLED_SAVE, str(folder)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    try:
        assert stalled.stdout.readline().decode().startswith("stalled")
        in_use = left_by_saves(folder)
        assert len(in_use) == 1 and in_use[0].endswith(".tmp"), in_use
        # That save is running (it holds the lock): a load leaves its files alone.
        assert PlaidIndex.load(folder, device="cpu").ids == index.ids
        assert left_by_saves(folder) == in_use
    finally:
        stalled.kill()
        stalled.wait()
    assert PlaidIndex.load(folder, device="cpu").ids == index.ids  # killed: the old manifest holds
    assert left_by_saves(folder) == []

    save_and_kill(folder, "plaid", "PlaidIndex", "index.delete(index.ids[:50])")
    (folder / ".manifest.json.x1y2.tmp").write_text("{")
    assert len(left_by_saves(folder)) == 2
    loaded.save(folder)  # the next save clears them too, and old data folders
    assert left_by_saves(folder) == []
    live = json.loads((folder / "manifest.json").read_text())["data"]
    assert [p.name for p in folder.iterdir() if p.is_dir()] == [live]
