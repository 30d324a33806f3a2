"""The training loop shared by every head.

    task = DenseTask(DenseRetriever.from_pretrained("path/to/base"), temperature=0.05)
    result = Trainer(task, JsonlExamples("train.jsonl"), TrainingArguments("runs/dense", max_steps=1000)).train()

Per optimizer step: `gradient_accumulation_steps` global batches; each rank takes its share of
each, runs forward + backward (bf16 autocast on CUDA, GradCache when `chunk_tokens` is set);
under torchrun DistributedDataParallel sums gradients over ranks during the last backward of the
step (the others accumulate locally); gradients are clipped, and the optimizer steps at the
learning rate of the warmup-stable-decay schedule. Losses and tokens/s go to `metrics.jsonl` (and
TensorBoard), the dev metric every `eval_steps`, checkpoints every `save_steps`, and the final
model to `output_dir/final` in its ecosystem's folder format. `resume_from` continues a run exactly as if never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from mbert_retrieval.files import atomic_write_text
from mbert_retrieval.training import checkpoint
from mbert_retrieval.training.arguments import TrainingArguments
from mbert_retrieval.training.batching import DataPosition, prefetch
from mbert_retrieval.training.distributed import (
    GradientSync,
    World,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from mbert_retrieval.training.evaluate import DevSet, evaluate_task
from mbert_retrieval.training.optim import WarmupStableDecay, make_optimizer
from mbert_retrieval.training.profiling import section, step_profiler

logger = logging.getLogger("mbert_retrieval")
LOSS_CHECK_STEPS = 50  # losses are read (and checked) at least this often, besides logging steps


@dataclass
class TrainingResult:
    steps: int
    losses: list[float]  # one per optimizer step run in this call
    dev_metrics: list[dict] = field(default_factory=list)
    final_model: Path | None = None


def _steps(value: float, total: int) -> int:
    return int(round(value * total)) if value < 1 else int(value)


class MetricsLog:
    """metrics.jsonl (one JSON object per record) and, optionally, TensorBoard scalars."""

    def __init__(self, output_dir: Path, tensorboard: bool, resumed_step: int):
        self.path = output_dir / "metrics.jsonl"
        if resumed_step and self.path.exists():  # drop records from after the checkpoint
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if json.loads(line)["step"] <= resumed_step
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("tensorboard=True needs `pip install tensorboard`") from err
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TrainingTask(Protocol):
    """What the trainer asks of a task (`RetrievalTask` heads, `MLMTask`): the model, its batches,
    one forward and backward, and saving. The task decides everything that differs between them."""

    model: torch.nn.Module
    ranks_documents: bool  # whether a dev set can score it

    @property
    def encoder(self) -> torch.nn.Module: ...

    def batches_per_epoch(self, data, args: TrainingArguments) -> float | None: ...

    def training_batches(self, data, args: TrainingArguments, start: DataPosition) -> Iterator: ...

    def step(
        self, batch, chunk_tokens: int | None = None, sync: GradientSync | None = None
    ) -> torch.Tensor: ...

    def save(self, directory) -> None: ...


@dataclass
class _Run:
    """A run in progress: what it trains and where it stands."""

    model: torch.nn.Module
    sync: GradientSync  # runs the model's passes: through DDP under torchrun
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: WarmupStableDecay
    total: int  # optimizer steps
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0
    window_tokens: int = 0  # tokens since the previous metrics record
    window_start: float = 0.0  # when the window began (time.perf_counter)
    pending_losses: list[torch.Tensor] = field(default_factory=list)  # on the device, not yet read

    def due(self, every: int | None) -> bool:
        """Whether a periodic action (logging, evaluation, checkpoint) falls on this step."""
        return bool(every) and (self.step % every == 0 or self.step == self.total)


def compile_options(device: torch.device) -> dict:
    """inductor's options for the whole-forward graph. On CUDA its kernels are launched from the C++
    that inductor generates, not from Python: a short step (16k tokens) ran 19% faster so on one
    H200 (benchmarks/NOTES.md, run 24). That needs a C++ compiler to build the launcher; without one
    the graph launches from Python, with a warning, rather than failing."""
    if device.type != "cuda":
        return {}
    if not cpp_compiler_available():
        logger.warning(
            "no C++ compiler found (g++, or the one CXX names): the compiled graph launches its "
            "kernels from Python, which makes short training steps slower"
        )
        return {}
    return {"cpp_wrapper": True}


def cpp_compiler_available() -> bool:
    """Whether inductor finds the C++ compiler it would build a C++ launcher with."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (ImportError, RuntimeError, OSError):
        return False
    return True


