"""`mbert-retrieval train ...`: dense, colbert, cross-encoder, mlm, and mine (hard negatives).

Data is a BEIR folder (its train qrels), a JSONL file of examples, or `hf:<dataset>`; see
`mbert_retrieval.training.data`. Every run writes `metrics.jsonl`, checkpoints (with
`--save-steps`) and the final model to `<output-dir>/final`. Under `torchrun` each process takes
its share of every batch and DistributedDataParallel all-reduces the gradients (see `TORCHRUN_HELP`).

The options every command shares are declared once, as the fields of `RunOptions` (and
`ExampleOptions` for the heads that train on examples); `with_options` adds them to a command after
its own and hands them to it as one object, which builds the `TrainingArguments`.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mbert_retrieval.cli_errors import command_app, reports_errors

# Each line a paragraph: the help keeps line breaks.
TORCHRUN_HELP = "\n\n".join(
    [
        "Several GPUs: one process per GPU under torchrun; --batch-size and --max-tokens-per-batch "
        "stay global (all processes together); DistributedDataParallel all-reduces the gradients.",
        "One machine, 2 GPUs:",
        "torchrun --standalone --nproc-per-node 2 -m mbert_retrieval.cli train dense MODEL DATA -o runs/dense",
        "Two machines of 8 GPUs (the same command on each; HOST:29500 a free port on one of them, "
        "reachable from both):",
        "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
        "-m mbert_retrieval.cli train dense MODEL DATA -o runs/dense",
    ]
)

train_app = command_app(
    "Train dense, ColBERT and cross-encoder models, pretrain with MLM, mine hard negatives.\n\n"
    + TORCHRUN_HELP,
    name="train",
)


class Decay(str, Enum):
    one_minus_sqrt = "1-sqrt"
    linear = "linear"
    cosine = "cosine"
    none = "none"


class Optimizer(str, Enum):
    adamw = "adamw"
    stable_adamw = "stable_adamw"


class ColBERTLoss(str, Enum):
    contrastive = "contrastive"
    distillation = "distillation"


class RerankerLoss(str, Enum):
    bce = "bce"
    listwise = "listwise"


# -- options the training commands share, declared once ----------------------------------------------

Model = Annotated[str, typer.Argument(help="Checkpoint folder or hub id to start from.")]
Data = Annotated[str, typer.Argument(help="BEIR folder, JSONL of examples, or hf:<dataset>.")]
Device = Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: CUDA when available).")]


@dataclass
class RunOptions:
    """The options of every training command: where the run goes, the optimizer and its schedule,
    checkpoints, precision and the device."""

    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where metrics, checkpoints and the model go.")
    ] = Path("runs")
    max_time: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (then save as usual).")
    ] = None
    chunk_tokens: Annotated[
        int | None, typer.Option(help="GradCache: tokens per forward chunk of a large batch.")
    ] = None
    gradient_accumulation_steps: Annotated[
        int, typer.Option("--grad-accum", help="Batches per optimizer step.")
    ] = 1
    learning_rate: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-5
    warmup_steps: Annotated[
        float, typer.Option(help="Warmup steps (a fraction of all steps when below 1).")
    ] = 0.1
    decay: Annotated[Decay, typer.Option(help="Learning-rate decay after the stable stage.")] = Decay.linear
    decay_steps: Annotated[
        float | None, typer.Option(help="Decay steps or fraction (default: all after warmup).")
    ] = None
    optimizer: Annotated[Optimizer, typer.Option(help="adamw or stable_adamw.")] = Optimizer.adamw
    weight_decay: Annotated[float, typer.Option(help="Decoupled weight decay on weight matrices.")] = 0.01
    seed: Annotated[int, typer.Option(help="Seeds shuffling, masking and initialisation.")] = 42
    save_steps: Annotated[int | None, typer.Option(help="Write a checkpoint every this many steps.")] = None
    resume_from: Annotated[
        str | None, typer.Option(help="Checkpoint folder to resume from, or 'latest'.")
    ] = None
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: on CUDA).")
    ] = None
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in backward to save memory.")
    ] = False
    compile: Annotated[
        bool,
        typer.Option(
            help="torch.compile the encoder (CUDA): its whole forward as one graph in one process "
            "(kernels launched from C++), layer by layer under torchrun or with gradient checkpointing."
        ),
    ] = False
    tensorboard: Annotated[bool, typer.Option(help="Also log to TensorBoard.")] = False
    device: Device = None
    logging_steps: Annotated[int, typer.Option(help="Write metrics every this many steps.")] = 10

    def training_arguments(self, **more):
        """The trainer's arguments: the options that are `TrainingArguments` fields, and `more`."""
        from mbert_retrieval.training.arguments import TrainingArguments

        accepted = {f.name for f in fields(TrainingArguments)}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in accepted} | more
        values = {name: v.value if isinstance(v, Enum) else v for name, v in values.items()}
        return TrainingArguments(**values | {"output_dir": str(self.output_dir)})


