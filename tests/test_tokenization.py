"""The tokenizer a fresh model is trained with, and the ids its config records."""

from __future__ import annotations

import os

from mbert_retrieval.tokenization import load_tokenizer, share_tokenizer_threads, special_token_ids


def test_special_token_ids_are_the_ones_a_sequence_is_framed_with(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = special_token_ids(tokenizer)
    framed = tokenizer("def parse(text): return text")["input_ids"]
    assert framed[0] == ids["cls_token_id"] == ids["bos_token_id"]
    assert framed[-1] == ids["sep_token_id"] == ids["eos_token_id"]
    assert ids["pad_token_id"] == tokenizer.pad_token_id
    assert len(set(ids.values())) == 3


def test_local_processes_share_the_cores_among_their_tokenizers(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("RAYON_NUM_THREADS", "0")  # recorded first, so the test leaves it as it was
    monkeypatch.delenv("RAYON_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    share_tokenizer_threads()
    assert "RAYON_NUM_THREADS" not in os.environ  # one process keeps a thread per core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    share_tokenizer_threads()
    assert os.environ["RAYON_NUM_THREADS"] == str(max(1, cores // 4))
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    share_tokenizer_threads()
    assert os.environ["RAYON_NUM_THREADS"] == "7"  # the user's setting stands
