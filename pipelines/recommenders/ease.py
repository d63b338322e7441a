"""EASE (Steck 2019): a closed-form item-item linear autoencoder.

    G = X^T X + lambda I,   P = G^-1,   B = I - P / diag(P)   (diag(B) = 0)

``score(u) = x_u @ B``.  The Gram matrix and its inverse are computed in
float64 (the inverse of a large, nearly singular Gram matrix loses too much
in float32); ``B`` is stored in float32.  Memory is dense O(n_items^2): about
``3 * 8 * n_items^2`` bytes during fit, so :class:`EASE` refuses catalogues
larger than ``max_items`` (default 20,000: ~10 GB peak) with a ValueError;
raise ``max_items`` if the machine has the memory, or use ``itemknn``
(sparse, top-k) for bigger catalogues.  No silent approximation is made.

Users with no history get the popularity ranking; items with no training
interaction are not scored (-inf).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ..data import Interactions
from .base import Recommender
from .knn import check_vector, csr_from_state, csr_state, popularity_prior, scores_with_prior


class EASE(Recommender):
    """EASE. Params: ``lambda_`` (L2 strength, > 0), ``max_items`` (memory guard)."""

    name = "ease"

    def __init__(self, lambda_: float = 500.0, max_items: int = 20000, **kw):
        if "lambda" in kw:  # params.yaml may spell it without the underscore
            lambda_ = kw.pop("lambda")
        if not float(lambda_) > 0:
            raise ValueError(f"EASE lambda_ must be > 0, got {lambda_}")
        super().__init__(lambda_=float(lambda_), max_items=int(max_items), **kw)

    def _fit(self, data: Interactions) -> None:
        n = data.n_items
        if n > self.params["max_items"]:
            raise ValueError(
                f"EASE needs a dense {n} x {n} item matrix (~{3 * 8 * n * n / 2**30:.1f} GiB while "
                f"fitting), above max_items={self.params['max_items']}; raise max_items if the "
                f"machine has the memory, or use the sparse 'itemknn' model instead")
        X = data.matrix()
        G = (X.T @ X).toarray().astype(np.float64)
        G[np.diag_indices(n)] += self.params["lambda_"]
        P = scipy.linalg.inv(G, overwrite_a=True, check_finite=False)
        del G
        B = P / -np.diag(P)[None, :]  # B_ij = -P_ij / P_jj
        np.fill_diagonal(B, 0.0)
        self.B_ = B.astype(np.float32)
        self.X_ = X
        self.pop_ = popularity_prior(X)

    def score_users(self, uidx: np.ndarray) -> np.ndarray:
        # tiny popularity tie-breaker: the ranking for users with no history
        return scores_with_prior(uidx, self.pop_, lambda u: self.X_[u] @ self.B_)

    def _state(self):
        return {"B": self.B_, **csr_state("X", self.X_), "pop": self.pop_}

    def _set_state(self, a):
        nu, ni = len(self.user_ids), len(self.item_ids)
        B = np.asarray(a["B"], dtype=np.float32)
        if B.shape != (ni, ni):
            raise ValueError(f"array 'B' has shape {B.shape}, expected ({ni}, {ni})")
        self.B_ = B
        self.X_ = csr_from_state(a, "X", (nu, ni))
        self.pop_ = check_vector(a, "pop", ni)


__all__ = ["EASE"]
