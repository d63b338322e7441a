"""Ranking metrics with one signature.

Every metric is ``metric(reco, truth, k) -> np.ndarray`` of per-user values,
where ``reco`` is an int array [n_users, >=k] of recommended item indices
(-1 = no item) and ``truth`` is a list of per-user sets of relevant item
indices (same user order).  Binary relevance; users with an empty truth set
are excluded by :func:`evaluate` (never counted as zero).

Membership is computed vectorised (one sorted array of (user, item) codes,
binary search; ids may be any hashable values), and :func:`evaluate` computes it once at the largest k and
derives every metric at every k from it.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import pandas as pd

Metric = Callable[[np.ndarray, list, int], np.ndarray]


def _sizes(truth: list) -> np.ndarray:
    return np.fromiter((len(t) for t in truth), dtype=np.int64, count=len(truth))


def _hits(reco: np.ndarray, truth: list, k: int) -> np.ndarray:
    """[n_users, k] bool: is reco[u, j] in truth[u].

    Any hashable ids work (item indices, id strings; None or -1 as padding never match): the
    truth's ids are numbered once, each recommendation looked up in that numbering (an id no
    truth set holds gets -1), then (user, number) pairs are matched by binary search.
    """
    r = np.asarray(reco)[:, :k]
    n = len(truth)
    if r.shape != (n, k):
        raise ValueError(f"reco has shape {r.shape}, expected ({n}, >={k})")
    lens = _sizes(truth)
    total = int(lens.sum())
    if not total or not r.size:
        return np.zeros((n, k), dtype=bool)
    flat = list(itertools.chain.from_iterable(truth))
    vocab = pd.Index(flat).unique()
    items = vocab.get_indexer(flat).astype(np.int64)
    rn = vocab.get_indexer(r.ravel()).astype(np.int64).reshape(n, k)
    width = len(vocab)
    truth_codes = np.sort(np.repeat(np.arange(n, dtype=np.int64), lens) * width + items)
    codes = np.arange(n, dtype=np.int64)[:, None] * width + rn
    pos = np.minimum(np.searchsorted(truth_codes, codes), total - 1)
    return (truth_codes[pos] == codes) & (rn >= 0)


def _precision(h: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    return h.sum(1) / k


def _recall(h, sizes, k):
    return h.sum(1) / np.maximum(sizes, 1)


def _ndcg(h, sizes, k):
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (h * disc).sum(1)
    idcg = np.r_[0.0, np.cumsum(disc)][np.minimum(sizes, k)]
    return dcg / np.maximum(idcg, 1e-12)


def _map(h, sizes, k):
    prec = np.cumsum(h, 1) / np.arange(1, k + 1)
    return (prec * h).sum(1) / np.maximum(np.minimum(sizes, k), 1)


def _hitrate(h, sizes, k):
    return h.any(1).astype(float)


def precision(reco, truth, k):
    return _precision(_hits(reco, truth, k), _sizes(truth), k)


def recall(reco, truth, k):
    return _recall(_hits(reco, truth, k), _sizes(truth), k)


def ndcg(reco, truth, k):
    return _ndcg(_hits(reco, truth, k), _sizes(truth), k)


def map_(reco, truth, k):
    return _map(_hits(reco, truth, k), _sizes(truth), k)


def hitrate(reco, truth, k):
    return _hitrate(_hits(reco, truth, k), _sizes(truth), k)


METRICS: dict[str, Metric] = {"precision": precision, "recall": recall, "ndcg": ndcg,
                               "map": map_, "hitrate": hitrate}
_FROM_HITS = {"precision": _precision, "recall": _recall, "ndcg": _ndcg, "map": _map,
              "hitrate": _hitrate}


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
    ks = list(ks)
    hits, sizes = _hits(reco, truth, max(ks)), _sizes(truth)
    for k in ks:
        for name, fn in _FROM_HITS.items():
            out[f"{name}@{k}"] = float(np.mean(fn(hits[:, :k], sizes, k)))
        if n_items:
            r = reco[:, :k].ravel()
            r = r[r >= 0] if np.issubdtype(r.dtype, np.integer) else r[pd.notna(r)]  # padding
            out[f"coverage@{k}"] = float(len(pd.unique(r)) / n_items)
    return out