@dataclass
class ExampleOptions(RunOptions):
    """The options of the commands that train on examples: how many, in what batches, and the dev set."""

    num_negatives: Annotated[
        int | None, typer.Option(help="Hard negatives kept per example (default: all).")
    ] = None
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default: --epochs over the data).")
    ] = None
    epochs: Annotated[float, typer.Option(help="Passes over the data when --max-steps is not given.")] = 1.0
    batch_size: Annotated[int | None, typer.Option(help="Examples per batch (all processes together).")] = 32
    max_tokens_per_batch: Annotated[
        int | None, typer.Option(help="Token budget per batch (all processes together).")
    ] = None
    dev: Annotated[
        Path | None, typer.Option(help="BEIR folder to compute nDCG@10 / MRR@10 on during training.")
    ] = None
    dev_split: Annotated[str, typer.Option(help="qrels split of --dev.")] = "dev"
    eval_steps: Annotated[int | None, typer.Option(help="Evaluate on --dev every this many steps.")] = None

    def examples(self, data: str):
        from mbert_retrieval.training.data import load_examples

        return load_examples(data, num_negatives=self.num_negatives)

    def dev_set(self):
        from mbert_retrieval.training.evaluate import DevSet

        return None if self.dev is None else DevSet.from_beir(self.dev, split=self.dev_split)


def with_options(options_type: type[RunOptions], **defaults):
    """Add the fields of `options_type` to a command's options, after its own, with `defaults` in
    place of theirs; the command receives their values as one object, in its `options` parameter."""
    hints = typing.get_type_hints(options_type, include_extras=True)
    shared = [
        inspect.Parameter(
            option.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=defaults.pop(option.name, option.default),
            annotation=hints[option.name],
        )
        for option in fields(options_type)
    ]
    if defaults:
        raise TypeError(f"{options_type.__name__} has no options {sorted(defaults)}")

    def decorate(command):
        own = inspect.signature(command, eval_str=True).parameters.values()
        parameters = [p for p in own if p.name != "options"] + shared

        @functools.wraps(command)
        def wrapper(**values):
            options = options_type(**{p.name: values.pop(p.name) for p in shared})
            return command(**values, options=options)

        # typer reads the command's options from the signature
        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def train_and_report(task, data, args, dev=None) -> None:
    """Train, then (on the main process) print the data report and a JSON summary."""
    from mbert_retrieval.training.distributed import shutdown_distributed
    from mbert_retrieval.training.trainer import Trainer

    trainer = Trainer(task, data, args, dev=dev)
    result = trainer.train()
    shutdown_distributed()
    if not trainer.world.is_main:
        return
    typer.echo(data.report())
    summary = {"steps": result.steps, "final_model": str(result.final_model)}
    if result.losses:
        summary["last_loss"] = result.losses[-1]
    if result.dev_metrics:
        summary["dev"] = result.dev_metrics[-1]
    typer.echo(json.dumps(summary, indent=2))


# -- commands ----------------------------------------------------------------------------------------


