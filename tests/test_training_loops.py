"""The training loops end to end, on real docstring -> function pairs from the Python standard library
(split by module, so no test function or its module is seen in training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STDLIB

from mbert_retrieval.index.plaid import PlaidIndex
from mbert_retrieval.modeling import ModernBertForMaskedLM
from mbert_retrieval.models.colbert import ColBERT
from mbert_retrieval.models.cross_encoder import CrossEncoder
from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.tokenization import load_tokenizer
from mbert_retrieval.training import (
    BeirExamples,
    ColBERTTask,
    CrossEncoderTask,
    DenseTask,
    DevSet,
    JsonlExamples,
    MLMTask,
    TextCorpus,
    Trainer,
    TrainingArguments,
    evaluate_task,
    mine_hard_negatives,
)


@pytest.fixture(scope="module")
def code_pairs(tmp_path_factory) -> Path:
    from mbert_retrieval.evaluation.code_dataset import build_code_dataset

    folder = tmp_path_factory.mktemp("stdlib_pairs")
    build_code_dataset(STDLIB, folder, max_functions=3000, show_progress=False)
    return folder


@pytest.fixture(scope="module")
def held_out(code_pairs) -> DevSet:
    """The test split: its queries against its own functions."""
    dev = DevSet.from_beir(code_pairs, split="test")
    relevant = {d for docs in dev.qrels.values() for d in docs}
    dev.corpus = {d: text for d, text in dev.corpus.items() if d in relevant}
    assert len(dev.queries) > 300
    return dev


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        batch_size=16,
        learning_rate=1e-3,
        warmup_steps=0.1,
        show_progress=False,
        logging_steps=10,
        device="cpu",
    )
    values.update(overrides)
    return TrainingArguments(**values)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dense_training_beats_the_untrained_model(hf_mlm_dir, code_pairs, held_out, tmp_path):
    model = DenseRetriever.from_pretrained(hf_mlm_dir, max_length=64, device="cpu")
    task = DenseTask(model, query_max_length=32)
    untrained = evaluate_task(task, held_out)["NDCG@10"]
    dev = DevSet.from_beir(code_pairs, split="dev")
    args = arguments(tmp_path, max_steps=200, eval_steps=100)
    result = Trainer(task, BeirExamples(code_pairs, "train"), args, dev=dev).train()
    trained = evaluate_task(task, held_out)["NDCG@10"]
    assert trained > untrained + 0.08 and trained > 1.5 * untrained, (untrained, trained)
    # The dev metric was computed during training and logged next to the losses.
    logged = [r for r in read_metrics(tmp_path) if "dev_NDCG@10" in r]
    assert [r["step"] for r in logged] == [100, 200]
    assert logged[-1]["dev_NDCG@10"] == result.dev_metrics[-1]["NDCG@10"]
    # The final folder is a sentence-transformers folder that scores like the trained model.
    reloaded = DenseRetriever.from_pretrained(result.final_model, device="cpu")
    query = held_out.queries[next(iter(held_out.queries))]
    np.testing.assert_allclose(reloaded.encode_queries([query]), model.encode_queries([query]), atol=1e-5)


@pytest.fixture(scope="module")
def colbert_run(hf_mlm_dir, code_pairs, held_out, tmp_path_factory) -> dict:
    """A ColBERT trained on the pairs, with its held-out nDCG@10 before and after."""
    torch.manual_seed(0)
    model = ColBERT.from_pretrained(hf_mlm_dir, query_length=32, document_length=64, device="cpu")
    task = ColBERTTask(model)
    untrained = evaluate_task(task, held_out)["NDCG@10"]
    output_dir = tmp_path_factory.mktemp("colbert_run")
    Trainer(task, BeirExamples(code_pairs, "train"), arguments(output_dir, max_steps=150)).train()
    return {"model": model, "untrained": untrained, "trained": evaluate_task(task, held_out)["NDCG@10"]}


@pytest.mark.slow
def test_colbert_training_beats_the_untrained_model(colbert_run):
    untrained, trained = colbert_run["untrained"], colbert_run["trained"]
    # 5 seeds x 3 attention paths: untrained 0.206-0.250, trained 0.347-0.377, +0.117..+0.158, x1.48..x1.72
    assert trained > untrained + 0.06 and trained > 1.25 * untrained, (untrained, trained)


@pytest.mark.slow
def test_plaid_at_default_settings_on_the_trained_colberts_embeddings(colbert_run, code_pairs):
    """PLAID over real text embedded by the trained ColBERT (2 bits per dimension, default search
    settings): its top 10 is exhaustive MaxSim's, over the original vectors and over the stored ones."""
    model = colbert_run["model"]
    corpus = DevSet.from_beir(code_pairs, split="train").corpus
    ids = list(corpus)
    queries = model.encode_queries(
        [query for query in DevSet.from_beir(code_pairs, split="dev").queries.values()][:200]
    )
    packed = model.encode_documents(list(corpus.values()), packed=True)
    documents = np.split(packed.embeddings, packed.offsets[1:-1])
    index = PlaidIndex.build(documents, ids, device="cpu", show_progress=False)
    found, _ = index.search(queries, k=10)

    def recall_at_10(exact_scores):
        truth = np.argsort(-exact_scores, axis=1)[:, :10]
        return np.mean([len(set(row) & {ids[i] for i in top}) / 10 for row, top in zip(found, truth)])

    stored = [index.document_embeddings(doc_id).numpy() for doc_id in ids]
    # 5 seeds x 3 attention paths: 0.9905-0.9995 over the stored vectors, 0.955-0.9755 over the original ones
    assert recall_at_10(model.score(queries, stored)) >= 0.97
    assert recall_at_10(model.score(queries, documents)) >= 0.93


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    files = sorted(STDLIB.glob("*/*.py"))[:60]  # package files: the tokenizer saw top-level ones only
    path = tmp_path_factory.mktemp("mlm") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f.read_text(errors="ignore")}) + "\n" for f in files))
    return path


