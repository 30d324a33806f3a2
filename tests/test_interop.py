"""Folders move both ways between us and the ecosystem, with the same outputs (fp32, CPU):
sentence-transformers (installed) for dense models and cross-encoders, PyLate for ColBERT.

PyLate pins exact versions of sentence-transformers and transformers, older than ours, so it is
installed on first use into its own folder (`<venv>/pylate-env`, or $MBERT_PYLATE_ENV) with
`pip --no-deps`, beside our torch, and driven in a subprocess. Those tests are skipped, with the
reason, when that cannot be done (e.g. no package index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers import SentenceTransformer
from sentence_transformers import models as st_models
from transformers import AutoTokenizer, ModernBertForSequenceClassification

from mbert_retrieval import ColBERT, CrossEncoder, DenseRetriever

ATOL = 1e-5
SCORE_ATOL = 1e-4  # the reranker's large random classifier weights magnify float32 rounding
TEXTS = [
    "def add(a, b):\n    return a + b",
    "How do I read a file line by line?",
    "",
    "import os, sys; print(os.getcwd())",
    " ".join(f"token{i}" for i in range(120)),  # longer than the limits below: truncated
]
PAIRS = [(TEXTS[1], t) for t in TEXTS] + [("q", "d")]


# -- sentence-transformers: dense ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "pooling, projection_dim, normalize", [("mean", 32, True), ("cls", None, True), ("mean", None, False)]
)
def test_dense_folder_loads_in_sentence_transformers(
    hf_mlm_dir, tmp_path, pooling, projection_dim, normalize
):
    torch.manual_seed(0)
    ours = DenseRetriever.from_pretrained(
        hf_mlm_dir,
        pooling=pooling,
        projection_dim=projection_dim,
        normalize=normalize,
        query_prefix="query: ",
        document_prefix="document: ",
        max_length=40,
        device="cpu",
    )
    ours.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    assert st.max_seq_length == 40
    np.testing.assert_allclose(st.encode_query(TEXTS), ours.encode_queries(TEXTS), atol=ATOL)
    np.testing.assert_allclose(st.encode_document(TEXTS), ours.encode_documents(TEXTS), atol=ATOL)
    np.testing.assert_allclose(st.encode(TEXTS), ours.encode(TEXTS), atol=ATOL)


@pytest.mark.parametrize("pooling, dense, normalize", [("cls", True, True), ("mean", False, False)])
def test_sentence_transformers_folder_loads_as_dense(hf_mlm_dir, tmp_path, pooling, dense, normalize):
    torch.manual_seed(0)
    transformer = st_models.Transformer(str(hf_mlm_dir), max_seq_length=48)
    modules = [transformer, st_models.Pooling(transformer.get_word_embedding_dimension(), pooling)]
    if dense:
        modules.append(st_models.Dense(64, 24, bias=True, activation_function=torch.nn.Identity()))
    if normalize:
        modules.append(st_models.Normalize())
    st = SentenceTransformer(modules=modules, prompts={"query": "q: ", "document": "p: "}, device="cpu")
    st.save(str(tmp_path))
    ours = DenseRetriever.from_pretrained(tmp_path, device="cpu")
    assert (ours.pooling, ours.normalize, ours.max_length, ours.dim) == (
        pooling,
        normalize,
        48,
        24 if dense else 64,
    )
    assert (ours.query_prefix, ours.document_prefix) == ("q: ", "p: ")
    np.testing.assert_allclose(ours.encode_queries(TEXTS), st.encode_query(TEXTS), atol=ATOL)
    np.testing.assert_allclose(ours.encode_documents(TEXTS), st.encode_document(TEXTS), atol=ATOL)


# -- sentence-transformers: cross-encoder -------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_reranker_dir(hf_mlm_dir, tmp_path_factory) -> Path:
    """A random `transformers` ModernBERT reranker whose scores clearly differ between pairs."""
    directory = tmp_path_factory.mktemp("hf_reranker")
    torch.manual_seed(1)
    hf = ModernBertForSequenceClassification.from_pretrained(hf_mlm_dir, num_labels=1).eval()
    with torch.no_grad():
        hf.head.dense.weight.normal_(0, 1.0)
        hf.head.norm.weight.normal_(0, 1.0)
        hf.classifier.weight.normal_(0, 10.0)
        tokenizer = AutoTokenizer.from_pretrained(hf_mlm_dir)
        batch = tokenizer([q for q, _ in PAIRS], [d for _, d in PAIRS], padding=True, return_tensors="pt")
        hf.classifier.bias.sub_(hf(**batch).logits.mean())  # centre the scores: no saturated sigmoid
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_cross_encoder_folder_loads_in_sentence_transformers(hf_reranker_dir, tmp_path):
    ours = CrossEncoder.from_pretrained(hf_reranker_dir, max_length=40, device="cpu")
    ours.save_pretrained(tmp_path)
    st = STCrossEncoder(str(tmp_path), device="cpu")
    assert st.max_seq_length == 40
    scores = ours.predict(PAIRS)
    assert np.ptp(scores) > 0.05  # 5 seeds x 3 attention paths: 0.127-0.278
    np.testing.assert_allclose(st.predict(PAIRS), scores, atol=SCORE_ATOL)
    logits = st.predict(PAIRS, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(logits, ours.predict(PAIRS, apply_activation=False), atol=SCORE_ATOL)
    ranked = st.rank(TEXTS[1], TEXTS)
    assert [h["corpus_id"] for h in ranked] == [h["corpus_id"] for h in ours.rerank(TEXTS[1], TEXTS)]


def test_sentence_transformers_cross_encoder_folder_loads(hf_reranker_dir, tmp_path):
    st = STCrossEncoder(str(hf_reranker_dir), max_length=40, device="cpu")
    st.save(str(tmp_path))  # the newer layout, with modules.json
    ours = CrossEncoder.from_pretrained(tmp_path, device="cpu")
    np.testing.assert_allclose(ours.predict(PAIRS), st.predict(PAIRS), atol=SCORE_ATOL)


# -- PyLate --------------------------------------------------------------------------------------------

PYLATE_PINS = (
    "pylate==1.6.0",
    "sentence-transformers==5.3.0",
    "transformers==5.3.0",
    "tokenizers==0.22.2",
    "huggingface-hub==1.33.0",
)
PYLATE_SCRIPT = """
import json, sys
import numpy as np
from pylate import models