@train_app.command()
@reports_errors
@with_options(ExampleOptions, output_dir=Path("runs/dense"))
def dense(
    model: Model,
    data: Data,
    pooling: Annotated[
        str | None, typer.Option(help="mean or cls (default: the folder's, else mean).")
    ] = None,
    query_prefix: Annotated[str | None, typer.Option(help="Text put before each query.")] = None,
    document_prefix: Annotated[str | None, typer.Option(help="Text put before each document.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Document tokens kept.")] = None,
    query_max_length: Annotated[int | None, typer.Option(help="Query tokens kept.")] = None,
    temperature: Annotated[float, typer.Option(help="InfoNCE temperature.")] = 0.05,
    symmetric: Annotated[bool, typer.Option(help="Add the document-to-query loss.")] = False,
    matryoshka_dims: Annotated[
        str | None, typer.Option(help="Comma-separated dims, e.g. 512,256,128.")
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="sentence-transformers model (folder or hub id) whose embeddings to distil."),
    ] = None,
    distillation: Annotated[
        float, typer.Option(help="Weight of the distance to the --teacher's embeddings.")
    ] = 1.0,
    *,
    options: ExampleOptions,
):
    """Train a dense retriever with InfoNCE (in-batch + hard negatives)."""
    import torch

    from mbert_retrieval.models.dense import DenseRetriever
    from mbert_retrieval.training.tasks import DenseTask

    args = options.training_arguments()
    torch.manual_seed(options.seed)  # a new projection or head starts the same on every process
    retriever = DenseRetriever.from_pretrained(
        model,
        pooling=pooling,
        query_prefix=query_prefix,
        document_prefix=document_prefix,
        max_length=max_length,
        device="cpu",
        dtype=torch.float32,
    )
    dims = [int(d) for d in matryoshka_dims.split(",")] if matryoshka_dims else None
    task = DenseTask(
        retriever,
        temperature=temperature,
        symmetric=symmetric,
        matryoshka_dims=dims,
        query_max_length=query_max_length,
        teacher=None if teacher is None else sentence_transformer_teacher(teacher, options.device),
        distillation=distillation,
    )
    train_and_report(task, options.examples(data), args, options.dev_set())


