"""Ranking metrics with one signature.

Every metric is ``metric(reco, truth, k) -> np.ndarray`` of per-user values,
where ``reco`` is an int array [n_users, >=k] of recommended item indices
(-1 = no item) and ``truth`` is a list of per-user sets of relevant item
indices (same user order).  Binary relevance; users with an empty truth set
are excluded by :func:`evaluate` (never counted as zero).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Metric = Callable[[np.ndarray, list, int], np.ndarray]


def _hits(reco: np.ndarray, truth: list, k: int) -> np.ndarray:
    r = reco[:, :k]
    return np.array([[x in t for x in row] for row, t in zip(r, truth)], dtype=bool).reshape(len(truth), k)


def precision(reco, truth, k):
    return _hits(reco, truth, k).sum(1) / k


def recall(reco, truth, k):
    n = np.array([len(t) for t in truth], dtype=float)
    return _hits(reco, truth, k).sum(1) / np.maximum(n, 1)


def ndcg(reco, truth, k):
    h = _hits(reco, truth, k)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (h * disc).sum(1)
    n = np.array([min(len(t), k) for t in truth])
    idcg = np.array([disc[:m].sum() for m in n])
    return dcg / np.maximum(idcg, 1e-12)


def map_(reco, truth, k):
    h = _hits(reco, truth, k)
    prec = np.cumsum(h, 1) / np.arange(1, k + 1)
    n = np.array([min(len(t), k) for t in truth], dtype=float)
    return (prec * h).sum(1) / np.maximum(n, 1)


def hitrate(reco, truth, k):
    return _hits(reco, truth, k).any(1).astype(float)


METRICS: dict[str, Metric] = {"precision": precision, "recall": recall, "ndcg": ndcg,
                               "map": map_, "hitrate": hitrate}


def evaluate(reco: np.ndarray, truth: list, ks, n_items: int | None = None) -> dict[str, float]:
    """Mean of every metric at every k over users with a non-empty truth set.

    Adds ``n_users`` and, when ``n_items`` is given, ``coverage@k`` (share of
    the catalogue recommended to at least one evaluated user).
    """
    keep = [i for i, t in enumerate(truth) if len(t) > 0]
    out: dict[str, float] = {"n_users": float(len(keep))}
    if not keep:
        return out
    reco = np.asarray(reco)[keep]
    truth = [truth[i] for i in keep]
    for k in ks:
        for name, fn in METRICS.items():
            out[f"{name}@{k}"] = float(np.mean(fn(reco, truth, k)))
        if n_items:
            r = reco[:, :k]
            out[f"coverage@{k}"] = float(len(np.unique(r[r >= 0])) / n_items)
    return out
