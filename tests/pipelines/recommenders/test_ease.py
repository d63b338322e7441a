import numpy as np
import pytest
import scipy.sparse as sp

from pipelines.recommenders.ease import EASE
from tests.fixtures import ml100k_path
from tests.recommender_mixin import RecommenderContract, evaluate_model, ml100k_split, planted_data


class TestEASEContract(RecommenderContract):
    def make_model(self):
        return EASE(lambda_=5.0)


def test_weights_solve_the_per_item_ridge_problem():
    # EASE column j = ridge regression of item j on all the other items
    data = planted_data(seed=2)
    lam = 3.0
    m = EASE(lambda_=lam).fit(data)
    X = data.matrix().toarray().astype(np.float64)
    for j in (0, 7, 13):
        others = np.delete(np.arange(X.shape[1]), j)
        A = X[:, others]
        b = np.linalg.solve(A.T @ A + lam * np.eye(len(others)), A.T @ X[:, j])
        np.testing.assert_allclose(m.B_[others, j], b, atol=1e-5)
        assert m.B_[j, j] == 0.0
    assert m.B_.dtype == np.float32


def test_scores_are_history_times_B():
    data = planted_data()
    m = EASE(lambda_=2.0).fit(data)
    X = data.matrix()
    u = np.arange(5)
    sc = m.score_users(u)
    warm = np.isfinite(sc[0])
    np.testing.assert_allclose(sc[:, warm], (X[u] @ m.B_)[:, warm], atol=2e-6)


def test_too_many_items_is_a_clear_error():
    df = planted_data()
    with pytest.raises(ValueError, match="max_items.*itemknn"):
        EASE(max_items=df.n_items - 1).fit(df)
    EASE(max_items=df.n_items).fit(df)  # at the limit is fine


def test_lambda_must_be_positive_and_alias():
    with pytest.raises(ValueError, match="lambda"):
        EASE(lambda_=0.0)
    assert EASE(**{"lambda": 7}).params["lambda_"] == 7.0


def test_sparse_input_stays_sparse_in_state():
    m = EASE(lambda_=5.0).fit(planted_data())
    assert sp.issparse(m.X_)


@pytest.mark.slow
@pytest.mark.integration
def test_ease_ndcg_on_ml100k():
    path = ml100k_path()
    if not (path / "ratings.csv").exists():
        pytest.skip(f"dataset not found at {path}")
    train, truth = ml100k_split(path)
    m = evaluate_model(EASE(lambda_=300.0), train, truth)
    assert m["n_users"] == 943
    assert m["ndcg@10"] >= 0.45, m
