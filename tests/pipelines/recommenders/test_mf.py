import numpy as np
import pandas as pd
import pytest

from pipelines.data import Interactions
from pipelines.recommenders.ease import EASE
from pipelines.recommenders.mf import ALS, BPR
from tests.recommender_mixin import COLD_ITEMS, COLD_USER, RecommenderContract, planted_data


class TestALSContract(RecommenderContract):
    def make_model(self):
        # num_threads=0 (all cores): ALS must still be deterministic
        return ALS(factors=4, regularization=3.0, iterations=15, random_state=7, num_threads=0)


class TestBPRContract(RecommenderContract):
    def make_model(self):
        # BPR is lock-free parallel SGD: bit-for-bit reproducible with one thread only
        return BPR(factors=8, learning_rate=0.05, iterations=100, random_state=7, num_threads=1)


@pytest.mark.parametrize("cls,dim", [(ALS, 4), (BPR, 5)])
def test_factor_shapes_and_cold_items(cls, dim):
    data = planted_data()
    m = cls(factors=4, iterations=5, num_threads=1).fit(data)
    assert m.user_factors_.shape == (data.n_users, dim) and m.item_factors_.shape == (data.n_items, dim)
    assert m.user_factors_.dtype == np.float32
    u = data.user_index(["ua00", "ub03", COLD_USER])
    sc = m.score_users(np.r_[u, -1])
    cold = data.item_index(list(COLD_ITEMS))
    assert np.isneginf(sc[:, cold]).all()
    warm = np.setdiff1d(np.arange(data.n_items), cold)
    np.testing.assert_allclose(sc[:2, warm], m.user_factors_[u[:2]] @ m.item_factors_[warm].T, rtol=1e-6)
    # users without history (catalogue cold user, unknown id) are ranked by popularity
    pop = np.asarray(data.matrix().sum(0)).ravel()
    np.testing.assert_array_equal(sc[2], sc[3])
    np.testing.assert_allclose(sc[2, warm], pop[warm] / pop.max(), rtol=1e-6)


def test_seed_changes_the_model():
    data = planted_data()
    a = ALS(factors=4, random_state=1).fit(data)
    b = ALS(factors=4, random_state=2).fit(data)
    assert not np.allclose(a.user_factors_, b.user_factors_)


def test_als_warm_start_continues_training_exactly():
    data = planted_data()
    kw = dict(factors=4, regularization=0.5, random_state=3, num_threads=1)
    full = ALS(iterations=10, **kw).fit(data)
    first = ALS(iterations=4, **kw).fit(data)
    resumed = ALS(iterations=6, **kw).fit(data, init=first)
    np.testing.assert_allclose(resumed.user_factors_, full.user_factors_, atol=1e-5)
    np.testing.assert_allclose(resumed.item_factors_, full.item_factors_, atol=1e-5)
    # the arrays form is equivalent to passing the model
    arrays = ALS(iterations=6, **kw).fit(data, init=(first.user_factors_, first.item_factors_))
    np.testing.assert_array_equal(arrays.user_factors_, resumed.user_factors_)


@pytest.mark.parametrize("cls", [ALS, BPR])
def test_warm_start_aligns_by_id_on_a_changed_catalogue(cls):
    old = planted_data()
    prev = cls(factors=4, iterations=5, num_threads=1).fit(old)
    # new data: one user gone, one new user, one new item; catalogue order differs
    df = old.df[old.df["user_id"] != "ua00"][["user_id", "item_id", "timestamp", "rating"]]
    extra = pd.DataFrame({"user_id": ["new_user"] * 2, "item_id": ["a1", "new_item"],
                          "timestamp": [1, 2], "rating": [1.0, 1.0]})
    new = Interactions.build(pd.concat([extra, df], ignore_index=True),
                             sorted(set(df["user_id"]) | {"new_user"}, reverse=True),
                             sorted(set(df["item_id"]) | {"new_item"}, reverse=True))
    m = cls(factors=4, iterations=0, num_threads=1).fit(new, init=prev)  # 0 epochs: init only
    for uid in ("ub05", "ua03"):
        np.testing.assert_array_equal(m.user_factors_[new.user_index([uid])[0]],
                                      prev.user_factors_[old.user_index([uid])[0]])
    for iid in ("a1", "b9"):
        np.testing.assert_array_equal(m.item_factors_[new.item_index([iid])[0]],
                                      prev.item_factors_[old.item_index([iid])[0]])
    assert np.isfinite(m.user_factors_[new.user_index(["new_user"])[0]]).all()
    # and training from there works
    cls(factors=4, iterations=3, num_threads=1).fit(new, init=prev)