class Trainer:
    """Trains `task.model` on `data` (an ExampleSource for retrieval, a TextCorpus for MLM)."""

    def __init__(self, task: TrainingTask, data, args: TrainingArguments, dev: DevSet | None = None):
        if dev is not None and not task.ranks_documents:
            raise ValueError(f"a dev set ranks documents; {type(task).__name__} does not rank")
        self.task, self.data, self.args, self.dev = task, data, args, dev
        self.output_dir = Path(args.output_dir)
        self.world = World()
        self.device = torch.device("cpu")
        self.gradient_sync = GradientSync()

    # -- setup -------------------------------------------------------------------------------------

    def total_steps(self) -> int:
        args = self.args
        if args.max_steps is not None:
            return args.max_steps
        per_epoch = self.task.batches_per_epoch(self.data, args)
        if per_epoch is None:
            raise ValueError("give max_steps: the number of batches per epoch is not known in advance")
        return max(1, math.ceil(args.epochs * per_epoch / args.gradient_accumulation_steps))

    def schedule(self, total: int) -> WarmupStableDecay:
        args = self.args
        warmup = _steps(args.warmup_steps, total)
        decay = total - warmup if args.decay_steps is None else _steps(args.decay_steps, total)
        return WarmupStableDecay(args.learning_rate, total, warmup, decay, args.decay, args.min_lr)

    def _prepare_model(self) -> torch.nn.Module:
        model = self.task.model.to(self.device)
        model.train()
        self.task.encoder.gradient_checkpointing = self.args.gradient_checkpointing
        if self.args.compile and (self.world.distributed or self.args.gradient_checkpointing):
            # Under DDP, dynamo would cut each compiled layer at DDP's bucket boundaries (its
            # "DDPOptimizer", made for one graph of a whole model): two graphs and more host work per
            # layer for nothing, as per-layer graphs already let communication overlap the backward.
            torch._dynamo.config.optimize_ddp = False
            self.task.encoder.compile_layers()
        elif self.args.compile:  # one process: one graph for the whole encoder, the least host work
            self.task.encoder.compile_forward(options=compile_options(self.device))
        return model

    def _start(self) -> _Run:
        """Processes, seeds, the model on its device, the optimizer and its schedule; resumes."""
        args = self.args
        self.world, self.device = init_distributed(args.device)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        model = self._prepare_model()
        self.gradient_sync = GradientSync.wrap(model)  # DDP: every rank starts from rank 0's weights
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(model, args.optimizer, args.learning_rate, args.weight_decay)
        total = self.total_steps()
        run = _Run(model, self.gradient_sync, parameters, optimizer, self.schedule(total), total)
        if args.resume_from:
            path = checkpoint.resolve_checkpoint(args.resume_from, self.output_dir / "checkpoints")
            state = checkpoint.load_checkpoint(path, model, optimizer, self.world)
            run.step, run.tokens_seen = state["step"], state["tokens_seen"]
            run.position = DataPosition.from_dict(state["position"])
            logger.info("resumed from %s at step %d", path, run.step)
        return run

    def _open_log(self, step: int) -> MetricsLog | None:
        """The metrics log (with the run's arguments beside it) on the main process; None elsewhere."""
        if not self.world.is_main:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.output_dir / "training_args.json", json.dumps(asdict(self.args), indent=2) + "\n"
        )
        log = MetricsLog(self.output_dir, self.args.tensorboard, step)
        if hasattr(self.data, "log_report"):
            self.data.log_report()
        return log

    def _autocast(self):
        bf16 = self.args.bf16 if self.args.bf16 is not None else self.device.type == "cuda"
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- the loop ----------------------------------------------------------------------------------

    def train(self) -> TrainingResult:
        args = self.args
        run = self._start()
        result = TrainingResult(steps=run.step, losses=[])
        log = self._open_log(run.step)
        batches = prefetch(iter(self.task.training_batches(self.data, args, run.position)))
        progress = tqdm(
            total=run.total,
            initial=run.step,
            desc="training",
            unit="step",
            disable=not (args.show_progress and self.world.is_main),
        )
        started = run.window_start = time.perf_counter()
        try:
            with step_profiler(self.world.rank, self.device.type == "cuda") as profiled:
                self._loop(run, result, log, batches, progress, started, profiled)
        finally:
            progress.close()
            batches.close()
            if log is not None:
                log.close()
        return self._finish(run, result)

    def _loop(self, run: _Run, result, log, batches, progress, started: float, profiled) -> None:
        args = self.args
        while run.step < run.total and not self._out_of_time(started):
            lr = run.schedule(run.step)
            loss, grad_norm = self._optimizer_step(run, batches, lr)
            run.pending_losses.append(loss)
            progress.update(1)
            log_now = log is not None and run.due(args.logging_steps)
            if log_now or run.due(LOSS_CHECK_STEPS):  # due() includes the last step
                loss_value = self._read_losses(run, result)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if log_now:
                norm = None if grad_norm is None else float(grad_norm)
                self._log_step(log, run, loss_value, lr, norm)
            if self.dev is not None and run.due(args.eval_steps):
                self._evaluate_step(run, result, log)
            if run.due(args.save_steps):
                self._save_checkpoint(run)
            profiled.step()
        if run.pending_losses:  # stopped early, at the time limit
            self._read_losses(run, result)

    def _read_losses(self, run: _Run, result: TrainingResult) -> float:
        """Bring the losses of the steps since the last read to the host (one wait for the device),
        check them, and return the latest."""
        values = torch.stack(run.pending_losses).tolist()
        start = run.step - len(values) + 1
        run.pending_losses.clear()
        for step, value in enumerate(values, start):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the loss is {value} at step {step}; lower the learning rate or check the data"
                )
        result.losses.extend(values)
        return values[-1]

    def _optimizer_step(
        self, run: _Run, batches: Iterator, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward over `gradient_accumulation_steps` global batches, then one optimizer
        step at `lr`; returns the loss (averaged over the batches and summed over ranks) and the
        gradient norm, both still on the device: reading them makes the host wait, so the loop reads
        them only every few steps."""
        args = self.args
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss = torch.zeros((), device=self.device)
        for number in range(args.gradient_accumulation_steps):
            with section("data"):  # waiting for the prefetch thread, then the copy to the device
                batch = next(batches)
                local = batch.shard(self.world.rank, self.world.size).to(self.device)
            last = number == args.gradient_accumulation_steps - 1
            with self._autocast(), run.sync.all_reduce_if(last):
                loss += self.task.step(local, args.chunk_tokens, run.sync)
            run.window_tokens += batch.num_tokens
            run.position = batch.position
        with section("optimizer"):
            grad_norm = self._finish_gradients(run.parameters)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        with section("loss_sync"):
            loss = all_reduce_sum(loss) / args.gradient_accumulation_steps
        return loss, grad_norm

    def _log_step(self, log: MetricsLog, run: _Run, loss: float, lr: float, grad_norm: float | None) -> None:
        elapsed = time.perf_counter() - run.window_start
        run.tokens_seen += run.window_tokens
        record = {
            "step": run.step,
            "loss": loss,
            "lr": lr,
            "epoch": run.position.epoch,
            "seconds": elapsed,  # since the previous record
            "tokens_per_second": run.window_tokens / max(elapsed, 1e-9),
            "tokens_seen": run.tokens_seen,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if self.args.compile:  # graphs compiled so far (on this rank): a rise after warm-up is a recompile
            record["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        log.write(record)
        run.window_start, run.window_tokens = time.perf_counter(), 0

    def _evaluate_step(self, run: _Run, result: TrainingResult, log: MetricsLog | None) -> None:
        metrics = self.evaluate(run.model)
        if metrics is not None:  # the main process
            result.dev_metrics.append({"step": run.step, **metrics})
            log.write({"step": run.step, **{f"dev_{k}": v for k, v in metrics.items()}})

    def _save_checkpoint(self, run: _Run) -> None:
        trainer_state = {
            "step": run.step,
            "position": run.position.to_dict(),
            "tokens_seen": run.tokens_seen,
            "seed": self.args.seed,
            "world_size": self.world.size,
        }
        checkpoint.save_checkpoint(
            self.output_dir / "checkpoints",
            run.step,
            run.model,
            run.optimizer,
            trainer_state,
            self.world,
            self.args.keep_checkpoints,
        )

    def _finish(self, run: _Run, result: TrainingResult) -> TrainingResult:
        """Save the final model (main process) once every process is done."""
        result.steps = run.step
        if self.world.is_main and self.args.save_final_model:
            result.final_model = self.output_dir / "final"
            run.model.eval()
            self.task.save(result.final_model)
        barrier()
        self.gradient_sync.release()
        return result

    def _out_of_time(self, started: float) -> bool:
        """Past `max_time` (on any rank: all stop together)."""
        if self.args.max_time is None:
            return False
        late = time.perf_counter() - started > self.args.max_time
        if late and self.world.is_main:
            logger.warning("stopping at the time limit of %.0f s", self.args.max_time)
        return bool(all_reduce_max(int(late), self.device))

    def _finish_gradients(self, parameters) -> torch.Tensor | None:
        """Average over accumulated batches (DDP has summed them over ranks), clip; returns the
        norm (on the device) when clipping."""
        if self.args.gradient_accumulation_steps > 1:
            for param in parameters:
                if param.grad is not None:
                    param.grad.div_(self.args.gradient_accumulation_steps)
        if self.args.max_grad_norm is None:
            return None
        return torch.nn.utils.clip_grad_norm_(parameters, self.args.max_grad_norm)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None:
        """The dev metric on rank 0 (None on the other ranks, which wait for it)."""
        metrics = None
        if self.world.is_main:
            model.eval()
            with self._autocast():
                metrics = evaluate_task(self.task, self.dev)
            model.train()
        barrier()
        return metrics
