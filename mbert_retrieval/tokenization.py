"""Tokenizer loading: the fast tokenizer saved beside a ModernBERT checkpoint."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mbert_retrieval.modeling.io import CheckpointError, read_json, resolve_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a local folder or hub id (ModernBERT ships a BPE `tokenizer.json`)."""
    share_tokenizer_threads()
    model_dir = resolve_model_dir(path_or_hub_id)
    present = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).exists()]
    if not present:
        raise CheckpointError(f"{model_dir} has no tokenizer (expected {' or '.join(TOKENIZER_FILES)})")
    for path in present:
        read_json(path)  # a clear error for a damaged file before transformers reads it
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # tokenizers and transformers raise many types for a bad file
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise CheckpointError(f"{present[0]} cannot be loaded as a tokenizer ({reason})") from err
    if not tokenizer.is_fast:
        raise CheckpointError(f"{model_dir}: only fast (tokenizers) tokenizers are supported")
    return tokenizer


def share_tokenizer_threads() -> None:
    """Under torchrun with several processes on this machine, cap each one's tokenizer threads at
    half its share of the cores (unless RAYON_NUM_THREADS is set). Every tokenizer otherwise starts
    a thread per core: the processes' tokenizers then take the cores from the threads that launch
    GPU work, which a step of a small per-GPU batch waits on. Takes effect before the first
    tokenization of the process, which starts the thread pool."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if processes > 1 and "RAYON_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["RAYON_NUM_THREADS"] = str(max(1, cores // processes // 2))


SPECIAL_TOKENS = {
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
    "unk_token": "[UNK]",
}


def train_tokenizer(
    texts, vocab_size: int, save_directory: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ModernBERT's special tokens on an iterable of texts.

    Single texts become `[CLS] text [SEP]`, pairs `[CLS] a [SEP] b [SEP]`, as ModernBERT expects.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=8192, **SPECIAL_TOKENS)
    if save_directory is not None:
        fast.save_pretrained(str(save_directory))
    return fast


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The special token ids a ModernBERT config records, for a tokenizer made by `train_tokenizer`:
    ModernBERT begins a sequence with [CLS] and ends it with [SEP]."""
    cls_id, sep_id, pad_id = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]"])
    return {
        "pad_token_id": pad_id,
        "cls_token_id": cls_id,
        "sep_token_id": sep_id,
        "bos_token_id": cls_id,
        "eos_token_id": sep_id,
    }