def test_warm_start_rejects_mismatched_init():
    data = planted_data()
    prev = ALS(factors=4, iterations=2).fit(data)
    with pytest.raises(ValueError, match="factor"):
        ALS(factors=8, iterations=2).fit(data, init=prev)
    with pytest.raises(ValueError, match="fitted 'bpr'"):
        BPR(factors=4, iterations=2).fit(data, init=prev)
    with pytest.raises(ValueError, match="fitted 'als'"):
        ALS(factors=4).fit(data, init=EASE().fit(data))
    with pytest.raises(ValueError, match="shapes"):
        ALS(factors=4).fit(data, init=(prev.user_factors_[:-1], prev.item_factors_))
    with pytest.raises(ValueError, match="pair"):
        ALS(factors=4).fit(data, init=42)


@pytest.mark.slow
@pytest.mark.integration
def test_als_ndcg_on_ml100k():
    from tests.fixtures import ml100k_path
    from tests.recommender_mixin import evaluate_model, ml100k_split

    path = ml100k_path()
    if not (path / "ratings.csv").exists():
        pytest.skip(f"dataset not found at {path}")
    train, truth = ml100k_split(path)
    m = evaluate_model(ALS(num_threads=1), train, truth)
    assert m["n_users"] == 943
    assert m["ndcg@10"] >= 0.45, m


def test_bpr_auto_threads_is_serial_on_small_data_and_parallel_above(monkeypatch):
    from pipelines.recommenders import mf

    assert mf._thread_count("auto", mf.BPR_SERIAL_MAX_ROWS) == 1
    assert mf._thread_count("auto", mf.BPR_SERIAL_MAX_ROWS + 1) == 0
    assert mf._thread_count(3, 10) == 3
    data = planted_data()
    kw = dict(factors=4, learning_rate=0.05, iterations=20, random_state=7)
    a = BPR(num_threads="auto", **kw).fit(data)
    b = BPR(num_threads=1, **kw).fit(data)
    # below the limit: the single-threaded fit, bit for bit
    np.testing.assert_array_equal(a.item_factors_, b.item_factors_)
    seen = []
    real = mf._thread_count
    monkeypatch.setattr(mf, "_thread_count", lambda v, nnz: seen.append(real(v, nnz)) or seen[-1])
    monkeypatch.setattr(mf, "BPR_SERIAL_MAX_ROWS", data.matrix().nnz - 1)
    BPR(num_threads="auto", **kw).fit(data)
    assert seen == [0]


@pytest.mark.parametrize("bad", ["two", -1, True, None, 1.5j])
def test_num_threads_must_be_auto_or_a_count(bad):
    with pytest.raises(ValueError, match="num_threads must be 'auto' or an integer"):
        BPR(num_threads=bad)


def test_auto_threads_survive_save_and_load(tmp_path):
    from pipelines.recommenders import Recommender

    m = BPR(factors=4, iterations=3, num_threads="auto").fit(planted_data())
    m.save(tmp_path / "bpr")
    back = Recommender.load(tmp_path / "bpr")
    assert back.params["num_threads"] == "auto"
    np.testing.assert_array_equal(back.item_factors_, m.item_factors_)
