"""The tokenizer a fresh model is trained with, and the ids its config records."""

from __future__ import annotations

from mbert_retrieval.tokenization import load_tokenizer, special_token_ids


def test_special_token_ids_are_the_ones_a_sequence_is_framed_with(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = special_token_ids(tokenizer)
    framed = tokenizer("def parse(text): return text")["input_ids"]
    assert framed[0] == ids["cls_token_id"] == ids["bos_token_id"]
    assert framed[-1] == ids["sep_token_id"] == ids["eos_token_id"]
    assert ids["pad_token_id"] == tokenizer.pad_token_id
    assert len(set(ids.values())) == 3
