import numpy as np
import pytest
import scipy.sparse as sp

from pipelines.recommenders.knn import ItemKNN, cosine_topk, feature_weight
from tests.fixtures import ml100k_path
from tests.recommender_mixin import RecommenderContract, evaluate_model, ml100k_split, planted_data


class TestItemKNNContract(RecommenderContract):
    def make_model(self):
        return ItemKNN(neighbors=5, shrink=1.0)


class TestItemKNNWeightedContract(RecommenderContract):
    def make_model(self):
        return ItemKNN(neighbors=5, shrink=0.0, alpha=0.7, feature_weighting="bm25")


def random_binary(n_rows=40, n_cols=25, density=0.2, seed=0):
    X = sp.random(n_rows, n_cols, density=density, format="csr", random_state=seed, dtype=np.float32)
    X.data[:] = 1.0
    return X


def brute_sims(X, shrink=0.0, alpha=0.5):
    D = X.toarray().astype(np.float64)
    sq = (D ** 2).sum(0)
    denom = np.outer(sq ** alpha, sq ** (1 - alpha)) + shrink
    with np.errstate(divide="ignore", invalid="ignore"):
        S = np.where(denom > 0, D.T @ D / denom, 0.0)
    np.fill_diagonal(S, 0.0)
    return S


@pytest.mark.parametrize("shrink,alpha", [(0.0, 0.5), (3.0, 0.5), (0.0, 0.8), (2.0, 0.2)])
def test_cosine_topk_matches_brute_force(shrink, alpha):
    X = random_binary()
    k = 4
    S = cosine_topk(X, k, shrink, alpha=alpha).toarray()
    ref = brute_sims(X, shrink, alpha)
    for j in range(X.shape[1]):
        col = S[:, j]
        kept = np.nonzero(col)[0]
        assert len(kept) <= k and col[j] == 0.0
        np.testing.assert_allclose(col[kept], ref[kept, j], rtol=1e-5)
        # the kept ones are the k largest (up to ties)
        kth = np.sort(ref[:, j])[::-1][min(k, len(ref)) - 1]
        assert (ref[kept, j] >= kth - 1e-6).all()
        assert len(kept) == min(k, int((ref[:, j] > 0).sum()))


def test_cosine_topk_block_size_does_not_matter():
    X = random_binary(seed=3)
    a = cosine_topk(X, 6, 1.0, block=1).toarray()
    b = cosine_topk(X, 6, 1.0, block=7).toarray()
    c = cosine_topk(X, 6, 1.0).toarray()
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-6)


def test_cosine_topk_rejects_bad_arguments():
    X = random_binary()
    for kw in ({"neighbors": 0}, {"neighbors": 3, "alpha": 1.5}, {"neighbors": 3, "shrink": -1}):
        with pytest.raises(ValueError):
            cosine_topk(X, **kw)


def test_feature_weight_downweights_common_features():
    # feature (row) 0 occurs in every column, feature 1 only in column 0
    X = sp.csr_matrix(np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=np.float32))
    for method in ("tfidf", "bm25"):
        W = feature_weight(X, method).toarray()
        assert W.shape == X.shape and (W[X.toarray() == 0] == 0).all()
        assert (W[X.toarray() > 0] > 0).all()
        assert W[1, 0] > W[0, 0]
    np.testing.assert_array_equal(feature_weight(X, "none").toarray(), X.toarray())
    with pytest.raises(ValueError, match="feature_weighting"):
        feature_weight(X, "idf2")
    with pytest.raises(ValueError, match="feature_weighting"):
        ItemKNN(feature_weighting="nope")


def test_itemknn_scores_are_history_times_similarity():
    data = planted_data()
    m = ItemKNN(neighbors=4, shrink=2.0).fit(data)
    X = data.matrix()
    S = cosine_topk(X, 4, 2.0).toarray()
    u = np.arange(data.n_users - 1)  # the last user is the cold one
    sc = m.score_users(u)
    expected = X[u].toarray() @ S
    warm = np.isfinite(sc[0])
    np.testing.assert_allclose(sc[:, warm], expected[:, warm], atol=2e-6)
    # cold items (no training interaction) are unscorable
    cold = data.item_index(["cold_a", "cold_b"])
    assert np.isneginf(sc[:, cold]).all()


@pytest.mark.slow
@pytest.mark.integration
def test_itemknn_ndcg_on_ml100k():
    path = ml100k_path()
    if not (path / "ratings.csv").exists():
        pytest.skip(f"dataset not found at {path}")
    train, truth = ml100k_split(path)
    m = evaluate_model(ItemKNN(neighbors=100), train, truth)
    assert m["n_users"] == 943
    assert m["ndcg@10"] >= 0.40, m


def test_cosine_topk_keeps_everything_when_neighbors_exceed_columns():
    X = random_binary(n_cols=12, seed=5)
    S = cosine_topk(X, 50, 1.5).toarray()
    ref = brute_sims(X, 1.5)
    np.testing.assert_allclose(S, np.where(ref > 0, ref, 0.0), rtol=1e-5)
