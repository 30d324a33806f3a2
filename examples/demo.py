"""End-to-end demo: build a small ModernBERT, save it in the Hugging Face format, reload it,
and encode real Python source files from the standard library with the unpadded encoder."""

from __future__ import annotations

import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from mbert_retrieval import ModernBert, ModernBertConfig, load_tokenizer
from mbert_retrieval.tokenization import train_tokenizer


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:300]
    texts = [f.read_text(errors="ignore") for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(texts, vocab_size=4096, save_directory=tmp)
        config = ModernBertConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=384,
            num_hidden_layers=6,
            num_attention_heads=4,
            max_position_embeddings=1024,
            pad_token_id=2,
            cls_token_id=0,
            sep_token_id=1,
            bos_token_id=0,
            eos_token_id=1,
        )
        ModernBert(config).save_pretrained(tmp)
        model = ModernBert.from_pretrained(tmp)
        tokenizer = load_tokenizer(tmp)
    batch = tokenizer(texts[:64], truncation=True, max_length=512, padding=True, return_tensors="pt")
    start = time.perf_counter()
    with torch.inference_mode():
        hidden = model(batch["input_ids"], batch["attention_mask"])
    seconds = time.perf_counter() - start
    tokens = int(batch["attention_mask"].sum())
    print(
        f"encoded {len(hidden)} files, {tokens} real tokens in {seconds:.2f}s ({tokens / seconds:,.0f} tok/s)"
    )
    for file, mask, states in list(zip(files, batch["attention_mask"], hidden))[:5]:
        length = int(mask.sum())
        print(f"  {file.name:24s} {length:4d} tokens  mean |h| = {states[:length].abs().mean():.3f}")


if __name__ == "__main__":
    main()
