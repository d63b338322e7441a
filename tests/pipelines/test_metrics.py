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


def _naive(reco, truth, k):
    """The textbook definitions, one user at a time (the reference for the vectorised code)."""
    out = {m: [] for m in ("precision", "recall", "ndcg", "map", "hitrate")}
    for row, t in zip(reco, truth):
        hits = [x in t for x in row[:k]]
        out["precision"].append(sum(hits) / k)
        out["recall"].append(sum(hits) / max(len(t), 1))
        dcg = sum(h / np.log2(j + 2) for j, h in enumerate(hits))
        idcg = sum(1 / np.log2(j + 2) for j in range(min(len(t), k)))
        out["ndcg"].append(dcg / idcg if idcg else 0.0)
        ap = sum(sum(hits[:j + 1]) / (j + 1) for j, h in enumerate(hits) if h)
        out["map"].append(ap / max(min(len(t), k), 1))
        out["hitrate"].append(float(any(hits)))
    return {m: np.asarray(v) for m, v in out.items()}


@pytest.mark.parametrize("ids", ["index", "string"])
@pytest.mark.parametrize("seed", range(25))
def test_vectorised_metrics_match_the_textbook_definitions(seed, ids):
    rng = np.random.default_rng(seed)
    n, n_items, k = int(rng.integers(1, 40)), int(rng.integers(1, 30)), int(rng.integers(1, 12))
    reco = rng.integers(-1, n_items, size=(n, k + int(rng.integers(0, 3))))
    truth = [set(rng.choice(n_items, int(rng.integers(0, min(n_items, 8) + 1)), replace=False).tolist())
             for _ in range(n)]
    truth[0] = {n_items + 5}  # an item no ranking holds (larger than every recommended index)
    if ids == "string":  # item id strings, None as padding
        reco = np.array([[None if x < 0 else f"i{x}" for x in row] for row in reco], dtype=object)
        truth = [{f"i{x}" for x in t} for t in truth]
    want = _naive(reco, truth, k)
    for name, fn in metrics.METRICS.items():
        np.testing.assert_allclose(fn(reco, truth, k), want[name], atol=1e-12, err_msg=name)
    got = metrics.evaluate(reco, truth, [1, k], n_items=n_items)
    keep = [i for i, t in enumerate(truth) if t]
    for name in want:
        assert got[f"{name}@{k}"] == pytest.approx(want[name][keep].mean(), abs=1e-12)
        assert got[f"{name}@1"] == pytest.approx(_naive(reco[keep], [truth[i] for i in keep], 1)[name].mean(),
                                                 abs=1e-12)


def test_a_ranking_shorter_than_k_is_refused():
    with pytest.raises(ValueError, match="expected"):
        metrics.ndcg(np.zeros((2, 3), np.int64), [{0}, {1}], 5)
