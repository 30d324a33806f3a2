"""Indexing in shards: each rank encodes its part of the corpus, a merge builds the same index a single
process builds; finished shards are kept, and bad shards are clear errors."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stdlib_texts
from typer.testing import CliRunner

from mbert_retrieval.cli import app
from mbert_retrieval.search import sharded
from mbert_retrieval.search.models import build_retriever
from mbert_retrieval.search.retriever import Retriever

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """~300 short, distinct pieces of stdlib source (ivfpq needs 256 vectors to train on)."""
    texts = []
    for source in stdlib_texts(60):
        lines = [line for line in source.splitlines() if line.strip()]
        texts += ["\n".join(lines[start : start + 4]) for start in range(0, min(len(lines), 400), 25)]
    texts = list(dict.fromkeys(texts))[:300]
    assert len(texts) == 300
    return [f"doc-{i}" for i in range(len(texts))], texts


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    """Encoder segments of 64 documents (2048 in use), so the 300 documents make several and both
    shards hold some."""
    from mbert_retrieval.models import encoding

    monkeypatch.setattr(encoding, "TOKENIZE_CHUNK", 64)


@pytest.fixture(scope="module")
def queries(corpus) -> list[str]:
    return [text.splitlines()[0][:60] for text in corpus[1][::15]]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, hf_mlm_dir) -> dict[str, str]:
    from mbert_retrieval.models.colbert import ColBERT
    from mbert_retrieval.models.dense import DenseRetriever

    root = tmp_path_factory.mktemp("models")
    DenseRetriever.from_pretrained(hf_mlm_dir, max_length=64, device="cpu").save_pretrained(root / "dense")
    colbert = ColBERT.from_pretrained(hf_mlm_dir, query_length=16, document_length=48, device="cpu")
    colbert.save_pretrained(root / "colbert")
    return {"dense": str(root / "dense"), "colbert": str(root / "colbert")}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(*corpus)))
    return path


def single_process(model_dir, kind, corpus) -> Retriever:
    retriever = build_retriever(model_dir, kind, device="cpu")
    retriever.add(*corpus)
    return retriever


def encode_all_shards(shards_dir, model_dir, corpus, world_size=2) -> list[sharded.ShardStatus]:
    """What every torchrun rank does, one rank after the other in this process."""
    retriever = build_retriever(model_dir, "flat", device="cpu")
    digest = sharded.model_digest(Path(model_dir))
    return [
        sharded.encode_shard(
            shards_dir,
            rank,
            world_size,
            *corpus,
            retriever.model,
            retriever.model_name,
            model_fingerprint=digest,
            show_progress=False,
        )
        for rank in range(world_size)
    ]


def merged(tmp_path, model_dir, kind, corpus) -> Retriever:
    shards_dir = tmp_path / "out" / "shards"
    encode_all_shards(shards_dir, model_dir, corpus)
    shards = sharded.read_shards(shards_dir, corpus=corpus)
    assert sharded.merge_shards(shards, tmp_path / "out", kind, show_progress=False) == len(corpus[0])
    return Retriever.load(tmp_path / "out", device="cpu")


def top_ids(retriever: Retriever, queries, k=10) -> list[list[str]]:
    return [[hit.id for hit in hits] for hits in retriever.search(queries, k=k)]


def recall(found: list[list[str]], reference: list[list[str]]) -> float:
    return sum(len(set(f) & set(r)) for f, r in zip(found, reference)) / sum(len(r) for r in reference)


def test_merged_flat_index_returns_the_single_process_top_10(tmp_path, model_dirs, corpus, queries):
    reference = single_process(model_dirs["dense"], "flat", corpus)
    result = merged(tmp_path, model_dirs["dense"], "flat", corpus)
    assert result.ids == reference.ids
    assert top_ids(result, queries) == top_ids(reference, queries)


def test_merged_ivfpq_index_finds_what_the_single_process_one_finds(tmp_path, model_dirs, corpus, queries):
    reference = single_process(model_dirs["dense"], "ivfpq", corpus)
    result = merged(tmp_path, model_dirs["dense"], "ivfpq", corpus)
    assert recall(top_ids(result, queries), top_ids(reference, queries)) >= 0.99


def test_merged_plaid_index_finds_what_the_single_process_one_finds(tmp_path, model_dirs, corpus, queries):
    reference = single_process(model_dirs["colbert"], "plaid", corpus)
    result = merged(tmp_path, model_dirs["colbert"], "plaid", corpus)
    assert result.index.index.n_centroids == reference.index.index.n_centroids
    assert top_ids(result, queries) == top_ids(reference, queries)  # the same vectors, the same index


def test_shard_ranges_cover_the_corpus_in_whole_encoder_segments():
    for n_documents, world_size in ((300, 2), (300, 3), (64, 2), (1, 4), (1000, 7)):
        ranges = [sharded.shard_range(n_documents, r, world_size) for r in range(world_size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n_documents
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start % 64 == 0 for start, end in ranges if start < n_documents)
    assert [sharded.shard_range(300, r, 2) for r in range(2)] == [(0, 128), (128, 300)]


@pytest.mark.parametrize("kind", ["dense", "colbert"])
def test_shards_hold_the_very_vectors_one_process_encodes(tmp_path, model_dirs, corpus, kind):
    """Shards start on encoder segments, so their batches, and vectors, are one process's own."""
    shards = [status.folder for status in encode_all_shards(tmp_path / "shards", model_dirs[kind], corpus)]
    model = build_retriever(model_dirs[kind], "flat", device="cpu").model
    read = [sharded.read_shards(tmp_path / "shards")[r].vectors() for r in range(len(shards))]
    if kind == "dense":
        whole = np.asarray(model.encode_documents(corpus[1], show_progress_bar=False))
    else:
        whole = np.asarray(model.encode_documents(corpus[1], packed=True, show_progress_bar=False).embeddings)
    assert np.array_equal(np.concatenate(read), whole.astype(np.float32))


