"""`mbert-retrieval train ...`: dense, colbert, cross-encoder, mlm, and mine (hard negatives).

Data is a BEIR folder (its train qrels), a JSONL file of examples, or `hf:<dataset>`; see
`mbert_retrieval.training.data`. Every run writes `metrics.jsonl`, checkpoints (with
`--save-steps`) and the final model to `<output-dir>/final`. Under `torchrun` each process takes
its share of every batch.
"""

from __future__ import annotations

import functools
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(
    name="train",
    help="Train dense, ColBERT and cross-encoder models, pretrain with MLM, mine hard negatives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_FAILURE, EXIT_BAD_INPUT = 1, 2


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


def reports_errors(command):
    """Bad input (missing data, bad checkpoint, impossible settings) -> one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from mbert_retrieval.modeling import CheckpointError, ConfigError
        from mbert_retrieval.training.data import TrainingDataError

        try:
            return command(*args, **kwargs)
        except (TrainingDataError, CheckpointError, ConfigError, ValueError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


# -- options shared by the training commands ---------------------------------------------------------

Model = Annotated[str, typer.Argument(help="Checkpoint folder or hub id to start from.")]
Data = Annotated[str, typer.Argument(help="BEIR folder, JSONL of examples, or hf:<dataset>.")]
OutputDir = Annotated[
    Path, typer.Option("--output-dir", "-o", help="Where metrics, checkpoints and the model go.")
]
MaxSteps = Annotated[int | None, typer.Option(help="Optimizer steps (default: --epochs over the data).")]
Epochs = Annotated[float, typer.Option(help="Passes over the data when --max-steps is not given.")]
BatchSize = Annotated[int | None, typer.Option(help="Examples per batch (all processes together).")]
MaxTokens = Annotated[int | None, typer.Option(help="Token budget per batch (all processes together).")]
ChunkTokens = Annotated[
    int | None, typer.Option(help="GradCache: tokens per forward chunk of a large batch.")
]
Accumulation = Annotated[int, typer.Option("--grad-accum", help="Batches per optimizer step.")]
LearningRate = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
Warmup = Annotated[float, typer.Option(help="Warmup steps (a fraction of all steps when below 1).")]
DecayOption = Annotated[Decay, typer.Option(help="Learning-rate decay after the stable stage.")]
DecaySteps = Annotated[
    float | None, typer.Option(help="Decay steps or fraction (default: all after warmup).")
]
OptimizerOption = Annotated[Optimizer, typer.Option(help="adamw or stable_adamw.")]
WeightDecay = Annotated[float, typer.Option(help="Decoupled weight decay on weight matrices.")]
Seed = Annotated[int, typer.Option(help="Seeds shuffling, masking and initialisation.")]
Dev = Annotated[Path | None, typer.Option(help="BEIR folder to compute nDCG@10 / MRR@10 on during training.")]
DevSplit = Annotated[str, typer.Option(help="qrels split of --dev.")]
EvalSteps = Annotated[int | None, typer.Option(help="Evaluate on --dev every this many steps.")]
SaveSteps = Annotated[int | None, typer.Option(help="Write a checkpoint every this many steps.")]
Resume = Annotated[str | None, typer.Option(help="Checkpoint folder to resume from, or 'latest'.")]
Bf16 = Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: on CUDA).")]
Checkpointing = Annotated[bool, typer.Option(help="Recompute activations in backward to save memory.")]
Compile = Annotated[bool, typer.Option(help="torch.compile the encoder layers (CUDA).")]
TensorBoard = Annotated[bool, typer.Option(help="Also log to TensorBoard.")]
Device = Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: CUDA when available).")]
NumNegatives = Annotated[int | None, typer.Option(help="Hard negatives kept per example (default: all).")]
LoggingSteps = Annotated[int, typer.Option(help="Write metrics every this many steps.")]


def training_arguments(**values):
    from mbert_retrieval.training.trainer import TrainingArguments

    for key in ("decay", "optimizer"):
        if isinstance(values.get(key), Enum):
            values[key] = values[key].value
    values["output_dir"] = str(values["output_dir"])
    return TrainingArguments(**values)


def run(task, data, args, dev: Path | None, dev_split: str) -> None:
    from mbert_retrieval.training.distributed import current_world
    from mbert_retrieval.training.evaluate import DevSet
    from mbert_retrieval.training.trainer import Trainer

    dev_set = DevSet.from_beir(dev, split=dev_split) if dev is not None else None
    result = Trainer(task, data, args, dev=dev_set).train()
    if not current_world().is_main:
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
def dense(
    model: Model,
    data: Data,
    output_dir: OutputDir = Path("runs/dense"),
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
    num_negatives: NumNegatives = None,
    max_steps: MaxSteps = None,
    max_time: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (then save as usual).")
    ] = None,
    epochs: Epochs = 1.0,
    batch_size: BatchSize = 32,
    max_tokens_per_batch: MaxTokens = None,
    chunk_tokens: ChunkTokens = None,
    gradient_accumulation_steps: Accumulation = 1,
    learning_rate: LearningRate = 2e-5,
    warmup_steps: Warmup = 0.1,
    decay: DecayOption = Decay.linear,
    decay_steps: DecaySteps = None,
    optimizer: OptimizerOption = Optimizer.adamw,
    weight_decay: WeightDecay = 0.01,
    seed: Seed = 42,
    dev: Dev = None,
    dev_split: DevSplit = "dev",
    eval_steps: EvalSteps = None,
    save_steps: SaveSteps = None,
    resume_from: Resume = None,
    bf16: Bf16 = None,
    gradient_checkpointing: Checkpointing = False,
    compile: Compile = False,
    tensorboard: TensorBoard = False,
    device: Device = None,
    logging_steps: LoggingSteps = 10,
):
    """Train a dense retriever with InfoNCE (in-batch + hard negatives)."""
    import torch

    from mbert_retrieval.models.dense import DenseRetriever
    from mbert_retrieval.training.data import load_examples
    from mbert_retrieval.training.tasks import DenseTask

    args = training_arguments(**_training_values(locals()))
    torch.manual_seed(seed)  # a new projection or head starts the same on every process
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
        teacher=None if teacher is None else sentence_transformer_teacher(teacher, device),
        distillation=distillation,
    )
    run(task, load_examples(data, num_negatives=num_negatives), args, dev, dev_split)


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
def colbert(
    model: Model,
    data: Data,
    output_dir: OutputDir = Path("runs/colbert"),
    loss: Annotated[ColBERTLoss, typer.Option(help="contrastive, or distillation from teacher scores.")] = (
        ColBERTLoss.contrastive
    ),
    temperature: Annotated[float, typer.Option(help="Contrastive temperature on MaxSim scores.")] = 1.0,
    query_length: Annotated[int | None, typer.Option(help="Query tokens (with [MASK] expansion).")] = None,
    document_length: Annotated[int | None, typer.Option(help="Document tokens kept.")] = None,
    embedding_size: Annotated[int, typer.Option(help="Vector size for a new projection.")] = 128,
    num_negatives: NumNegatives = None,
    max_steps: MaxSteps = None,
    epochs: Epochs = 1.0,
    batch_size: BatchSize = 32,
    max_tokens_per_batch: MaxTokens = None,
    chunk_tokens: ChunkTokens = None,
    gradient_accumulation_steps: Accumulation = 1,
    learning_rate: LearningRate = 3e-5,
    warmup_steps: Warmup = 0.1,
    decay: DecayOption = Decay.linear,
    decay_steps: DecaySteps = None,
    optimizer: OptimizerOption = Optimizer.adamw,
    weight_decay: WeightDecay = 0.01,
    seed: Seed = 42,
    dev: Dev = None,
    dev_split: DevSplit = "dev",
    eval_steps: EvalSteps = None,
    save_steps: SaveSteps = None,
    resume_from: Resume = None,
    bf16: Bf16 = None,
    gradient_checkpointing: Checkpointing = False,
    compile: Compile = False,
    tensorboard: TensorBoard = False,
    device: Device = None,
    logging_steps: LoggingSteps = 10,
):
    """Train a ColBERT model: contrastive, or KL distillation from teacher scores."""
    import torch

    from mbert_retrieval.models.colbert import ColBERT
    from mbert_retrieval.training.data import load_examples
    from mbert_retrieval.training.tasks import ColBERTTask

    args = training_arguments(**_training_values(locals()))
    settings = {k: v for k, v in (("query_length", query_length), ("document_length", document_length)) if v}
    torch.manual_seed(seed)
    colbert_model = ColBERT.from_pretrained(
        model, embedding_size=embedding_size, device="cpu", dtype=torch.float32, **settings
    )
    task = ColBERTTask(colbert_model, loss=loss.value, temperature=temperature)
    run(task, load_examples(data, num_negatives=num_negatives), args, dev, dev_split)


@train_app.command("cross-encoder")
@reports_errors
def cross_encoder(
    model: Model,
    data: Data,
    output_dir: OutputDir = Path("runs/cross-encoder"),
    loss: Annotated[RerankerLoss, typer.Option(help="bce (pointwise) or listwise.")] = RerankerLoss.bce,
    max_length: Annotated[int | None, typer.Option(help="Pair tokens kept.")] = None,
    num_negatives: NumNegatives = None,
    max_steps: MaxSteps = None,
    epochs: Epochs = 1.0,
    batch_size: BatchSize = 16,
    max_tokens_per_batch: MaxTokens = None,
    chunk_tokens: ChunkTokens = None,
    gradient_accumulation_steps: Accumulation = 1,
    learning_rate: LearningRate = 2e-5,
    warmup_steps: Warmup = 0.1,
    decay: DecayOption = Decay.linear,
    decay_steps: DecaySteps = None,
    optimizer: OptimizerOption = Optimizer.adamw,
    weight_decay: WeightDecay = 0.01,
    seed: Seed = 42,
    dev: Dev = None,
    dev_split: DevSplit = "dev",
    eval_steps: EvalSteps = None,
    save_steps: SaveSteps = None,
    resume_from: Resume = None,
    bf16: Bf16 = None,
    gradient_checkpointing: Checkpointing = False,
    compile: Compile = False,
    tensorboard: TensorBoard = False,
    device: Device = None,
    logging_steps: LoggingSteps = 10,
):
    """Train a cross-encoder reranker on (query, positive, negatives)."""
    import torch

    from mbert_retrieval.models.cross_encoder import CrossEncoder
    from mbert_retrieval.training.data import load_examples
    from mbert_retrieval.training.tasks import CrossEncoderTask

    args = training_arguments(**_training_values(locals()))
    torch.manual_seed(seed)
    reranker = CrossEncoder.from_pretrained(model, max_length=max_length, device="cpu", dtype=torch.float32)
    task = CrossEncoderTask(reranker, loss=loss.value)
    run(task, load_examples(data, num_negatives=num_negatives), args, dev, dev_split)


@train_app.command()
@reports_errors
def mlm(
    model: Annotated[str, typer.Argument(help="ModernBertForMaskedLM folder (with its tokenizer).")],
    corpus: Annotated[
        Path, typer.Argument(help=".jsonl ('text' per line), .txt (a document per line) or a folder.")
    ],
    output_dir: OutputDir = Path("runs/mlm"),
    from_scratch: Annotated[
        bool, typer.Option(help="Only read config.json and start from random weights.")
    ] = False,
    max_length: Annotated[int, typer.Option(help="Tokens per sequence.")] = 1024,
    mask_probability: Annotated[float, typer.Option(help="Share of tokens selected for prediction.")] = 0.3,
    max_tokens_per_batch: Annotated[
        int, typer.Option(help="Tokens per batch (all processes together).")
    ] = 65536,
    warmup_tokens_per_batch: Annotated[
        int | None, typer.Option(help="Batch-size warmup: starting tokens.")
    ] = None,
    batch_warmup_steps: Annotated[int, typer.Option(help="Steps over which the batch grows.")] = 0,
    chunk_tokens: ChunkTokens = None,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    gradient_accumulation_steps: Accumulation = 1,
    learning_rate: LearningRate = 8e-4,
    warmup_steps: Warmup = 0.05,
    decay: DecayOption = Decay.one_minus_sqrt,
    decay_steps: DecaySteps = 0.1,
    optimizer: OptimizerOption = Optimizer.stable_adamw,
    weight_decay: WeightDecay = 1e-5,
    seed: Seed = 42,
    save_steps: SaveSteps = None,
    resume_from: Resume = None,
    bf16: Bf16 = None,
    gradient_checkpointing: Checkpointing = False,
    compile: Compile = False,
    tensorboard: TensorBoard = False,
    device: Device = None,
    logging_steps: LoggingSteps = 10,
):
    """Masked-language-model pretraining (30% masking, packed sequences, StableAdamW, WSD schedule)."""
    import torch

    from mbert_retrieval.modeling import ModernBertForMaskedLM
    from mbert_retrieval.modeling.encoder import load_config
    from mbert_retrieval.modeling.io import resolve_model_dir
    from mbert_retrieval.tokenization import load_tokenizer
    from mbert_retrieval.training.data import TextCorpus
    from mbert_retrieval.training.mlm import MLMTask, initialize_weights

    values = _training_values(locals())
    values["batch_size"] = None
    args = training_arguments(**values)
    torch.manual_seed(seed)
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
    run(task, TextCorpus(corpus), args, None, "")


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


TRAINING_OPTIONS = {
    "output_dir",
    "max_steps",
    "max_time",
    "epochs",
    "batch_size",
    "max_tokens_per_batch",
    "chunk_tokens",
    "gradient_accumulation_steps",
    "learning_rate",
    "warmup_steps",
    "decay",
    "decay_steps",
    "optimizer",
    "weight_decay",
    "seed",
    "eval_steps",
    "save_steps",
    "resume_from",
    "bf16",
    "gradient_checkpointing",
    "compile",
    "tensorboard",
    "device",
    "logging_steps",
    "warmup_tokens_per_batch",
    "batch_warmup_steps",
}


def _training_values(local_values: dict) -> dict:
    """The command's options that are TrainingArguments fields."""
    return {k: v for k, v in local_values.items() if k in TRAINING_OPTIONS}
