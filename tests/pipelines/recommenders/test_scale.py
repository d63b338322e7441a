"""Scale guards of the models: candidate-pool kNN, bounded encoder epochs, batched validation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipelines.data import Interactions
from pipelines.recommenders import UserKNN
from pipelines.recommenders.knn import cosine_topk


def _random_matrix(n_rows=60, n_cols=40, density=0.2, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.random(n_rows, n_cols, density=density, format="csr", random_state=rng,
                     data_rvs=lambda k: rng.uniform(0.5, 2.0, k)).astype(np.float32)


def _brute(X, neighbors, shrink, alpha, allowed):
    """Dense reference: per column j the top-k allowed i != j by the shrunk asymmetric cosine."""
    D = X.toarray().astype(np.float64)
    sq = (D ** 2).sum(0)
    sq[sq == 0] = 1.0
    dots = D.T @ D
    sims = dots / (np.power(sq, alpha)[:, None] * np.power(sq, 1 - alpha)[None, :] + shrink)
    n = D.shape[1]
    out = np.zeros((n, n))
    for j in range(n):
        cand = [i for i in allowed if i != j and sims[i, j] > 0]
        best = sorted(cand, key=lambda i: -sims[i, j])[:neighbors]
        out[best, j] = sims[best, j]
    return out


@pytest.mark.parametrize("alpha,shrink", [(0.5, 0.0), (0.7, 5.0)])
def test_candidate_pool_restricts_neighbours_exactly(alpha, shrink):
    X = _random_matrix()
    n = X.shape[1]
    full = cosine_topk(X, 5, shrink, alpha=alpha)
    # every column as a candidate: the exact result
    same = cosine_topk(X, 5, shrink, alpha=alpha, candidates=np.arange(n))
    np.testing.assert_allclose(same.toarray(), full.toarray(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(full.toarray(), _brute(X, 5, shrink, alpha, range(n)), rtol=1e-4, atol=1e-6)
    # a pool: neighbours only from it, the best ones among it, small blocks change nothing
    pool = np.arange(0, n, 3)
    S = cosine_topk(X, 5, shrink, alpha=alpha, candidates=pool[::-1], block=7)
    assert set(S.nonzero()[0]) <= set(pool)
    np.testing.assert_allclose(S.toarray(), _brute(X, 5, shrink, alpha, pool), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="candidates"):
        cosine_topk(X, 5, candidates=np.array([n]))


def _interactions(n_users=50, n_items=30, seed=1) -> Interactions:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, int(rng.integers(2, 15)), replace=False):
            rows.append((f"u{u}", f"i{i}", 1000 + len(rows), 1.0))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    return Interactions.build(df)


def test_userknn_candidate_pool_is_the_most_active_users():
    data = _interactions()
    exact = UserKNN(neighbors=5, max_candidates=0).fit(data)
    big = UserKNN(neighbors=5, max_candidates=10_000).fit(data)  # above the user count: exact
    np.testing.assert_allclose(big.nbr_.toarray(), exact.nbr_.toarray())
    pooled = UserKNN(neighbors=5, max_candidates=10).fit(data)
    lengths = np.diff(data.matrix().indptr)
    pool = set(np.argsort(-lengths, kind="stable")[:10])
    assert set(pooled.nbr_.nonzero()[1]) <= pool  # row u holds u's neighbours (columns)
    assert set(exact.nbr_.nonzero()[1]) - pool  # the exact neighbours go beyond the pool
    assert (pooled.nbr_.getnnz(axis=1) == 5).all()  # still 5 neighbours per user
    scores = pooled.score_users(np.arange(data.n_users))
    assert np.isfinite(scores[:, np.diff(data.matrix().tocsc().indptr) > 0]).all()
    with pytest.raises(ValueError, match="max_candidates"):
        UserKNN(max_candidates=-1)


torch = pytest.importorskip("torch")


def test_val_metrics_in_user_batches_equal_one_batch():
    from pipelines.recommenders.encoder import _Histories, _truth_keys, _val_metrics

    rng = np.random.default_rng(0)
    n_users, n_items = 37, 25
    fit = pd.DataFrame({"uidx": rng.integers(0, n_users, 300), "iidx": rng.integers(0, n_items, 300),
                        "timestamp": np.arange(300), "rating": 1.0}).drop_duplicates(["uidx", "iidx"])
    val = pd.DataFrame({"uidx": rng.integers(0, n_users, 60), "iidx": rng.integers(0, n_items, 60)})
    val = val.merge(fit[["uidx", "iidx"]], how="left", indicator=True)
    val = val[val["_merge"] == "left_only"].drop(columns="_merge")
    hist = _Histories.from_df(fit, n_users, (1.0, 1.0))
    U = rng.normal(size=(n_users, 5)).astype(np.float32)
    V = rng.normal(size=(n_items, 4)).astype(np.float32)
    b = rng.normal(size=n_items).astype(np.float32)
    keys = _truth_keys(val, n_items)
    one = _val_metrics(U, V, b, hist, keys, 5, batch_users=10_000)
    for bu in (1, 4, 16):
        assert _val_metrics(U, V, b, hist, keys, 5, batch_users=bu) == one
    # fit items are never recommended: a user whose every item but one is in fit gets that one
    assert 0 < one["recall@5"] <= 1


def test_max_samples_per_epoch_bounds_the_steps(tmp_path):
    from pipelines.data import Split
    from tasks import train_encoder
    from tests.tasks.test_train_encoder import TINY, write_split

    split = Split.load(write_split(tmp_path / "split"))  # 40 users with a history
    p = {**TINY, "epochs": 2, "samples_per_user": 1, "batch_size": 8}
    train_encoder.train(split, {}, p, workdir=tmp_path / "a")
    train_encoder.train(split, {}, {**p, "max_samples_per_epoch": 8}, workdir=tmp_path / "b")
    steps = [json.loads((tmp_path / w / "checkpoints/last/state.json").read_text())["step"]
             for w in ("a", "b")]
    assert steps == [2 * 5, 2 * 1]
