import pytest

pytest.importorskip("pytrec_eval")

from mbert_retrieval.evaluation.fusion import fuse_runs, fusion_sweep  # noqa: E402


def test_sweep_ends_are_the_two_runs_and_the_middle_can_beat_both():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    dense = {"q1": {"a": 0.9, "x": 0.5, "z": 0.4}, "q2": {"x": 0.9, "b": 0.85, "y": 0.1}}
    lexical = {"q1": {"x": 9.0, "a": 8.0, "w": 0.0}, "q2": {"b": 7.0, "y": 6.9, "x": 1.0}}
    sweep = fusion_sweep(qrels, dense, lexical, weights=(0.0, 0.5, 1.0))
    assert sweep[1.0]["MRR@10"] == pytest.approx((1 + 0.5) / 2)  # dense: a first, b second
    assert sweep[0.0]["MRR@10"] == pytest.approx((0.5 + 1) / 2)  # BM25: a second, b first
    assert sweep[0.5]["MRR@10"] == pytest.approx(1.0)  # fused: both first


def test_fused_runs_keep_depth():
    dense = {"q": {str(i): 1 - i / 100 for i in range(50)}}
    lexical = {"q": {str(i + 25): 50 - i for i in range(50)}}
    assert len(fuse_runs(dense, lexical, 0.5, depth=30)["q"]) == 30
