"""Our dense model through mteb's encoder interface, on a retrieval task built in memory (offline)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

mteb = pytest.importorskip("mteb")

from datasets import Dataset  # noqa: E402
from mbert_retrieval.evaluation.code_dataset import build_code_dataset  # noqa: E402
from mbert_retrieval.evaluation.data import load_beir  # noqa: E402
from mbert_retrieval.evaluation.harness import evaluate_retriever  # noqa: E402
from mbert_retrieval.evaluation.mteb_adapter import MtebEncoder  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.models_protocols import EncoderProtocol  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from mbert_retrieval.search import Retriever  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def in_memory_task(data):
    class InMemoryCodeRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="InMemoryCodeRetrieval",
            description="Docstring summaries against the functions they document.",
            reference=None,
            dataset={"path": "in-memory", "revision": "0"},
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            date=None,
            domains=["Programming"],
            task_subtypes=["Code retrieval"],
            license="mit",
            annotations_creators="derived",
            dialect=[],
            sample_creation="found",
            bibtex_citation="",
        )

        def load_data(self, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in data.queries.items()]),
                corpus=Dataset.from_list(
                    [{"id": i, "title": d["title"], "text": d["text"]} for i, d in data.corpus.items()]
                ),
                relevant_docs=data.qrels,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return InMemoryCodeRetrieval()


class RecordingDense:
    """Records which side each text was encoded as, around a real DenseRetriever."""

    def __init__(self, model):
        self.model, self.dim, self.calls = model, model.dim, []

    def encode_queries(self, texts, **kwargs):
        self.calls.append(("query", len(texts)))
        return self.model.encode_queries(texts, **kwargs)

    def encode_documents(self, texts, **kwargs):
        self.calls.append(("document", len(texts)))
        return self.model.encode_documents(texts, **kwargs)


def test_mteb_scores_equal_ours(hf_mlm_dir, tmp_path):
    from mbert_retrieval.models.dense import DenseRetriever

    build_code_dataset(
        STDLIB / "json", tmp_path / "data", dev_fraction=0, test_fraction=0.5, show_progress=False
    )
    data = load_beir(tmp_path / "data", "test")
    dense = DenseRetriever.from_pretrained(
        hf_mlm_dir, max_length=96, query_prefix="query: ", document_prefix="passage: ", device="cpu"
    )
    model = RecordingDense(dense)
    encoder = MtebEncoder(model, name="test/tiny-dense")
    assert isinstance(encoder, EncoderProtocol)

    results = mteb.evaluate(encoder, in_memory_task(data), cache=None, show_progress_bar=False)
    scores = results.task_results[0].scores["test"][0]
    assert {"query", "document"} == {side for side, _ in model.calls}
    assert sum(n for side, n in model.calls if side == "query") == len(data.queries)

    ours = evaluate_retriever(Retriever(dense, index="flat"), data, show_progress=False).metrics
    assert scores["ndcg_at_10"] == pytest.approx(ours["NDCG@10"], abs=1e-4)
    assert scores["mrr_at_10"] == pytest.approx(ours["MRR@10"], abs=1e-4)
    assert scores["recall_at_100"] == pytest.approx(ours["Recall@100"], abs=1e-4)


def test_encode_uses_the_prompt_type(hf_mlm_dir):
    import numpy as np
    from torch.utils.data import DataLoader

    from mbert_retrieval.models.dense import DenseRetriever

    dense = DenseRetriever.from_pretrained(
        hf_mlm_dir, query_prefix="query: ", document_prefix="passage: ", device="cpu"
    )
    encoder = MtebEncoder(dense)
    texts = ["parse a JSON string", "write an object to a file", "decode bytes"]
    loader = DataLoader(Dataset.from_list([{"text": t} for t in texts]), batch_size=2)
    common = dict(task_metadata=None, hf_split="test", hf_subset="default")
    as_queries = encoder.encode(loader, prompt_type=PromptType.query, **common)
    as_documents = encoder.encode(loader, prompt_type=PromptType.document, **common)
    np.testing.assert_allclose(as_queries, dense.encode_queries(texts), atol=1e-5)
    np.testing.assert_allclose(as_documents, dense.encode_documents(texts), atol=1e-5)
    assert not np.allclose(as_queries, as_documents)
