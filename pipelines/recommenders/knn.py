"""Neighbourhood models on sparse matrices with top-k pruning.

Similarity is (asymmetric) cosine with shrinkage,

    sim(i, j) = <x_i, x_j> / (|x_i|^(2 alpha) |x_j|^(2 (1 - alpha)) + shrink)

(``alpha = 0.5`` is plain cosine), computed in column blocks so that memory
stays bounded by ``n_rows * block`` floats (``block`` is sized from a memory
budget); only the ``neighbors`` largest similarities per column are kept
(a sparse n_cols x n_cols matrix).  Optionally the interaction matrix is
re-weighted before the similarity (``feature_weighting``: ``"tfidf"`` or
``"bm25"`` down-weight the features that occur everywhere, e.g. very active
users when comparing items).

Shared helpers for the other CF models live here too: the popularity prior
used as tie-breaker / cold-user fallback, and validated (de)serialisation of
CSR matrices as plain numpy arrays.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..data import Interactions, item_popularity
from .base import Recommender, topk

FEATURE_WEIGHTINGS = ("none", "tfidf", "bm25")
_BLOCK_BYTES = 256 * 2**20  # dense scratch per block (float32 dots + sims)


def feature_weight(X: sp.csr_matrix, method: str = "none", k1: float = 1.2,
                   b: float = 0.75) -> sp.csr_matrix:
    """Re-weight the rows of ``X`` (the features of the columns being compared).

    ``X`` is rows = features x columns = objects to compare (users x items
    for item similarity).  ``tfidf``: x_fc * log(n_cols / df_f) with df_f the
    number of columns feature f occurs in; ``bm25``: the Okapi BM25 weight
    with the same idf and length normalisation over the column.
    """
    if method not in FEATURE_WEIGHTINGS:
        raise ValueError(f"feature_weighting must be one of {FEATURE_WEIGHTINGS}, got {method!r}")
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    if method == "none" or X.nnz == 0:
        return X
    n_cols = X.shape[1]
    df = np.diff(X.indptr).astype(np.float64)  # per row (feature)
    idf = np.log(n_cols / np.maximum(df, 1.0)) + 1e-6  # > 0 so no entry vanishes
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    if method == "tfidf":
        X.data = (X.data * idf[rows]).astype(np.float32)
        return X
    col_len = np.bincount(X.indices, minlength=n_cols).astype(np.float64)
    avg = col_len[col_len > 0].mean()
    length_norm = (1.0 - b) + b * col_len / avg
    tf = X.data.astype(np.float64)
    X.data = (tf * (k1 + 1.0) / (k1 * length_norm[X.indices] + tf) * idf[rows]).astype(np.float32)
    return X


def cosine_topk(X: sp.csr_matrix, neighbors: int, shrink: float = 0.0,
                block: int | None = None, alpha: float = 0.5,
                candidates: np.ndarray | None = None) -> sp.csr_matrix:
    """Column-wise top-``neighbors`` cosine similarity between columns of X.

    Returns a CSR matrix S (n_cols x n_cols) where column j holds the
    neighbours of j, the diagonal removed (only positive similarities are
    kept).  Scoring is ``x_u @ S``.  ``alpha`` != 0.5 gives the asymmetric
    cosine (the norm of the neighbour i is raised to ``2 alpha``, that of the
    target j to ``2 (1 - alpha)``).  ``block`` (columns per dense block)
    defaults to what fits a 256 MiB scratch budget.

    ``candidates`` (column indices): only these columns may be neighbours.  The
    cost is then ``n_cols x len(candidates)`` instead of ``n_cols^2``: linear in
    the number of columns for a fixed candidate pool (used by user-kNN on
    large user bases, where the pool is the most active users).
    """
    if neighbors < 1:
        raise ValueError(f"neighbors must be >= 1, got {neighbors}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if shrink < 0:
        raise ValueError(f"shrink must be >= 0, got {shrink}")
    X = sp.csc_matrix(X, dtype=np.float32)
    n = X.shape[1]
    cand = None if candidates is None else np.unique(np.asarray(candidates, dtype=np.int64))
    if cand is not None and (len(cand) == 0 or cand[0] < 0 or cand[-1] >= n):
        raise ValueError(f"candidates must be non-empty column indices in [0, {n})")
    m = n if cand is None else len(cand)  # columns of each dense block
    if block is None:
        block = int(max(1, min(4096, _BLOCK_BYTES // (12 * max(m, 1)))))
    sq = np.asarray(X.multiply(X).sum(axis=0), dtype=np.float64).ravel()
    sq[sq == 0] = 1.0  # an empty column has zero dot products anyway: avoid 0/0
    left = np.power(sq, alpha).astype(np.float32)  # neighbour side (rows of S)
    right = np.power(sq, 1.0 - alpha).astype(np.float32)  # target side (columns of S)
    Xt = X.T.tocsr()  # n x features: row slices are cheap
    Xn = X if cand is None else X[:, cand]  # the possible neighbours
    left_n = left if cand is None else left[cand]
    rows, cols, vals = [], [], []
    k = min(neighbors, max(n - 1, 1)) if cand is None else min(neighbors, m)
    for start in range(0, n, block):
        stop = min(start + block, n)
        b = stop - start
        # one row per target column j, one column per candidate neighbour i (contiguous rows)
        sims = (Xt[start:stop] @ Xn).toarray()  # b x m, float32
        denom = np.multiply.outer(right[start:stop], left_n)
        if shrink:
            denom += np.float32(shrink)
        np.divide(sims, denom, out=sims)
        del denom
        if cand is None:
            sims[np.arange(b), start + np.arange(b)] = 0.0
        else:  # a column is not its own neighbour
            tgt = np.arange(start, stop)
            pos = np.minimum(np.searchsorted(cand, tgt), m - 1)
            self_hit = cand[pos] == tgt
            sims[np.nonzero(self_hit)[0], pos[self_hit]] = 0.0
        if k < m:
            top = topk(sims, k)  # b x k (equal similarities: the lower index, on any CPU)
        else:
            top = np.broadcast_to(np.arange(m), (b, m))
        tv = np.take_along_axis(sims, top, axis=1)
        keep = tv > 0
        rows.append(top[keep] if cand is None else cand[top[keep]])
        cols.append(np.broadcast_to(np.arange(start, stop)[:, None], top.shape)[keep])
        vals.append(tv[keep])
    if not vals:
        return sp.csr_matrix((n, n), dtype=np.float32)
    S = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n, n), dtype=np.float32)
    S.sort_indices()
    return S


# ---- helpers shared by the CF models ------------------------------------

def popularity_prior(X: sp.csr_matrix, scale: float = 1e-6) -> np.ndarray:
    """Item popularity scaled to [0, scale], -inf for items never interacted with.

    Added to CF scores it breaks ties by popularity without changing the
    order of distinct scores; for a user with no history it *is* the ranking
    (popularity fallback); cold items stay unscorable (-inf).
    """
    pop = item_popularity(X).astype(np.float64)
    prior = pop / max(pop.max(), 1.0) * scale
    return np.where(pop > 0, prior, -np.inf).astype(np.float32)


def scores_with_prior(uidx: np.ndarray, prior: np.ndarray, score_known) -> np.ndarray:
    """``[len(uidx), n_items]`` float32: ``score_known(rows)`` for the users the model knows
    (``uidx >= 0``; it gets their indices and returns a dense or sparse matrix), plus the
    :func:`popularity_prior` ``prior`` for everyone (unknown users: the prior alone)."""
    uidx = np.asarray(uidx, dtype=np.int64)
    out = np.zeros((len(uidx), len(prior)), dtype=np.float32)
    known = uidx >= 0
    if known.any():
        s = score_known(uidx[known])
        out[known] = s.toarray() if sp.issparse(s) else np.asarray(s, dtype=np.float32)
    return out + prior


def csr_state(prefix: str, m: sp.spmatrix) -> dict[str, np.ndarray]:
    m = sp.csr_matrix(m)
    return {f"{prefix}_data": np.asarray(m.data, np.float32),
            f"{prefix}_indices": m.indices.astype(np.int64),
            f"{prefix}_indptr": m.indptr.astype(np.int64),
            f"{prefix}_shape": np.array(m.shape, np.int64)}


def csr_from_state(a: dict[str, np.ndarray], prefix: str, shape: tuple[int, int]) -> sp.csr_matrix:
    """Rebuild a CSR matrix saved by :func:`csr_state`, checking it is well-formed."""
    data, indices, indptr = (a[f"{prefix}_{k}"] for k in ("data", "indices", "indptr"))
    saved = tuple(int(v) for v in a[f"{prefix}_shape"])
    if saved != tuple(shape):
        raise ValueError(f"array '{prefix}' has shape {saved}, expected {tuple(shape)}")
    if (indptr.ndim != 1 or len(indptr) != shape[0] + 1 or indptr[0] != 0
            or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices) or len(indices) != len(data)):
        raise ValueError(f"array '{prefix}' is not a valid CSR matrix (indptr/indices/data mismatch)")
    if len(indices) and (indices.min() < 0 or indices.max() >= shape[1]):
        raise ValueError(f"array '{prefix}' has column indices outside [0, {shape[1]})")
    return sp.csr_matrix((data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int64)),
                         shape=shape)


def check_vector(a: dict[str, np.ndarray], key: str, n: int) -> np.ndarray:
    v = np.asarray(a[key], dtype=np.float32)
    if v.shape != (n,):
        raise ValueError(f"array '{key}' has shape {v.shape}, expected ({n},)")
    return v


class SimilarityRecommender(Recommender):
    """``score(u, j) = sum_{i in I(u)} S[i, j]`` with a sparse item x item ``S``: the scoring and
    persistence of item-similarity models.  Subclasses' ``_fit`` sets ``sim_`` (S), ``X_``
    (users x items history) and ``pop_`` (:func:`popularity_prior`)."""

    def score_users(self, uidx: np.ndarray) -> np.ndarray:
        # popularity as a tiny tie-breaker; cold users get pure popularity
        return scores_with_prior(uidx, self.pop_, lambda u: self.X_[u] @ self.sim_)

    def _state(self):
        return {**csr_state("S", self.sim_), **csr_state("X", self.X_), "pop": self.pop_}

    def _set_state(self, a):
        nu, ni = len(self.user_ids), len(self.item_ids)
        self.sim_ = csr_from_state(a, "S", (ni, ni))
        self.X_ = csr_from_state(a, "X", (nu, ni))
        self.pop_ = check_vector(a, "pop", ni)


class ItemKNN(SimilarityRecommender):
    """Item-based kNN: score(u, j) = sum_{i in I(u)} sim(i, j).

    Params: ``neighbors`` (kept per item), ``shrink``, ``alpha`` (asymmetric
    cosine, 0.5 = cosine), ``feature_weighting`` (``none``/``tfidf``/``bm25``
    of the users before computing item similarities).  Popularity breaks
    ties and ranks items for users with no history; items with no training
    interaction are not scored (-inf).
    """

    name = "itemknn"

    def __init__(self, neighbors: int = 100, shrink: float = 0.0, alpha: float = 0.5,
                 feature_weighting: str = "none", **kw):
        if feature_weighting not in FEATURE_WEIGHTINGS:
            raise ValueError(f"feature_weighting must be one of {FEATURE_WEIGHTINGS}, "
                             f"got {feature_weighting!r}")
        super().__init__(neighbors=int(neighbors), shrink=float(shrink), alpha=float(alpha),
                         feature_weighting=str(feature_weighting), **kw)

    def _fit(self, data: Interactions) -> None:
        X = data.matrix()
        W = feature_weight(X, self.params["feature_weighting"])
        self.sim_ = cosine_topk(W, self.params["neighbors"], self.params["shrink"],
                                alpha=self.params["alpha"])
        self.X_ = X
        self.pop_ = popularity_prior(X)
