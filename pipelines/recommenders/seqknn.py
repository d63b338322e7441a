"""Sequence-window item-kNN: items that users interact with close together in time.

Plain item-kNN counts two items as related when a user has both anywhere in
their history.  This model counts a pair only when the two items are at most
``window`` positions apart in some user's time-ordered history, weighted by
``decay ** (distance - 1)``:

    C_ij = sum_u sum_{pairs (i, j) of u at distance d <= window} decay^(d-1)
    sim(i, j) = C_ij / (pop_i^alpha * pop_j^(1 - alpha) + shrink)

(``alpha = 0.5``: cosine on binary histories), keeping the ``neighbors``
largest similarities per item.  ``score(u, j) = sum_{i in I(u)} sim(i, j)``.

Why: what a user rates in one sitting is not a random draw from their tastes
(the items a site shows together, one mood, one franchise), so locality in the
sequence carries information the bag-of-items co-occurrence lacks.  On
MovieLens-100K's stratified split it scores about as well as item-kNN alone
(NDCG@10 0.4445 vs 0.4461, window 5), yet, unlike full co-occurrence, it adds
to EASE in a score blend (0.4773 -> 0.4806); in the fuse it is one more
source.

Cost is linear in the interactions: ``2 * window`` pairs per interaction,
accumulated in user chunks (``chunk_pairs`` bounds the scratch), then a
sparse top-k per item.  Popularity breaks ties and ranks items for users with
no history; items with no training interaction are not scored (-inf).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..data import Interactions, item_popularity
from ..schema import TS
from .knn import SimilarityRecommender, popularity_prior


def sparse_topk_rows(M: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of each row of ``M`` (ties: lower column first)."""
    M = sp.csr_matrix(M)
    M.sum_duplicates()
    rows = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))
    order = np.lexsort((M.indices, -M.data, rows))
    rank = np.arange(len(order)) - M.indptr[rows[order]]
    keep = order[rank < k]
    out = sp.csr_matrix((M.data[keep], (rows[keep], M.indices[keep])), shape=M.shape,
                        dtype=np.float32)
    out.sort_indices()
    return out


def window_cooccurrence(data: Interactions, window: int, decay: float = 1.0,
                        chunk_pairs: int = 20_000_000) -> sp.csr_matrix:
    """Symmetric item x item counts of pairs at most ``window`` apart in a user's history.

    Histories are ordered by timestamp (ties by item index, so the result is
    deterministic); pairs never cross users.
    """
    d = data.df.sort_values(["uidx", TS, "iidx"], kind="stable")
    u = d["uidx"].to_numpy(np.int64)
    it = d["iidx"].to_numpy(np.int64)
    n, ni = len(it), data.n_items
    C = sp.csr_matrix((ni, ni), dtype=np.float64)
    step = max(1, chunk_pairs // max(2 * window, 1))
    for start in range(0, n, step):
        stop = min(n, start + step + window)  # overlap: pairs starting in the chunk only
        uu, ii = u[start:stop], it[start:stop]
        rows, cols, vals = [], [], []
        for dist in range(1, window + 1):
            a = np.arange(0, min(step, len(ii) - dist))
            if not len(a):
                break
            ok = uu[a] == uu[a + dist]
            a = a[ok]
            w = float(decay) ** (dist - 1)
            rows += [ii[a], ii[a + dist]]
            cols += [ii[a + dist], ii[a]]
            vals += [np.full(2 * len(a), w)]
        if rows:
            C = C + sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                  shape=(ni, ni))
    C.setdiag(0.0)  # the same item twice in one window (repeat interactions)
    C.eliminate_zeros()
    return C.tocsr()


class SeqKNN(SimilarityRecommender):
    """Sequence-window item-kNN. Params: ``window``, ``decay``, ``neighbors``, ``shrink``, ``alpha``."""

    name = "seqknn"

    def __init__(self, window: int = 5, decay: float = 1.0, neighbors: int = 200,
                 shrink: float = 10.0, alpha: float = 0.5, **kw):
        if int(window) < 1:
            raise ValueError(f"seqknn window must be >= 1, got {window}")
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"seqknn decay must be in (0, 1], got {decay}")
        if int(neighbors) < 1:
            raise ValueError(f"seqknn neighbors must be >= 1, got {neighbors}")
        if float(shrink) < 0:
            raise ValueError(f"seqknn shrink must be >= 0, got {shrink}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"seqknn alpha must be in [0, 1], got {alpha}")
        super().__init__(window=int(window), decay=float(decay), neighbors=int(neighbors),
                         shrink=float(shrink), alpha=float(alpha), **kw)

    def _fit(self, data: Interactions) -> None:
        p = self.params
        X = data.matrix()
        C = window_cooccurrence(data, p["window"], p["decay"]).tocoo()
        pop = np.maximum(item_popularity(X).astype(np.float64), 1.0)
        # column j of S holds the neighbours of target j (as in item-kNN: score = x_u @ S)
        denom = pop[C.row] ** p["alpha"] * pop[C.col] ** (1.0 - p["alpha"]) + p["shrink"]
        S = sp.csr_matrix((C.data / denom, (C.col, C.row)), shape=C.shape)  # row = target
        self.sim_ = sparse_topk_rows(S, p["neighbors"]).T.tocsr()
        self.X_ = X
        self.pop_ = popularity_prior(X)


__all__ = ["SeqKNN", "window_cooccurrence", "sparse_topk_rows"]
