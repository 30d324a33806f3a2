import pytest

from mbert_retrieval.search.fusion import convex_fusion


def test_convex_fusion_is_the_weighted_mean_of_normalised_scores():
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]
    lexical = [("c", 12.0), ("d", 6.0), ("a", 3.0)]
    fused = dict(convex_fusion([dense, lexical], weights=[0.75, 0.25]))
    assert fused["a"] == pytest.approx(0.75 * 1.0 + 0.25 * 0.0)
    assert fused["b"] == pytest.approx(0.75 * 0.5)
    assert fused["c"] == pytest.approx(0.75 * 0.0 + 0.25 * 1.0)
    assert fused["d"] == pytest.approx(0.25 * (6 - 3) / 9)
    assert [d for d, _ in convex_fusion([dense, lexical], [0.75, 0.25])] == ["a", "b", "c", "d"]


def test_first_in_every_ranking_scores_one_and_empty_rankings_take_no_part():
    assert convex_fusion([[("x", 3.0), ("y", 1.0)], [("x", 0.2)]], [0.5, 0.5])[0] == ("x", 1.0)
    alone = convex_fusion([[("x", 0.8), ("y", 0.4)], []], [0.6, 0.4])
    assert alone == [("x", 1.0), ("y", 0.0)]
    assert convex_fusion([[], []], [0.5, 0.5]) == []


def test_weight_zero_leaves_the_other_ranking_unchanged():
    dense = [("a", 0.9), ("b", 0.8)]
    lexical = [("b", 5.0), ("c", 1.0)]
    assert [d for d, _ in convex_fusion([dense, lexical], [1.0, 0.0])] == ["a", "b"]


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="2 weights for 1 rankings"):
        convex_fusion([[("a", 1.0)]], [0.5, 0.5])
    with pytest.raises(ValueError, match="must not be negative"):
        convex_fusion([[("a", 1.0)], []], [1.5, -0.5])
