import numpy as np
import pytest

from pipelines import metrics


def test_perfect_and_empty_rankings():
    reco = np.array([[0, 1, 2], [5, 6, 7]])
    truth = [{0, 1, 2}, {9}]
    assert metrics.precision(reco, truth, 3).tolist() == [1.0, 0.0]
    assert metrics.recall(reco, truth, 3).tolist() == [1.0, 0.0]
    assert metrics.ndcg(reco, truth, 3) == pytest.approx([1.0, 0.0])
    assert metrics.hitrate(reco, truth, 3).tolist() == [1.0, 0.0]


def test_ndcg_and_map_by_hand():
    reco = np.array([[3, 0, 4, 1]])
    truth = [{0, 1}]
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    idcg = 1 + 1 / np.log2(3)
    assert metrics.ndcg(reco, truth, 4)[0] == pytest.approx(dcg / idcg)
    assert metrics.map_(reco, truth, 4)[0] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert metrics.recall(reco, truth, 2)[0] == pytest.approx(0.5)


def test_padding_never_counts_as_hit():
    reco = np.array([[-1, -1]])
    assert metrics.precision(reco, [{0}], 2)[0] == 0.0


def test_evaluate_skips_users_without_truth_and_reports_coverage():
    reco = np.array([[0, 1], [2, 3], [0, 2]])
    out = metrics.evaluate(reco, [{0}, set(), {2}], ks=[1, 2], n_items=10)
    assert out["n_users"] == 2
    assert out["precision@1"] == pytest.approx(0.5)  # user 0 hit, user 2 miss at 1
    assert out["hitrate@2"] == pytest.approx(1.0)
    assert out["coverage@2"] == pytest.approx(3 / 10)
    assert metrics.evaluate(reco, [set(), set(), set()], ks=[1]) == {"n_users": 0.0}
