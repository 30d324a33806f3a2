"""Cross-device negatives and GradCache give the gradients of the plain, single-process batch.

DDP: two gloo processes, each with its share of a global batch and all ranks' documents
all-gathered, sum to the same loss and gradients as one process on the whole batch. GradCache:
a batch run in small chunks gives the same gradients as the batch run at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mbert_retrieval.modeling import ModernBertForMaskedLM
from mbert_retrieval.models.colbert import ColBERT
from mbert_retrieval.models.cross_encoder import CrossEncoder
from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.tokenization import load_tokenizer
from mbert_retrieval.training.batching import DataPosition, collate
from mbert_retrieval.training.data import Example
from mbert_retrieval.training.distributed import GradientSync, all_reduce_sum
from mbert_retrieval.training.mlm import MLMTask
from mbert_retrieval.training.tasks import ColBERTTask, CrossEncoderTask, DenseTask

VERBS = ["sort", "reverse", "merge", "split", "parse", "encode", "hash"]
NOUNS = ["list", "string", "dictionary", "path", "header", "number", "table"]


def examples() -> list[Example]:
    """Seven examples with one to three hard negatives each (uneven shares across ranks)."""
    out = []
    for i, (verb, noun) in enumerate(zip(VERBS, NOUNS)):
        positive = f"def {verb}_{noun}(value):\n    return {verb}(value) if value else None"
        negatives = [
            f"def {VERBS[(i + k) % 7]}_{NOUNS[(i + 2 * k) % 7]}(x): pass" for k in range(1, 2 + i % 3)
        ]
        out.append(
            Example(
                f"how do I {verb} a {noun}",
                [positive, *negatives],
                [1.0, *[-k for k in range(len(negatives))]],
            )
        )
    return out


TASKS = ("dense", "colbert", "colbert-kd", "cross-encoder")


def build_task(name: str, model_dir: Path):
    torch.manual_seed(0)  # the new heads start alike in every process
    settings = dict(device="cpu", dtype=torch.float32)
    if name == "dense":
        model = DenseRetriever.from_pretrained(model_dir, max_length=40, **settings)
        return DenseTask(model, symmetric=True, matryoshka_dims=[16])
    if name == "colbert":
        return ColBERTTask(
            ColBERT.from_pretrained(model_dir, query_length=12, document_length=32, **settings)
        )
    if name == "colbert-kd":
        model = ColBERT.from_pretrained(model_dir, query_length=12, **settings)
        return ColBERTTask(model, loss="distillation")
    model = CrossEncoder.from_pretrained(model_dir, max_length=48, **settings)
    return CrossEncoderTask(model, loss="listwise")


def global_batch(task):
    config = task.model.encoder.config
    return collate(
        task.tokenize(examples()), config.vocab_size, config.max_position_embeddings, DataPosition()
    )


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def ddp_worker(rank: int, world: int, init_file: str, model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in TASKS:
            task = build_task(name, Path(model_dir))
            task.model.train()
            loss = task.step(global_batch(task).shard(rank, world), sync=GradientSync.wrap(task.model))
            total = all_reduce_sum(loss)
            if rank == 0:
                torch.save({"loss": total, "grads": gradients(task.model)}, Path(out_dir) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(hf_mlm_dir, tmp_path):
    mp.spawn(
        ddp_worker, args=(2, str(tmp_path / "init"), str(hf_mlm_dir), str(tmp_path)), nprocs=2, join=True
    )
    for name in TASKS:
        task = build_task(name, hf_mlm_dir)
        task.model.train()
        loss = task.step(global_batch(task))
        shared = torch.load(tmp_path / f"{name}.pt")
        torch.testing.assert_close(shared["loss"], loss, rtol=1e-5, atol=1e-6, msg=name)
        expected = gradients(task.model)
        assert shared["grads"].keys() == expected.keys()
        for param, grad in expected.items():
            torch.testing.assert_close(
                shared["grads"][param], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {param}"
            )


@pytest.mark.parametrize("name", TASKS)
def test_gradcache_matches_the_whole_batch(hf_mlm_dir, name):
    task = build_task(name, hf_mlm_dir)
    task.model.train()
    batch = global_batch(task)
    whole_loss = task.step(batch)
    whole = gradients(task.model)
    task.model.zero_grad(set_to_none=True)
    chunks = batch.documents.chunks(60)
    assert len(chunks) > 2  # the documents really are split
    cached_loss = task.step(batch, chunk_tokens=60)
    torch.testing.assert_close(cached_loss, whole_loss)
    for param, grad in gradients(task.model).items():
        torch.testing.assert_close(grad, whole[param], rtol=1e-4, atol=1e-6, msg=param)


def test_mlm_chunks_match_the_whole_batch(hf_mlm_dir):
    model = ModernBertForMaskedLM.from_pretrained(hf_mlm_dir).train()
    task = MLMTask(model, load_tokenizer(hf_mlm_dir), max_length=64)
    texts = [e.documents[0] * 3 for e in examples()]
    batch = next(task.batches(texts, batch_tokens=lambda b: 256, seed=0, start=DataPosition()))
    whole_loss = task.step(batch)
    whole = gradients(model)
    model.zero_grad(set_to_none=True)
    chunked_loss = task.step(batch, chunk_tokens=70)
    torch.testing.assert_close(chunked_loss, whole_loss)
    for param, grad in gradients(model).items():
        torch.testing.assert_close(grad, whole[param], rtol=1e-4, atol=1e-6, msg=param)


def test_gradient_checkpointing_gives_the_same_gradients(hf_mlm_dir):
    task = build_task("dense", hf_mlm_dir)
    task.model.train()
    batch = global_batch(task)
    plain_loss = task.step(batch)
    plain = gradients(task.model)
    task.model.zero_grad(set_to_none=True)
    task.model.encoder.gradient_checkpointing = True
    torch.testing.assert_close(task.step(batch), plain_loss)
    for param, grad in gradients(task.model).items():
        torch.testing.assert_close(grad, plain[param], rtol=1e-5, atol=1e-7, msg=param)


def trainer_run(model_dir: Path, data: Path, output_dir: Path):
    from mbert_retrieval.training.data import JsonlExamples
    from mbert_retrieval.training.trainer import Trainer, TrainingArguments

    task = build_task("dense", model_dir)
    args = TrainingArguments(
        str(output_dir),
        max_steps=3,
        batch_size=5,
        learning_rate=1e-3,
        save_steps=2,
        show_progress=False,
        device="cpu",
    )
    return Trainer(task, JsonlExamples(data), args).train()


def trainer_worker(rank: int, world: int, port: int, model_dir: str, data: str, out_dir: str) -> None:
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = trainer_run(Path(model_dir), Path(data), Path(out_dir) / "ddp")
        if rank == 0:
            torch.save(result.losses, Path(out_dir) / "ddp_losses.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_trainer_under_two_processes_follows_the_single_process_run(hf_mlm_dir, tmp_path):
    import json
    import socket

    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"query": e.query, "positive": e.documents[0]}) + "\n" for e in examples())
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(trainer_worker, args=(2, port, str(hf_mlm_dir), str(data), str(tmp_path)), nprocs=2, join=True)
    single = trainer_run(hf_mlm_dir, data, tmp_path / "single")
    torch.testing.assert_close(
        torch.tensor(torch.load(tmp_path / "ddp_losses.pt")), torch.tensor(single.losses)
    )
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000002" / "rng-rank1.pt").exists()
