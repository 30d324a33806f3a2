"""Our metrics against pytrec_eval's and BEIR's own evaluation of the same runs."""

from __future__ import annotations

import math
import random

import pytest
import pytrec_eval
from beir.retrieval.evaluation import EvaluateRetrieval
from mbert_retrieval.evaluation.data import DataFormatError
from mbert_retrieval.evaluation.metrics import evaluate_per_query, evaluate_run, read_trec_run, write_trec_run


def random_run(seed: int, n_queries: int = 30, n_docs: int = 400, depth: int = 100):
    """Graded qrels and a run with distinct scores (no ties, so every evaluator ranks alike)."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        relevant = rng.sample(docs, rng.randint(1, 6))
        qrels[f"q{q}"] = {d: rng.randint(1, 3) for d in relevant}
        if q % 7 == 0:
            qrels[f"q{q}"][rng.choice(docs)] = 0  # judged non-relevant
        retrieved = rng.sample(docs, depth)
        # Put some relevant documents in the run at random places.
        for d in relevant[: rng.randint(0, len(relevant))]:
            if d not in retrieved:
                retrieved[rng.randrange(depth)] = d
        scores = rng.sample(range(10 * depth), len(set(retrieved)))
        run[f"q{q}"] = {d: s / 7.0 for d, s in zip(dict.fromkeys(retrieved), scores)}
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_pytrec_eval(seed):
    qrels, run = random_run(seed)
    ours = evaluate_run(qrels, run)
    direct = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.10", "recall.100", "map", "recip_rank"}
    ).evaluate(run)

    def mean(measure):
        return sum(scores[measure] for scores in direct.values()) / len(direct)

    assert ours["NDCG@10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-12)
    assert ours["Recall@100"] == pytest.approx(mean("recall_100"), abs=1e-12)
    assert ours["MAP"] == pytest.approx(mean("map"), abs=1e-12)
    # Unlimited reciprocal rank is never below the @10 one, and equal when every first hit is in the top 10.
    assert ours["MRR@10"] <= mean("recip_rank") + 1e-12


@pytest.mark.parametrize("seed", [0, 3])
def test_equal_to_beir(seed):
    qrels, run = random_run(seed)
    ours = evaluate_run(qrels, run)
    ndcg, map_at, recall, _ = EvaluateRetrieval.evaluate(qrels, run, [10, 100], ignore_identical_ids=False)
    mrr = EvaluateRetrieval.evaluate_custom(qrels, run, [10], metric="mrr")
    # BEIR rounds to 5 decimals.
    assert ours["NDCG@10"] == pytest.approx(ndcg["NDCG@10"], abs=1e-5)
    assert ours["Recall@100"] == pytest.approx(recall["Recall@100"], abs=1e-5)
    assert ours["MAP"] == pytest.approx(map_at["MAP@100"], abs=1e-5)  # the run is 100 deep
    assert ours["MRR@10"] == pytest.approx(mrr["MRR@10"], abs=1e-5)


def test_hand_computed_query():
    """One query, relevant documents at ranks 2 (grade 2) and 5 (grade 1), a third never retrieved."""
    qrels = {"q": {"r2": 2, "r5": 1, "missing": 1}}
    ranking = ["n1", "r2", "n3", "n4", "r5"] + [f"n{i}" for i in range(6, 12)]
    run = {"q": {d: 100.0 - i for i, d in enumerate(ranking)}}
    metrics = evaluate_run(qrels, run)
    dcg = (2**2 - 1) / math.log2(3) + (2**1 - 1) / math.log2(6)
    ideal = (2**2 - 1) / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    # trec_eval's ndcg uses gain = relevance (not 2^rel - 1); check against that definition too.
    dcg_linear = 2 / math.log2(3) + 1 / math.log2(6)
    ideal_linear = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert metrics["NDCG@10"] == pytest.approx(dcg_linear / ideal_linear)
    assert metrics["NDCG@10"] != pytest.approx(dcg / ideal)
    assert metrics["MRR@10"] == pytest.approx(1 / 2)
    assert metrics["Recall@100"] == pytest.approx(2 / 3)
    assert metrics["MAP"] == pytest.approx((1 / 2 + 2 / 5) / 3)


def test_mrr_is_cut_at_ten():
    qrels = {"q": {"hit": 1}}
    ranking = [f"n{i}" for i in range(10)] + ["hit"]
    run = {"q": {d: 50.0 - i for i, d in enumerate(ranking)}}
    metrics = evaluate_run(qrels, run)
    assert metrics["MRR@10"] == 0.0
    assert metrics["MAP"] == pytest.approx(1 / 11)


def test_queries_missing_from_the_run_count_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0, "x": 0.5}}
    per_query = evaluate_per_query(qrels, run)
    assert per_query["q2"] == {"NDCG@10": 0.0, "Recall@100": 0.0, "MAP": 0.0, "MRR@10": 0.0}
    assert evaluate_run(qrels, run)["NDCG@10"] == pytest.approx(0.5)


def test_trec_run_round_trip(tmp_path):
    _, run = random_run(5, n_queries=4, depth=20)
    path = write_trec_run(tmp_path / "run.trec", run, tag="test")
    lines = path.read_text().splitlines()
    assert len(lines) == 4 * 20
    first = lines[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "test"
    best = max(run[first[0]].items(), key=lambda item: item[1])
    assert first[2] == best[0]
    loaded = read_trec_run(path)
    assert loaded.keys() == run.keys()
    for q in run:
        assert loaded[q] == pytest.approx(run[q], abs=1e-6)


def test_trec_run_rejects_ids_with_spaces(tmp_path):
    with pytest.raises(ValueError, match="spaces"):
        write_trec_run(tmp_path / "run.trec", {"q 1": {"d": 1.0}})
    (tmp_path / "bad.trec").write_text("q Q0 d 1 notanumber tag\n")
    with pytest.raises(DataFormatError, match="line 1"):
        read_trec_run(tmp_path / "bad.trec")


@pytest.mark.slow
def test_without_pytrec_eval_data_sets_still_build_and_metrics_say_what_to_install(tmp_path):
    """Only the metrics need the `eval` extra: building a code data set works without pytrec_eval."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys; sys.modules['pytrec_eval'] = None\n"
        "from evaluation.code_dataset import build_code_dataset\n"
        "from evaluation.metrics import evaluate_run\n"
        "try:\n"
        "    evaluate_run({'q': {'d': 1}}, {'q': {'d': 1.0}})\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root
    )
    assert "pip install 'mbert-retrieval[eval]'" in done.stdout
