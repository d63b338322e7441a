import numpy as np
import pytest

from pipelines.recommenders.knn import cosine_topk
from pipelines.recommenders.userknn import UserKNN
from tests.recommender_mixin import COLD_USER, RecommenderContract, planted_data


class TestUserKNNContract(RecommenderContract):
    def make_model(self):
        return UserKNN(neighbors=5, shrink=1.0)


class TestUserKNNWeightedContract(RecommenderContract):
    def make_model(self):
        return UserKNN(neighbors=8, feature_weighting="tfidf")


def test_scores_are_neighbour_weighted_histories():
    data = planted_data(seed=4)
    k, shrink = 3, 0.5
    m = UserKNN(neighbors=k, shrink=shrink, feature_weighting="none").fit(data)
    X = data.matrix()
    D = X.toarray().astype(np.float64)
    norms = np.sqrt(D.sum(1))
    sims = D @ D.T / (np.outer(norms, norms) + shrink)
    np.fill_diagonal(sims, 0.0)
    n_active = data.n_users - 1
    sc = m.score_users(np.arange(n_active))
    warm = np.isfinite(sc[0])
    for u in range(n_active):
        top = np.argsort(-sims[u], kind="stable")[:k]
        # ties at the k-th place may be resolved either way: only check when unambiguous
        if sims[u, top[-1]] == np.sort(sims[u])[::-1][k]:
            continue
        expected = sims[u, top] @ D[top]
        np.testing.assert_allclose(sc[u, warm], expected[warm], atol=2e-6)
    # the neighbour matrix is sparse: at most k neighbours per user
    assert np.diff(m.nbr_.indptr).max() <= k
    assert cosine_topk(X.T.tocsr(), k, shrink).nnz == m.nbr_.nnz


def test_cold_user_gets_popularity_not_neighbours():
    data = planted_data()
    m = UserKNN(neighbors=5).fit(data)
    cold = data.user_index([COLD_USER])
    sc = m.score_users(cold)[0]
    finite = np.isfinite(sc)
    assert sc[finite].max() <= 1e-6  # only the popularity prior
    pop = np.asarray(data.matrix().sum(0)).ravel()
    assert np.array_equal(finite, pop > 0)
    order = np.argsort(-sc[finite], kind="stable")
    assert (np.diff(pop[finite][order]) <= 0).all()


def test_invalid_feature_weighting():
    with pytest.raises(ValueError, match="feature_weighting"):
        UserKNN(feature_weighting="tf")


@pytest.mark.slow
@pytest.mark.integration
def test_userknn_ndcg_on_ml100k():
    from tests.fixtures import ml100k_path
    from tests.recommender_mixin import evaluate_model, ml100k_split

    path = ml100k_path()
    if not (path / "ratings.csv").exists():
        pytest.skip(f"dataset not found at {path}")
    train, truth = ml100k_split(path)
    m = evaluate_model(UserKNN(), train, truth)
    assert m["n_users"] == 943
    assert m["ndcg@10"] >= 0.40, m
