"""Training data: bad records counted by reason, token-budget batches, sharding, MLM packing and
masking, and batches that resume from a data position."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mbert_retrieval.training.batching import (
    ContrastiveBatch,
    DataPosition,
    Sequences,
    Tokenized,
    collate,
    example_batches,
)
from mbert_retrieval.training.data import (
    BeirExamples,
    HFExamples,
    JsonlExamples,
    TextCorpus,
    TrainingDataError,
    load_examples,
)
from mbert_retrieval.training.mlm import IGNORE, mask_tokens, packed_documents


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_jsonl_bad_records_are_counted_by_reason(tmp_path):
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            {"query": "sort a list", "positive": "sorted(xs)", "negatives": ["len(xs)", "min(xs)"]},
            {"query": "reverse", "positive": "xs[::-1]"},
            {"query": "rank", "documents": ["a", "b"], "scores": [0.9, 0.1]},
            "{not json",
            "",
            {"positive": "no query"},
            {"query": "  ", "positive": "empty query"},
            {"query": "q", "positive": ""},
            {"query": "q", "positive": "p", "negatives": "n1"},  # one negative as a string is accepted
            {"query": "q", "positive": "p", "negatives": [1, 2]},
            {"query": "q", "documents": ["a", "b"], "scores": [1.0]},
            [1, 2],
        ],
    )
    source = JsonlExamples(path, num_negatives=1)
    assert len(source) == 4
    assert source.problems == Counter(
        {
            "lines that are not valid JSON": 1,
            "records without a 'query' string": 1,
            "records with an empty query": 1,
            "records with an empty positive": 1,
            "records whose 'negatives' is not a list of strings": 1,
            "records whose 'scores' do not give one number per document": 1,
            "records that are not JSON objects": 1,
        }
    )
    assert source[0].documents == ["sorted(xs)", "len(xs)"]  # capped at one negative
    assert source[1].negatives == []
    assert source[2].scores == [0.9, 0.1]
    assert source[3].documents == ["p", "n1"]
    assert "1 lines that are not valid JSON" in source.report()


def test_a_file_without_usable_records_is_an_error(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"query": "q"}, "nope"])
    with pytest.raises(TrainingDataError, match="no usable training record"):
        JsonlExamples(path)
    with pytest.raises(TrainingDataError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_beir_unknown_ids_and_empty_texts_are_counted(tmp_path):
    write_lines(
        tmp_path / "corpus.jsonl",
        [
            {"_id": "d1", "title": "", "text": "def add(a, b): return a + b"},
            {"_id": "d2", "title": "T", "text": "def sub(a, b): return a - b"},
            {"_id": "d3", "title": "", "text": ""},
            {"text": "no id"},
        ],
    )
    write_lines(
        tmp_path / "queries.jsonl",
        [{"_id": "q1", "text": "add numbers"}, {"_id": "q2", "text": "subtract"}, {"_id": "q3", "text": ""}],
    )
    (tmp_path / "qrels").mkdir()
    rows = ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2\t1", "q2\td1\t0", "q1\td3\t1", "q3\td1\t1"]
    rows += ["q9\td1\t1", "q1\td9\t1", "broken line"]
    (tmp_path / "qrels" / "train.tsv").write_text("\n".join(rows) + "\n")
    source = load_examples(tmp_path)
    assert isinstance(source, BeirExamples) and len(source) == 2
    assert source[1].query == "subtract" and source[1].documents == ["T def sub(a, b): return a - b"]
    assert source.problems == Counter(
        {
            "documents with empty text": 1,
            "corpus lines without an '_id'": 1,
            "queries with empty text": 1,
            "qrels naming an unknown or empty document": 2,
            "qrels naming an unknown or empty query": 2,
            "qrels lines that are not 'query-id, corpus-id, score'": 1,
        }
    )
    with pytest.raises(TrainingDataError, match="splits available: train"):
        BeirExamples(tmp_path, split="dev")


def test_hf_dataset_columns_and_bad_rows():
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {
            "anchor": ["sort a list", "", "reverse"],
            "positive": ["sorted(xs)", "x", "xs[::-1]"],
            "negative": ["len(xs)", "y", "min(xs)"],
        }
    )
    source = HFExamples(dataset, query_column="anchor", negative_columns=["negative"])
    assert len(source) == 2 and source.problems == Counter({"records with an empty query": 1})
    assert source[1].documents == ["xs[::-1]", "min(xs)"]
    with pytest.raises(TrainingDataError, match="no column"):
        HFExamples(dataset, query_column="question")


def test_text_corpus_counts_bad_lines(tmp_path):
    path = write_lines(
        tmp_path / "docs.jsonl", [{"text": "first"}, {"text": ""}, {"body": "x"}, {"text": "second"}]
    )
    corpus = TextCorpus(path)
    assert [corpus[i] for i in range(len(corpus))] == ["first", "second"]
    assert corpus.problems == Counter({"documents with empty text": 1, "lines without a 'text' string": 1})


# -- contrastive batches -----------------------------------------------------------------------------


class FakeSource(list):
    problems: Counter = Counter()
    name = "fake"


def fake_tokenize(examples):
    """Example i -> a query of (i % 3) + 2 tokens and two documents of (i % 5) + 3 tokens."""
    out = []
    for example in examples:
        i = int(example)
        out.append(Tokenized(np.full(i % 3 + 2, i), [np.full(i % 5 + 3, i), np.full(i % 5 + 3, 1000 + i)]))
    return out


def make_batch(tokenized, position):
    return collate(tokenized, vocab_size=2000, max_positions=64, position=position)


def take(source, count, start=DataPosition(), **budget):
    batches = example_batches(source, fake_tokenize, make_batch, seed=3, start=start, **budget)
    return [next(batches) for _ in range(count)]


def example_ids(batch: ContrastiveBatch) -> list[int]:
    starts = batch.queries.cu_seqlens[:-1].long()
    return batch.queries.input_ids[starts].tolist()


def test_token_budget_batches_cover_an_epoch_once():
    source = FakeSource(range(50))
    batches = example_batches(
        source, fake_tokenize, make_batch, seed=3, start=DataPosition(), max_tokens=60, batch_size=None
    )
    seen = []
    for batch in batches:
        assert batch.num_tokens <= 60
        seen.extend(example_ids(batch))
        if batch.position.epoch == 1:  # the epoch's last batch
            break
    assert sorted(seen) == list(range(50))
    capped = take(source, 3, max_tokens=10_000, batch_size=7)
    assert [b.num_examples for b in capped] == [7, 7, 7]


def test_resuming_from_a_position_gives_the_same_batches():
    source = FakeSource(range(40))
    straight = take(source, 9, max_tokens=50, batch_size=None)
    resumed = take(source, 4, start=straight[4].position, max_tokens=50, batch_size=None)
    for a, b in zip(straight[5:], resumed):
        assert torch.equal(a.documents.input_ids, b.documents.input_ids)
        assert a.position == b.position


def test_shards_put_together_are_the_global_batch():
    (batch,) = take(FakeSource(range(20)), 1, max_tokens=None, batch_size=7)
    shards = [batch.shard(rank, 3) for rank in range(3)]
    assert sum(s.num_examples for s in shards) == 7 and all(s.num_examples for s in shards)
    assert torch.equal(torch.cat([s.queries.input_ids for s in shards]), batch.queries.input_ids)
    assert torch.equal(torch.cat([s.documents.input_ids for s in shards]), batch.documents.input_ids)
    for shard in shards:
        assert shard.global_examples == 7 and shard.global_documents == 14
        positives = batch.documents.input_ids[
            batch.documents.cu_seqlens[shard.document_offset + shard.positives]
        ]
        assert positives.tolist() == example_ids(shard)


def example_tokens(batch) -> list[int]:
    return [
        int(
            batch.queries.lengths[i]
            + batch.documents.lengths[batch.doc_offsets[i] : batch.doc_offsets[i + 1]].sum()
        )
        for i in range(batch.num_examples)
    ]


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shards_hold_about_the_same_number_of_tokens(world):
    (batch,) = take(FakeSource(range(40)), 1, max_tokens=None, batch_size=23)
    shards = [batch.shard(rank, world) for rank in range(world)]
    sizes = [shard.num_tokens for shard in shards]
    assert sum(sizes) == batch.num_tokens
    assert max(sizes) - min(sizes) <= max(example_tokens(batch))  # within one example of even
    assert [s.example_offset for s in shards] == [
        sum(s.num_examples for s in shards[:r]) for r in range(world)
    ]


def test_every_rank_keeps_an_example_even_when_one_holds_most_tokens():
    source = FakeSource(range(6))

    def lopsided(examples):  # example 0 has 30 times the document tokens of the others
        return [Tokenized(np.full(2, int(e)), [np.full(60 if int(e) == 0 else 2, int(e))]) for e in examples]

    batch = next(
        example_batches(
            source, lopsided, make_batch, seed=3, start=DataPosition(), batch_size=6, max_tokens=None
        )
    )
    for world in (2, 3, 6):
        shards = [batch.shard(rank, world) for rank in range(world)]
        assert all(s.num_examples >= 1 for s in shards)
        assert sum(s.num_examples for s in shards) == 6
    with pytest.raises(ValueError, match="cannot be shared"):
        batch.shard(0, 7)


def test_sequence_chunks_respect_the_budget_and_keep_order():
    rng = np.random.default_rng(0)
    sequences = Sequences.from_arrays([rng.integers(0, 50, n) for n in [5, 9, 3, 12, 4, 4]], 50, 64)
    chunks = sequences.chunks(12)
    assert all(c.num_tokens <= 12 for c in chunks)
    assert torch.equal(torch.cat([c.input_ids for c in chunks]), sequences.input_ids)
    assert sum(len(c) for c in chunks) == len(sequences)


# -- MLM -----------------------------------------------------------------------------------------------


class FakeCorpus(list):
    pass


def encode_lengths(texts):
    """Document "n" -> n tokens, numbered so every token is traceable."""
    return [np.arange(int(t)) + 100 * int(t) for t in texts]


def test_mlm_packing_fills_every_batch_and_loses_no_token():
    corpus = FakeCorpus(str(n) for n in [7, 30, 3, 12, 50, 9, 1, 21])
    stream = packed_documents(
        corpus, encode_lengths, max_length=16, batch_tokens=lambda b: 32, seed=0, start=DataPosition()
    )
    tokens, batches = [], []
    while sum(len(t) for t in tokens) < sum(int(c) for c in corpus):
        pieces, position = next(stream)
        batches.append((pieces, position))
        assert sum(len(p) for p in pieces) == 32 and max(len(p) for p in pieces) <= 16
        tokens.extend(pieces)
    flat = np.concatenate(tokens)[: sum(int(c) for c in corpus)]
    assert sorted(flat.tolist()) == sorted(np.concatenate(encode_lengths(corpus)).tolist())
    # Resuming from any batch's position continues with the same pieces.
    for k in (0, 2, 3):
        resumed = packed_documents(
            corpus, encode_lengths, max_length=16, batch_tokens=lambda b: 32, seed=0, start=batches[k][1]
        )
        pieces, position = next(resumed)
        assert [p.tolist() for p in pieces] == [p.tolist() for p in batches[k + 1][0]]
        assert position == batches[k + 1][1]


def test_masking_rates_and_labels():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (200_000,), generator=generator)
    ids[::50] = 0  # a special token
    masked, labels = mask_tokens(ids, torch.tensor([0, 1, 2, 3]), 1000, 3, generator, 0.3)
    selected = labels != IGNORE
    assert not selected[ids == 0].any()
    assert selected.float().mean().item() == pytest.approx(0.3 * 0.98, abs=0.005)
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    became_mask = (masked[selected] == 3).float().mean().item()
    unchanged = (masked[selected] == ids[selected]).float().mean().item()
    assert became_mask == pytest.approx(0.8, abs=0.01)
    assert unchanged == pytest.approx(0.1 + 0.1 / 1000, abs=0.01)
    assert 1 - became_mask - unchanged == pytest.approx(0.1, abs=0.01)  # random tokens