def test_merged_plaid_index_is_the_single_process_one_on_the_same_vectors(tmp_path, model_dirs, corpus):
    """Given the very vectors the shards hold, the merge builds PLAID bit for bit as one process does
    (same centroid sample, k-means, residual buckets, document order): any difference between the two
    indexes then comes from the encodings, not from the merge."""
    from mbert_retrieval.index.plaid import PlaidIndex

    result = merged(tmp_path, model_dirs["colbert"], "plaid", corpus).index.index
    shards = sharded.read_shards(tmp_path / "out" / "shards")
    vectors = sharded.ShardedTokenVectors(shards)
    documents = [vectors[i].clone() for i in range(len(vectors))]  # a plain list, as one process has
    reference = PlaidIndex.build(documents, corpus[0], device="cpu", show_progress=False)
    assert result.ids == reference.ids
    assert result.settings == reference.settings
    for name, tensor in reference.codec.state().items():
        assert torch.equal(result.codec.state()[name], tensor), name
    assert torch.equal(result.codes, reference.codes)
    assert torch.equal(result.residuals, reference.residuals)


def test_rerunning_keeps_finished_shards_and_redoes_a_missing_one(tmp_path, model_dirs, corpus):
    shards_dir = tmp_path / "shards"
    first = encode_all_shards(shards_dir, model_dirs["dense"], corpus)
    assert [s.encoded for s in first] == [True, True]
    kept_file = first[0].folder / "vectors.bin"
    kept_stamp = kept_file.stat().st_mtime_ns
    for path in first[1].folder.iterdir():
        path.unlink()
    first[1].folder.rmdir()
    with pytest.raises(sharded.ShardError, match="shard 1 of 2 is missing"):
        sharded.read_shards(shards_dir)
    again = encode_all_shards(shards_dir, model_dirs["dense"], corpus)
    assert [s.encoded for s in again] == [False, True]
    assert kept_file.stat().st_mtime_ns == kept_stamp
    assert len(sharded.read_shards(shards_dir, corpus=corpus)) == 2
    assert not [p for p in shards_dir.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_bad_shards_are_clear_errors(tmp_path, model_dirs, corpus):
    shards_dir = tmp_path / "shards"
    statuses = encode_all_shards(shards_dir, model_dirs["dense"], corpus)
    with pytest.raises(sharded.ShardError, match="another version of model"):
        sharded.read_shards(shards_dir, model_fingerprint="0" * 64)
    ids, texts = corpus
    changed = (ids, texts[:-1] + ["something else"])
    with pytest.raises(sharded.ShardError, match="shard-00001-of-00002 holds other documents"):
        sharded.read_shards(shards_dir, corpus=changed)

    vectors = statuses[1].folder / "vectors.bin"
    data = bytearray(vectors.read_bytes())
    data[10] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(sharded.ShardError, match="does not match its sha256 checksum"):
        sharded.read_shards(shards_dir)
    vectors.write_bytes(bytes(data[:-4]))
    with pytest.raises(sharded.ShardError, match="truncated or corrupt"):
        sharded.read_shards(shards_dir)
    # a corrupt shard is not "finished": its rank redoes it
    assert [s.encoded for s in encode_all_shards(shards_dir, model_dirs["dense"], corpus)] == [False, True]

    encode_all_shards(shards_dir, model_dirs["colbert"], corpus, world_size=3)
    with pytest.raises(sharded.ShardError, match="runs with 2 and 3 processes"):
        sharded.read_shards(shards_dir)


def cli(command: str, code: int = 0) -> str:
    result = runner.invoke(app, shlex.split(command), env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def test_cli_ranks_run_one_by_one_then_rank_0_merges(tmp_path, model_dirs, corpus_file, corpus, queries):
    base = f"index --data {corpus_file} --system {model_dirs['dense']} --output {tmp_path}/ix --no-progress"
    out = cli(f"{base} --rank 1 --world-size 2")
    assert "shard 2/2: encoded" in out and "indexed" not in out
    out = cli(f"{base} --rank 0 --world-size 2")
    assert "shard 1/2: encoded" in out and "indexed 300 documents from 2 shards" in out
    reference = single_process(model_dirs["dense"], "flat", corpus)
    assert top_ids(Retriever.load(tmp_path / "ix", device="cpu"), queries) == top_ids(reference, queries)

    assert "already holds an index" in cli(f"{base} --merge", code=2)
    assert "indexed 300 documents" in cli(f"{base} --merge --overwrite")
    assert "does not fit" in cli(f"{base} --merge --overwrite --index plaid", code=2)
    assert "needs a model" in cli(
        f"index --data {corpus_file} --system bm25 --output {tmp_path}/b --rank 0 --world-size 2", code=2
    )


def test_torchrun_two_processes_build_the_single_process_index(
    tmp_path, model_dirs, corpus_file, corpus, queries
):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mbert_retrieval.cli",
        "index",
        "--data",
        str(corpus_file),
        "--system",
        model_dirs["dense"],
        "--output",
        str(tmp_path / "ix"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "indexed 300 documents from 2 shards" in done.stdout
    reference = single_process(model_dirs["dense"], "flat", corpus)
    result = Retriever.load(tmp_path / "ix", device="cpu")
    assert top_ids(result, queries) == top_ids(reference, queries)
    np.testing.assert_array_equal(sorted(result.ids), sorted(reference.ids))
