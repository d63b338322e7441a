"""User-based kNN on sparse matrices.

``score(u, j) = sum_{v in N(u)} sim(u, v) * x_vj`` where ``N(u)`` are the
``neighbors`` most similar users by cosine with shrinkage (see
:func:`pipelines.recommenders.knn.cosine_topk`, applied to the users as
columns).  Everything stays sparse: the users x users neighbour matrix keeps
at most ``neighbors`` entries per user; a dense [batch, n_items] block exists
only inside :meth:`UserKNN.score_users`.  Users with no history (cold users
in the catalogue and unknown ids) get the popularity ranking; items with no
training interaction are not scored (-inf).

Scale: exact neighbours cost ``n_users^2`` (every pair of users sharing an
item).  Above ``max_candidates`` users (default 20,000) neighbours are chosen
among the ``max_candidates`` users with the longest histories only (the most
informative neighbours), which keeps fitting linear in the number of users;
``max_candidates: 0`` means exact.
"""

from __future__ import annotations

import numpy as np

from ..data import Interactions
from .base import Recommender
from .knn import (FEATURE_WEIGHTINGS, check_vector, cosine_topk, csr_from_state, csr_state,
                  feature_weight, popularity_prior, scores_with_prior)


class UserKNN(Recommender):
    """User-based kNN. Params: ``neighbors``, ``shrink``, ``alpha``, ``feature_weighting``.

    ``feature_weighting`` (``none``/``tfidf``/``bm25``) re-weights the items
    (the features users are compared on), so that blockbusters count less
    than niche items when deciding who is similar.
    """

    name = "userknn"

    def __init__(self, neighbors: int = 100, shrink: float = 20.0, alpha: float = 0.5,
                 feature_weighting: str = "tfidf", max_candidates: int = 20000, **kw):
        if feature_weighting not in FEATURE_WEIGHTINGS:
            raise ValueError(f"feature_weighting must be one of {FEATURE_WEIGHTINGS}, "
                             f"got {feature_weighting!r}")
        if int(max_candidates) < 0:
            raise ValueError(f"max_candidates must be >= 0, got {max_candidates}")
        super().__init__(neighbors=int(neighbors), shrink=float(shrink), alpha=float(alpha),
                         feature_weighting=str(feature_weighting),
                         max_candidates=int(max_candidates), **kw)

    def _fit(self, data: Interactions) -> None:
        X = data.matrix()
        # items x users: features = items, compared objects = users (columns)
        W = feature_weight(X.T.tocsr(), self.params["feature_weighting"])
        cand, mc = None, int(self.params.get("max_candidates", 0))
        if 0 < mc < X.shape[0]:  # the mc users with the longest histories (ties: lower index)
            cand = np.sort(np.argsort(-np.diff(X.indptr), kind="stable")[:mc])
        S = cosine_topk(W, self.params["neighbors"], self.params["shrink"],
                        alpha=self.params["alpha"], candidates=cand)
        # column u of S holds u's neighbours -> row u of S.T
        self.nbr_ = S.T.tocsr()
        self.X_ = X
        self.pop_ = popularity_prior(X)

    def score_users(self, uidx: np.ndarray) -> np.ndarray:
        return scores_with_prior(uidx, self.pop_, lambda u: self.nbr_[u] @ self.X_)

    def _state(self):
        return {**csr_state("N", self.nbr_), **csr_state("X", self.X_), "pop": self.pop_}

    def _set_state(self, a):
        nu, ni = len(self.user_ids), len(self.item_ids)
        self.nbr_ = csr_from_state(a, "N", (nu, nu))
        self.X_ = csr_from_state(a, "X", (nu, ni))
        self.pop_ = check_vector(a, "pop", ni)


__all__ = ["UserKNN"]