def sentence_transformer_teacher(name: str, device: str | None):
    """A sentence-transformers model as a frozen teacher: texts -> normalised embeddings."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SentenceTransformer(name, device=device)
    if model.device.type == "cuda":
        model.half()

    def embed(texts: list[str]):
        return model.encode(
            texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )

    return embed


@train_app.command()
@reports_errors
@with_options(ExampleOptions, output_dir=Path("runs/colbert"), learning_rate=3e-5)
def colbert(
    model: Model,
    data: Data,
    loss: Annotated[ColBERTLoss, typer.Option(help="contrastive, or distillation from teacher scores.")] = (
        ColBERTLoss.contrastive
    ),
    temperature: Annotated[float, typer.Option(help="Contrastive temperature on MaxSim scores.")] = 1.0,
    query_length: Annotated[int | None, typer.Option(help="Query tokens (with [MASK] expansion).")] = None,
    document_length: Annotated[int | None, typer.Option(help="Document tokens kept.")] = None,
    embedding_size: Annotated[int, typer.Option(help="Vector size for a new projection.")] = 128,
    *,
    options: ExampleOptions,
):
    """Train a ColBERT model: contrastive, or KL distillation from teacher scores."""
    import torch

    from mbert_retrieval.models.colbert import ColBERT
    from mbert_retrieval.training.tasks import ColBERTTask

    args = options.training_arguments()
    settings = {k: v for k, v in (("query_length", query_length), ("document_length", document_length)) if v}
    torch.manual_seed(options.seed)
    colbert_model = ColBERT.from_pretrained(
        model, embedding_size=embedding_size, device="cpu", dtype=torch.float32, **settings
    )
    task = ColBERTTask(colbert_model, loss=loss.value, temperature=temperature)
    train_and_report(task, options.examples(data), args, options.dev_set())


@train_app.command("cross-encoder")
@reports_errors
@with_options(ExampleOptions, output_dir=Path("runs/cross-encoder"), batch_size=16)
def cross_encoder(
    model: Model,
    data: Data,
    loss: Annotated[RerankerLoss, typer.Option(help="bce (pointwise) or listwise.")] = RerankerLoss.bce,
    max_length: Annotated[int | None, typer.Option(help="Pair tokens kept.")] = None,
    *,
    options: ExampleOptions,
):
    """Train a cross-encoder reranker on (query, positive, negatives)."""
    import torch

    from mbert_retrieval.models.cross_encoder import CrossEncoder
    from mbert_retrieval.training.tasks import CrossEncoderTask

    args = options.training_arguments()
    torch.manual_seed(options.seed)
    reranker = CrossEncoder.from_pretrained(model, max_length=max_length, device="cpu", dtype=torch.float32)
    task = CrossEncoderTask(reranker, loss=loss.value)
    train_and_report(task, options.examples(data), args, options.dev_set())


@train_app.command()
@reports_errors
@with_options(
    RunOptions,
    output_dir=Path("runs/mlm"),
    learning_rate=8e-4,
    warmup_steps=0.05,
    decay=Decay.one_minus_sqrt,
    decay_steps=0.1,
    optimizer=Optimizer.stable_adamw,
    weight_decay=1e-5,
)
def mlm(
    model: Annotated[str, typer.Argument(help="ModernBertForMaskedLM folder (with its tokenizer).")],
    corpus: Annotated[
        Path, typer.Argument(help=".jsonl ('text' per line), .txt (a document per line) or a folder.")
    ],
    from_scratch: Annotated[
        bool, typer.Option(help="Only read config.json and start from random weights.")
    ] = False,
    max_length: Annotated[int, typer.Option(help="Tokens per sequence.")] = 1024,
    mask_probability: Annotated[float, typer.Option(help="Share of tokens selected for prediction.")] = 0.3,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    max_tokens_per_batch: Annotated[
        int, typer.Option(help="Tokens per batch (all processes together).")
    ] = 65536,
    warmup_tokens_per_batch: Annotated[
        int | None, typer.Option(help="Batch-size warmup: starting tokens.")
    ] = None,
    batch_warmup_steps: Annotated[int, typer.Option(help="Steps over which the batch grows.")] = 0,
    *,
    options: RunOptions,
):
    """Masked-language-model pretraining (30% masking, packed sequences, StableAdamW, WSD schedule)."""
    import torch

    from mbert_retrieval.modeling import ModernBertForMaskedLM
    from mbert_retrieval.modeling.encoder import load_config
    from mbert_retrieval.modeling.io import resolve_model_dir
    from mbert_retrieval.tokenization import load_tokenizer
    from mbert_retrieval.training.data import TextCorpus
    from mbert_retrieval.training.mlm import MLMTask, initialize_weights

    args = options.training_arguments(
        max_steps=max_steps,
        batch_size=None,
        max_tokens_per_batch=max_tokens_per_batch,
        warmup_tokens_per_batch=warmup_tokens_per_batch,
        batch_warmup_steps=batch_warmup_steps,
    )
    torch.manual_seed(options.seed)
    model_dir = resolve_model_dir(model)
    if from_scratch:
        config = load_config(model_dir)
        masked_lm = initialize_weights(
            ModernBertForMaskedLM(config), float(config.extra.get("initializer_range", 0.02))
        )
    else:
        masked_lm = ModernBertForMaskedLM.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    task = MLMTask(
        masked_lm, load_tokenizer(model_dir), max_length=max_length, mask_probability=mask_probability
    )
    train_and_report(task, TextCorpus(corpus), args)


@train_app.command()
@reports_errors
def mine(
    model: Annotated[str, typer.Argument(help="Dense retriever (or encoder) that retrieves the candidates.")],
    data: Data,
    output: Annotated[Path, typer.Argument(help="JSONL to write {query, positive, negatives}.")],
    num_negatives: Annotated[int, typer.Option(help="Negatives per example.")] = 8,
    skip_top: Annotated[
        int, typer.Option(help="Non-positive top hits passed over (likely unlabelled positives).")
    ] = 0,
    max_score_ratio: Annotated[
        float | None,
        typer.Option(help="Drop candidates scoring above this fraction of the positive's score."),
    ] = None,
    split: Annotated[str, typer.Option(help="qrels split of a BEIR folder.")] = "train",
    device: Device = None,
):
    """Mine hard negatives with a dense model and write the JSONL that training reads."""
    from mbert_retrieval.models.dense import DenseRetriever
    from mbert_retrieval.training.data import load_examples
    from mbert_retrieval.training.mining import mine_hard_negatives

    retriever = DenseRetriever.from_pretrained(model, device=device)
    source = load_examples(data, split=split)
    report = mine_hard_negatives(
        retriever,
        source,
        output,
        num_negatives=num_negatives,
        skip_top=skip_top,
        max_score_ratio=max_score_ratio,
    )
    typer.echo(source.report())
    typer.echo(
        json.dumps(
            {
                "output": str(output),
                "examples": report.examples,
                "queries": report.queries,
                "corpus": report.corpus_size,
                "problems": dict(report.problems),
            },
            indent=2,
        )
    )
