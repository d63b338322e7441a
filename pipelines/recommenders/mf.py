"""Matrix factorisation via the ``implicit`` library: ALS and BPR (CPU).

Both learn user factors ``U`` and item factors ``V`` from the binary users x
items matrix and score ``U[u] @ V.T``.  Only the factor arrays are kept (no
``implicit`` object is stored or pickled).

* Items with no training interaction ("cold items") have no learnt factors:
  their score is -inf (collaborative filtering cannot rank them).
* Users with no training history (cold users of the catalogue and unknown
  ids) get the popularity ranking.
* ``random_state`` seeds the initialisation.  ALS is deterministic for a
  given seed whatever ``num_threads``; BPR runs lock-free parallel SGD, so it
  is bit-for-bit reproducible only with ``num_threads=1``.  BPR's
  ``num_threads="auto"`` takes 1 thread up to ``BPR_SERIAL_MAX_ROWS``
  training interactions (reproducible where a fit is cheap) and every core
  above (on 2 cores, 750k interactions: 20 epochs 11.0 s -> 6.3 s).
* Warm start: ``fit(data, init=previous_model)`` starts from an earlier
  model of the same class, aligning factors by external user/item id (new
  users/items get a fresh random init), or ``init=(U, V)`` from arrays with
  one row per user/item of ``data``; then runs ``iterations`` more epochs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from ..data import Interactions
from .base import Recommender
from .knn import check_vector, popularity_prior


BPR_SERIAL_MAX_ROWS = 250_000


def _thread_count(value: Any, nnz: int) -> int:
    """``num_threads`` as implicit takes it (0 = every core): an int, or "auto" (BPR)."""
    if value == "auto":
        return 1 if nnz <= BPR_SERIAL_MAX_ROWS else 0
    return int(value)


def _check_threads(value: Any) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or isinstance(value, bool):
        raise ValueError(f"num_threads must be 'auto' or an integer >= 0 (0 = every core), got {value!r}")
    return n


class _ImplicitMF(Recommender):
    """Shared plumbing for the ``implicit`` factorisation models (not registered)."""

    def fit(self, data: Interactions, init: Any = None) -> "Recommender":
        """Fit on ``data``; ``init`` = an earlier fitted model of this class or ``(U, V)``."""
        self._init = init
        try:
            return super().fit(data)
        finally:
            self._init = None

    # ---- hooks --------------------------------------------------------
    def _factor_dim(self) -> int:
        return int(self.params["factors"])

    def _make_model(self, num_threads: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _random_rows(self, rng: np.random.Generator, n: int, users: bool) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    # ---- fit ----------------------------------------------------------
    def _initial_factors(self, data: Interactions):
        init = getattr(self, "_init", None)
        if init is None:
            return None, None
        d = self._factor_dim()
        # distinct stream from the one implicit uses for its own init
        rng = np.random.default_rng([int(self.params["random_state"]), 1])
        if isinstance(init, Recommender):
            if type(init) is not type(self) or getattr(init, "user_factors_", None) is None:
                raise ValueError(f"init must be a fitted '{self.name}' model, "
                                 f"got {type(init).__name__}")
            if init.user_factors_.shape[1] != d:
                raise ValueError(f"init model has {init.user_factors_.shape[1]} factor columns, "
                                 f"this model needs {d} (same 'factors' required)")
            U = self._align(init.user_factors_, init.user_ids, data.user_ids, rng, users=True)
            V = self._align(init.item_factors_, init.item_ids, data.item_ids, rng, users=False)
            return U, V
        try:
            U, V = init
        except (TypeError, ValueError) as exc:
            raise ValueError("init must be a fitted model or a (user_factors, item_factors) pair") from exc
        U = np.array(U, dtype=np.float32, order="C")
        V = np.array(V, dtype=np.float32, order="C")
        if U.shape != (data.n_users, d) or V.shape != (data.n_items, d):
            raise ValueError(f"init factors have shapes {U.shape} and {V.shape}, expected "
                             f"({data.n_users}, {d}) and ({data.n_items}, {d})")
        return U, V

    def _align(self, old: np.ndarray, old_ids, new_ids, rng, users: bool) -> np.ndarray:
        out = self._random_rows(rng, len(new_ids), users)
        pos = pd.Index(np.asarray(old_ids, dtype=object).astype(str)).get_indexer(
            np.asarray(new_ids, dtype=object).astype(str))
        hit = pos >= 0
        out[hit] = old[pos[hit]]
        return out

    def _fit(self, data: Interactions) -> None:
        X = data.matrix()
        U0, V0 = self._initial_factors(data)
        # implicit warns (and slows down) when BLAS is multi-threaded on top of its own threads
        with threadpool_limits(limits=1, user_api="blas"):
            model = self._make_model(_thread_count(self.params["num_threads"], int(X.nnz)))
            if U0 is not None:
                model.user_factors, model.item_factors = U0, V0
            model.fit(X, show_progress=False)
        self.user_factors_ = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self.item_factors_ = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        self.pop_ = popularity_prior(X, scale=1.0)
        self.active_ = (np.diff(X.indptr) > 0).astype(np.uint8)

    # ---- score --------------------------------------------------------
    def score_users(self, uidx: np.ndarray) -> np.ndarray:
        uidx = np.asarray(uidx, dtype=np.int64)
        n_items = self.item_factors_.shape[0]
        out = np.empty((len(uidx), n_items), dtype=np.float32)
        active = np.zeros(len(uidx), dtype=bool)
        active[uidx >= 0] = self.active_[uidx[uidx >= 0]] > 0
        out[~active] = self.pop_  # no history: popularity (-inf on cold items)
        if active.any():
            sc = self.user_factors_[uidx[active]] @ self.item_factors_.T
            sc[:, ~np.isfinite(self.pop_)] = -np.inf  # cold items have no learnt factors
            out[active] = sc
        return out

    # ---- persistence --------------------------------------------------
    def _state(self):
        return {"user_factors": self.user_factors_, "item_factors": self.item_factors_,
                "pop": self.pop_, "active": self.active_}

    def _set_state(self, a):
        nu, ni, d = len(self.user_ids), len(self.item_ids), self._factor_dim()
        U = np.ascontiguousarray(a["user_factors"], dtype=np.float32)
        V = np.ascontiguousarray(a["item_factors"], dtype=np.float32)
        if U.shape != (nu, d) or V.shape != (ni, d):
            raise ValueError(f"factor arrays have shapes {U.shape} and {V.shape}, expected "
                             f"({nu}, {d}) and ({ni}, {d})")
        active = np.asarray(a["active"], dtype=np.uint8)
        if active.shape != (nu,):
            raise ValueError(f"array 'active' has shape {active.shape}, expected ({nu},)")
        self.user_factors_, self.item_factors_ = U, V
        self.pop_ = check_vector(a, "pop", ni)
        self.active_ = active


class ALS(_ImplicitMF):
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008) via ``implicit``.

    Params: ``factors``, ``regularization``, ``alpha`` (confidence = alpha x
    interaction), ``iterations``, ``random_state``, ``num_threads`` (0 = all).
    """

    name = "als"

    def __init__(self, factors: int = 96, regularization: float = 35.0, alpha: float = 5.0,
                 iterations: int = 15, random_state: int = 42, num_threads: int = 0, **kw):
        super().__init__(factors=int(factors), regularization=float(regularization),
                         alpha=float(alpha), iterations=int(iterations),
                         random_state=int(random_state), num_threads=_check_threads(num_threads),
                         **kw)

    def _make_model(self, num_threads: int):
        p = self.params
        from implicit.cpu.als import AlternatingLeastSquares  # imported when fitting only

        return AlternatingLeastSquares(factors=p["factors"], regularization=p["regularization"],
                                       alpha=p["alpha"], iterations=p["iterations"],
                                       random_state=p["random_state"], num_threads=num_threads,
                                       dtype=np.float32)

    def _random_rows(self, rng, n, users):
        # implicit's own ALS init scale
        return (rng.random((n, self._factor_dim()), dtype=np.float32) * 0.01).astype(np.float32)


