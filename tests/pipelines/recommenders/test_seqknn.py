import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipelines.data import Interactions
from pipelines.recommenders.seqknn import SeqKNN, sparse_topk_rows, window_cooccurrence
from tests.recommender_mixin import RecommenderContract


class TestSeqKNNContract(RecommenderContract):
    def make_model(self):
        return SeqKNN(window=3, neighbors=5, shrink=1.0)


def random_sequences(n_users=30, n_items=15, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(1, 10)), replace=False)
        ts = np.sort(rng.integers(0, 10_000, len(items)))  # ties possible: ordered by item then
        rows += [(f"u{u}", f"i{i}", int(t), 1.0) for i, t in zip(items, ts)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    return Interactions.build(df, None, [f"i{i}" for i in range(n_items)])


def brute_window(data: Interactions, window: int, decay: float) -> np.ndarray:
    C = np.zeros((data.n_items, data.n_items))
    d = data.df.sort_values(["uidx", "timestamp", "iidx"], kind="stable")
    for _, g in d.groupby("uidx"):
        s = g["iidx"].to_numpy()
        for a in range(len(s)):
            for b in range(a + 1, min(len(s), a + window + 1)):
                if s[a] != s[b]:
                    w = decay ** (b - a - 1)
                    C[s[a], s[b]] += w
                    C[s[b], s[a]] += w
    return C


@pytest.mark.parametrize("window,decay", [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_window_cooccurrence_matches_brute_force_and_never_crosses_users(window, decay):
    data = random_sequences()
    want = brute_window(data, window, decay)
    got = window_cooccurrence(data, window, decay).toarray()
    np.testing.assert_allclose(got, want, atol=1e-9)
    # the user chunks of the accumulation do not matter (chunks cut users in the middle)
    tiny = window_cooccurrence(data, window, decay, chunk_pairs=2 * window).toarray()
    np.testing.assert_allclose(tiny, want, atol=1e-9)


def test_sparse_topk_rows_keeps_the_k_largest_per_row():
    rng = np.random.default_rng(1)
    M = sp.random(12, 20, density=0.4, random_state=2, format="csr") * 10
    for k in (1, 3, 50):
        got = sparse_topk_rows(M, k).toarray()
        dense = M.toarray()
        for r in range(dense.shape[0]):
            nz = dense[r][dense[r] != 0]
            keep = np.sort(nz)[::-1][:k]
            np.testing.assert_allclose(np.sort(got[r][got[r] != 0])[::-1], keep, rtol=1e-6)
    assert rng is not None


def test_scores_are_history_times_normalised_window_similarity():
    data = random_sequences(seed=3)
    m = SeqKNN(window=2, neighbors=100, shrink=2.0, alpha=0.5).fit(data)
    C = brute_window(data, 2, 1.0)
    pop = np.maximum(np.asarray(data.matrix().sum(0)).ravel(), 1.0)
    S = C / (np.sqrt(pop)[:, None] * np.sqrt(pop)[None, :] + 2.0)
    X = data.matrix().toarray()
    sc = m.score_users(np.arange(data.n_users))
    warm = np.isfinite(sc[0])
    np.testing.assert_allclose(sc[:, warm], (X @ S)[:, warm], atol=2e-6)


def test_sequence_neighbours_beat_items_of_the_same_history_far_apart():
    """Every user watches the whole chain a0 -> a1 -> ... -> a9 in order: plain co-occurrence
    relates a4 to every other item alike, the sequence window to its neighbours a3 and a5."""
    from pipelines.recommenders.knn import ItemKNN

    rows = [(f"u{u}", f"a{i}", 1_000 + t, 1.0) for u in range(30) for t, i in enumerate(range(10))]
    rows.append(("probe", "a4", 5_000, 1.0))
    data = Interactions.build(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp",
                                                          "rating"]))
    m = SeqKNN(window=1, neighbors=10, shrink=0.0).fit(data)
    assert set(m.recommend(["probe"], k=2)[0]) == {"a3", "a5"}
    probe = data.user_index(["probe"])
    near, far = data.item_index(["a3", "a0"])
    sc = m.score_users(probe)[0]
    assert sc[near] > sc[far] + 0.1
    plain = ItemKNN(neighbors=10).fit(data).score_users(probe)[0]
    assert plain[near] == pytest.approx(plain[far], abs=1e-5)


@pytest.mark.parametrize("bad", [{"window": 0}, {"decay": 0.0}, {"decay": 1.5}, {"neighbors": 0},
                                 {"shrink": -1.0}, {"alpha": 2.0}])
def test_bad_params_are_rejected(bad):
    with pytest.raises(ValueError, match="seqknn"):
        SeqKNN(**bad)
