"""Cross-device negatives and GradCache give the gradients of the plain, single-process batch.

DDP: two gloo processes under DistributedDataParallel, each with its share of a global batch and
all ranks' documents all-gathered, sum to the same loss and gradients as one process on the whole
batch, also when each runs its share in GradCache chunks or accumulates batches. GradCache: a batch
run in small chunks gives the same gradients as the batch run at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

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


def build_mlm(model_dir: Path):
    model = ModernBertForMaskedLM.from_pretrained(model_dir).train()
    task = MLMTask(model, load_tokenizer(model_dir), max_length=64)
    texts = [e.documents[0] * 3 for e in examples()]
    return task, next(task.batches(texts, batch_tokens=lambda b: 256, seed=0, start=DataPosition()))


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CHUNKS = (None, 60)  # the whole share at once, and GradCache chunks (a different count per rank)


def ddp_worker(rank: int, world: int, init_file: str, model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        runs = [(name, chunk_tokens) for name in TASKS for chunk_tokens in CHUNKS] + [("mlm", 70)]
        for name, chunk_tokens in runs:
            if name == "mlm":
                task, batch = build_mlm(Path(model_dir))
            else:
                task = build_task(name, Path(model_dir))
                task.model.train()
                batch = global_batch(task)
            sync = GradientSync.wrap(task.model)
            assert isinstance(sync.ddp, DistributedDataParallel)
            loss = task.step(batch.shard(rank, world), chunk_tokens, sync)
            total = all_reduce_sum(loss)
            if rank == 0:
                result = {"loss": total, "grads": gradients(task.model)}
                torch.save(result, Path(out_dir) / f"{name}-{chunk_tokens}.pt")
            sync.release()  # before the group goes: else a possible hang at exit (GradientSync.release)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(hf_mlm_dir, tmp_path):
    """DDP with cross-device negatives, whole or with GradCache, gives the single-process gradients."""
    mp.spawn(
        ddp_worker, args=(2, str(tmp_path / "init"), str(hf_mlm_dir), str(tmp_path)), nprocs=2, join=True
    )
    for name in (*TASKS, "mlm"):
        if name == "mlm":
            task, batch = build_mlm(hf_mlm_dir)
        else:
            task = build_task(name, hf_mlm_dir)
            task.model.train()
            batch = global_batch(task)
        loss = task.step(batch)
        expected = gradients(task.model)
        for chunk_tokens in (70,) if name == "mlm" else CHUNKS:
            run = f"{name}, chunk_tokens={chunk_tokens}"
            shared = torch.load(tmp_path / f"{name}-{chunk_tokens}.pt")
            torch.testing.assert_close(shared["loss"], loss, rtol=1e-5, atol=1e-6, msg=run)
            assert shared["grads"].keys() == expected.keys()
            for param, grad in expected.items():
                torch.testing.assert_close(
                    shared["grads"][param], grad, rtol=1e-4, atol=1e-6, msg=f"{run}: {param}"
                )


def test_a_single_process_trains_without_ddp(hf_mlm_dir):
    task = build_task("dense", hf_mlm_dir)
    assert GradientSync.wrap(task.model).ddp is None


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
    task, batch = build_mlm(hf_mlm_dir)
    model = task.model
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


TRAINER_RUNS = {  # TrainingArguments beyond the common ones
    "plain": {},
    "accumulated-gradcache": {"gradient_accumulation_steps": 2, "chunk_tokens": 60},
}
RESUMED = "plain/checkpoints/step-00000002"  # the plain run again, from its checkpoint at step 2


def trainer_run(model_dir: Path, data: Path, output_dir: Path, **settings):
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
        **settings,
    )
    trainer = Trainer(task, JsonlExamples(data), args)
    return trainer.train(), trainer


def trainer_worker(rank: int, world: int, port: int, model_dir: str, data: str, out_dir: str) -> None:
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    wrapped = []  # per wrap: did the model train inside DistributedDataParallel?
    original_wrap = GradientSync.wrap

    def recording_wrap(model):
        sync = original_wrap(model)
        wrapped.append(isinstance(sync.ddp, DistributedDataParallel) and sync.ddp.module.model is model)
        return sync

    GradientSync.wrap = staticmethod(recording_wrap)
    try:
        for name, settings in TRAINER_RUNS.items():
            result, trainer = trainer_run(Path(model_dir), Path(data), Path(out_dir) / name, **settings)
            assert wrapped.pop() is True
            assert trainer.gradient_sync.ddp is None  # released before the process group goes
            if rank == 0:
                state = {"losses": result.losses, "weights": trainer.task.model.state_dict()}
                torch.save(state, Path(out_dir) / f"{name}.pt")
        resume_from = str(Path(out_dir) / RESUMED)
        resumed, trainer = trainer_run(
            Path(model_dir), Path(data), Path(out_dir) / "plain", resume_from=resume_from
        )
        if rank == 0:
            state = {"losses": resumed.losses, "weights": trainer.task.model.state_dict()}
            torch.save(state, Path(out_dir) / "resumed.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_trainer_under_two_processes_follows_the_single_process_run(hf_mlm_dir, tmp_path):
    """Same losses and weights after three optimizer steps, plain and with two accumulated batches
    run in GradCache chunks; checkpoints hold every rank's random state, and resuming one under two
    processes finishes the run as if uninterrupted."""
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
    for name, settings in TRAINER_RUNS.items():
        single, trainer = trainer_run(hf_mlm_dir, data, tmp_path / f"single-{name}", **settings)
        assert trainer.gradient_sync.ddp is None
        shared = torch.load(tmp_path / f"{name}.pt")
        torch.testing.assert_close(torch.tensor(shared["losses"]), torch.tensor(single.losses), msg=name)
        for param, value in trainer.task.model.state_dict().items():
            torch.testing.assert_close(
                shared["weights"][param], value, rtol=0, atol=1e-4, msg=f"{name}: {param}"
            )
    plain, resumed = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "resumed.pt")
    torch.testing.assert_close(resumed["losses"], plain["losses"][2:])
    torch.testing.assert_close(resumed["weights"], plain["weights"])
    assert sorted(p.name for p in (tmp_path / "plain" / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]
    assert (tmp_path / "plain" / "checkpoints" / "step-00000002" / "rng-rank1.pt").exists()


@pytest.mark.slow
def test_torchrun_trains_from_the_command_line_like_one_process(hf_mlm_dir, tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m mbert_retrieval.cli train dense ...` (gloo on
    the CPU, c10d rendezvous) logs the losses of the same command run in one process, with tokens/s,
    and saves the same final model."""
    import json
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    import mbert_retrieval
    from mbert_retrieval.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"query": e.query, "positive": e.documents[0]}) + "\n" for e in examples())
    )
    command = ["train", "dense", str(hf_mlm_dir), str(data), "--max-steps", "2", "--batch-size", "4"]
    command += ["--lr", "1e-3", "--logging-steps", "1", "--device", "cpu", "--max-length", "40"]
    repo = str(Path(mbert_retrieval.__file__).parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    launched = subprocess.run(
        [*torchrun, "-m", "mbert_retrieval.cli", *command, "-o", str(tmp_path / "ddp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = CliRunner().invoke(app, [*command, "-o", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output

    def records(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    assert [r["step"] for r in records("ddp")] == [1, 2]
    assert all(r["tokens_per_second"] > 0 for r in records("ddp"))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in records("ddp")]),
        torch.tensor([r["loss"] for r in records("single")]),
    )
    ddp_model = DenseRetriever.from_pretrained(tmp_path / "ddp" / "final", device="cpu")
    single_model = DenseRetriever.from_pretrained(tmp_path / "single" / "final", device="cpu")
    for (name, value), other in zip(ddp_model.state_dict().items(), single_model.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-4, msg=name)