for job in json.load(open(sys.argv[1])):
    if "create_from" in job:
        models.ColBERT(job["create_from"], device="cpu", **job["settings"]).save(job["model_dir"])
    model = models.ColBERT(job["model_dir"], device="cpu")
    queries = model.encode(job["queries"], is_query=True)
    documents = model.encode(job["documents"], is_query=False)
    arrays = {"queries": np.stack(queries), **{f"document{i}": d for i, d in enumerate(documents)}}
    np.savez(job["out"], **arrays)
"""


@pytest.fixture(scope="session")
def pylate_env() -> Path:
    target = Path(os.environ.get("MBERT_PYLATE_ENV", Path(sys.prefix) / "pylate-env"))
    stamp = target / "mbert-pins.txt"
    if not (stamp.exists() and stamp.read_text() == "\n".join(PYLATE_PINS)):
        staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging)]
        try:
            done = subprocess.run([*command, *PYLATE_PINS], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip("installing PyLate timed out")
        if done.returncode != 0:
            pytest.skip(f"PyLate could not be installed ({' '.join(PYLATE_PINS)}): {done.stderr[-500:]}")
        (staging / stamp.name).write_text("\n".join(PYLATE_PINS))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    probe = run_python(target, "import pylate.models")
    if probe.returncode != 0:
        pytest.skip(f"PyLate cannot be imported beside this torch: {probe.stderr[-500:]}")
    return target


def run_python(pythonpath: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c code args...` with `pythonpath` ahead of this environment's packages."""
    env = {
        **os.environ,
        "PYTHONPATH": str(pythonpath),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600
    )


def run_pylate(env: Path, jobs: list[dict], tmp_path: Path) -> None:
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = run_python(env, PYLATE_SCRIPT, str(tmp_path / "jobs.json"))
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_colbert_outputs(ours: ColBERT, saved: Path, texts: list[str]) -> None:
    arrays = np.load(saved)
    np.testing.assert_allclose(ours.encode_queries(texts), arrays["queries"], atol=ATOL)
    for i, vectors in enumerate(ours.encode_documents(texts)):
        np.testing.assert_allclose(vectors, arrays[f"document{i}"], atol=ATOL)


COLBERT_TEXTS = [*TEXTS, "Punctuation: commas, dots... and (brackets)!"]


@pytest.mark.slow
def test_colbert_folders_move_both_ways_with_pylate(pylate_env, hf_mlm_dir, tmp_path):
    torch.manual_seed(0)
    ours = ColBERT.from_pretrained(hf_mlm_dir, query_length=24, document_length=40, device="cpu")
    ours.save_pretrained(tmp_path / "ours")
    pylate_settings = {"query_length": 20, "document_length": 30, "attend_to_expansion_tokens": True}
    jobs = [
        {"model_dir": str(tmp_path / "ours"), "out": str(tmp_path / "ours.npz")},
        {
            "create_from": str(hf_mlm_dir),
            "settings": pylate_settings,
            "model_dir": str(tmp_path / "pylate"),
            "out": str(tmp_path / "pylate.npz"),
        },
    ]
    for job in jobs:
        job.update(queries=COLBERT_TEXTS, documents=COLBERT_TEXTS)
    run_pylate(pylate_env, jobs, tmp_path)

    # ours, loaded by PyLate
    assert_same_colbert_outputs(ours, tmp_path / "ours.npz", COLBERT_TEXTS)
    # PyLate's, loaded by us, with its settings
    theirs = ColBERT.from_pretrained(tmp_path / "pylate", device="cpu")
    assert (theirs.query_length, theirs.document_length, theirs.attend_to_expansion_tokens) == (20, 30, True)
    assert_same_colbert_outputs(theirs, tmp_path / "pylate.npz", COLBERT_TEXTS)