def mlm_arguments(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(
        batch_size=None,
        max_tokens_per_batch=1024,
        optimizer="stable_adamw",
        learning_rate=3e-3,
        decay="1-sqrt",
        decay_steps=0.2,
        warmup_steps=0.1,
    )
    values.update(overrides)
    return arguments(output_dir, **values)


@pytest.mark.slow
def test_mlm_loss_falls_and_the_checkpoint_loads_in_transformers(hf_mlm_dir, text_corpus, tmp_path):
    from transformers import AutoModelForMaskedLM

    model = ModernBertForMaskedLM.from_pretrained(hf_mlm_dir)
    task = MLMTask(model, load_tokenizer(hf_mlm_dir), max_length=128)
    args = mlm_arguments(tmp_path, max_steps=150, warmup_tokens_per_batch=256, batch_warmup_steps=10)
    result = Trainer(task, TextCorpus(text_corpus), args).train()
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < first - 0.7, (first, last)  # a random model stays near ln(vocab) = 6.9

    hf = AutoModelForMaskedLM.from_pretrained(result.final_model).eval()
    tokenizer = load_tokenizer(result.final_model)
    batch = tokenizer(["def load(path):\n    return open(path).read()"], return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(batch["input_ids"], batch["attention_mask"])
        got = hf(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def dense_run(model_dir, data, output_dir, **overrides):
    torch.manual_seed(0)
    model = DenseRetriever.from_pretrained(model_dir, max_length=48, projection_dim=32, device="cpu")
    args = arguments(output_dir, max_steps=8, save_steps=4, batch_size=8, **overrides)
    return Trainer(DenseTask(model), data, args), model


def mlm_run(model_dir, data, output_dir, **overrides):
    model = ModernBertForMaskedLM.from_pretrained(model_dir)
    task = MLMTask(model, load_tokenizer(model_dir), max_length=64)
    args = mlm_arguments(
        output_dir, max_steps=8, save_steps=4, warmup_tokens_per_batch=128, batch_warmup_steps=4
    )
    return Trainer(task, data, args.__class__(**{**args.__dict__, **overrides})), model


@pytest.mark.parametrize("kind", ["dense", "mlm"])
def test_resuming_reproduces_the_uninterrupted_run(kind, hf_mlm_dir, code_pairs, text_corpus, tmp_path):
    if kind == "dense":
        data, make, extra = BeirExamples(code_pairs, "train"), dense_run, dict(gradient_accumulation_steps=2)
    else:
        data, make, extra = TextCorpus(text_corpus), mlm_run, {}
    trainer, straight_model = make(hf_mlm_dir, data, tmp_path / "straight", **extra)
    straight = trainer.train()
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000008",
    ]
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000008")
    trainer, resumed_model = make(hf_mlm_dir, data, tmp_path / "resumed", resume_from="latest", **extra)
    resumed = trainer.train()
    assert resumed.losses == straight.losses[4:]
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_mined_negatives_train_a_cross_encoder(hf_mlm_dir, code_pairs, tmp_path):
    model = DenseRetriever.from_pretrained(hf_mlm_dir, max_length=64, device="cpu")
    source = BeirExamples(code_pairs, "train")
    output = tmp_path / "mined.jsonl"
    report = mine_hard_negatives(model, source, output, num_negatives=3, skip_top=2, show_progress=False)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert report.examples == len(records) == len(source)

    # The same ranking, computed directly: skip positives, pass over 2 hits, take 3.
    corpus = [source.document(d) for d in source.corpus_offsets]
    documents = model.encode_documents(corpus)
    for record in records[:20]:
        order = np.argsort(-(documents @ model.encode_queries(record["query"])), kind="stable")
        hits = [corpus[i] for i in order if corpus[i] != record["positive"]]
        assert record["negatives"] == hits[2:5]

    reranker = CrossEncoder.from_pretrained(hf_mlm_dir, max_length=96, device="cpu")
    task = CrossEncoderTask(reranker, loss="listwise")
    result = Trainer(
        task, JsonlExamples(output), arguments(tmp_path / "ce", max_steps=40, batch_size=8)
    ).train()
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    assert CrossEncoder.from_pretrained(result.final_model, device="cpu").num_labels == 1


def test_cli_trains_and_reports_bad_input(hf_mlm_dir, tmp_path):
    from typer.testing import CliRunner

    from mbert_retrieval.cli import app

    data = tmp_path / "pairs.jsonl"
    rows = [{"query": f"query {i}", "positive": f"def f{i}(): return {i}"} for i in range(12)]
    rows.append({"query": "", "positive": "x"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    common = ["--max-steps", "3", "--batch-size", "4", "--device", "cpu", "-o", str(out)]
    result = CliRunner().invoke(app, ["train", "dense", str(hf_mlm_dir), str(data), *common])
    assert result.exit_code == 0, result.output
    assert "12 examples; left out: 1 records with an empty query" in result.output
    assert json.loads(result.output[result.output.index("{") :])["steps"] == 3
    assert DenseRetriever.from_pretrained(out / "final", device="cpu").dim == 64

    missing = CliRunner().invoke(
        app, ["train", "dense", str(hf_mlm_dir), str(tmp_path / "nope.jsonl"), *common]
    )
    assert missing.exit_code == 2 and "error:" in missing.output and "nope.jsonl" in missing.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled training on CUDA")
def test_compiled_training_on_cuda_follows_the_eager_losses(hf_mlm_dir, code_pairs, tmp_path):
    """`train --compile` on a GPU (one graph, its kernels launched from inductor's C++): the losses of
    the first steps as those of eager steps on the same batches."""
    losses = {}
    for compiled in (False, True):
        model = DenseRetriever.from_pretrained(hf_mlm_dir, max_length=64, device="cuda")
        out = tmp_path / ("compiled" if compiled else "eager")
        args = arguments(out, max_steps=4, logging_steps=1, compile=compiled, device="cuda")
        Trainer(DenseTask(model, query_max_length=32), BeirExamples(code_pairs, "train"), args).train()
        losses[compiled] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses[True]) == 4
    np.testing.assert_allclose(losses[True], losses[False], rtol=5e-2)


def test_compiled_training_logs_how_many_graphs_it_compiled(hf_mlm_dir, code_pairs, tmp_path):
    """`compiled_graphs` in the metrics lets a benchmark see recompiles inside its timed steps."""
    model = DenseRetriever.from_pretrained(hf_mlm_dir, max_length=64, device="cpu")
    args = arguments(tmp_path, max_steps=4, logging_steps=2, compile=True)
    Trainer(DenseTask(model, query_max_length=32), BeirExamples(code_pairs, "train"), args).train()
    counts = [r["compiled_graphs"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(counts) == 2 and 1 <= counts[0] <= counts[1]


def test_compiled_training_launches_from_cpp_on_cuda_when_a_compiler_is_there(monkeypatch, caplog):
    """`train --compile` in one process: inductor's C++ launcher on CUDA; without a C++ compiler to
    build it, the Python launcher and a warning instead of a failed compile; nothing on the CPU."""
    import torch._inductor.cpp_builder as cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    from mbert_retrieval.training import trainer

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    assert trainer.compile_options(cuda) == {"cpp_wrapper": True}
    assert trainer.compile_options(cpu) == {}

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with caplog.at_level("WARNING", logger="mbert_retrieval"):
        assert trainer.compile_options(cuda) == {}
    assert "no C++ compiler found" in caplog.text