class BPR(_ImplicitMF):
    """Bayesian Personalised Ranking (Rendle et al. 2009) via ``implicit``.

    Params: ``factors``, ``learning_rate``, ``regularization``,
    ``iterations``, ``random_state``, ``num_threads`` (0 = all; use 1 for
    bit-for-bit reproducibility; "auto": 1 up to ``BPR_SERIAL_MAX_ROWS``
    training interactions, all above), ``verify_negative_samples``.  The stored
    factors have ``factors + 1`` columns: implicit appends an item-bias
    column (and a constant 1 to the user factors).
    """

    name = "bpr"

    def __init__(self, factors: int = 128, learning_rate: float = 0.005, regularization: float = 0.001,
                 iterations: int = 80, random_state: int = 42, num_threads: int = 0,
                 verify_negative_samples: bool = True, **kw):
        super().__init__(factors=int(factors), learning_rate=float(learning_rate),
                         regularization=float(regularization), iterations=int(iterations),
                         random_state=int(random_state), num_threads=_check_threads(num_threads),
                         verify_negative_samples=bool(verify_negative_samples), **kw)

    def _factor_dim(self) -> int:
        return int(self.params["factors"]) + 1

    def _make_model(self, num_threads: int):
        p = self.params
        from implicit.cpu.bpr import BayesianPersonalizedRanking  # imported when fitting only

        return BayesianPersonalizedRanking(
            factors=p["factors"], learning_rate=p["learning_rate"],
            regularization=p["regularization"], iterations=p["iterations"],
            random_state=p["random_state"], num_threads=num_threads,
            verify_negative_samples=p["verify_negative_samples"], dtype=np.float32)

    def _random_rows(self, rng, n, users):
        f = int(self.params["factors"])
        out = ((rng.random((n, f + 1), dtype=np.float32) - 0.5) / f).astype(np.float32)
        if users:
            out[:, f] = 1.0  # implicit's BPR keeps a constant 1 that multiplies the item bias
        return out


__all__ = ["ALS", "BPR"]
