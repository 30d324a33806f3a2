"""The tokenizer a fresh model is trained with, and the ids its config records."""

from __future__ import annotations

import ast
import os

import pytest
from conftest import stdlib_definitions

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


def real_code() -> list[str]:
    """Functions and classes of the stdlib of every size (many past 256 tokens), unicode included."""
    modules = ("json/decoder.py", "textwrap.py", "difflib.py")
    definitions = stdlib_definitions(modules, (ast.FunctionDef, ast.ClassDef))
    return ["", "x", "naïve café ∑ → 日本語 " * 40, *definitions]


@pytest.mark.parametrize("which", ["test", "shipped"])
def test_texts_cut_to_max_length_match_the_tokenizers_own_truncation(tokenizer_dir, which):
    """`TextTokenizer.encode` tokenizes each text once and cuts the ids itself: the same ids as the
    tokenizer's truncation (which tokenizes it again), for real code at several lengths, with the
    tests' tokenizer and the shipped model's."""
    from mbert_retrieval.models.dense import default_model_dir
    from mbert_retrieval.models.encoding import TextTokenizer

    folder = tokenizer_dir if which == "test" else default_model_dir()
    if folder is None:
        pytest.skip("no shipped model in this installation")
    text_tokenizer = TextTokenizer(load_tokenizer(folder))
    texts = real_code()
    for max_length in (3, 16, 128, 256):
        ids, cut = text_tokenizer.encode(texts, max_length)
        expected = text_tokenizer._encode_truncated(texts, max_length)
        assert [seq.tolist() for seq in ids] == [seq.tolist() for seq in expected], max_length
        assert cut == sum(len(seq) > max_length for seq in text_tokenizer.encode_whole(texts)) > 0
