"""Hybrid learning-to-rank over every candidate source (the ``fuse`` stage's logic).

Pipeline, run twice with the same code (no leakage by construction):

* **training**: the ``fit``-fold models and the ``fit``-fold interactions only
  (user histories, popularity, content profiles, genre interests, segment
  statistics, co-occurrence neighbourhoods are all recomputed from those rows)
  produce candidates and features; the labels are the users' ``val`` rows.
  A LightGBM ``LGBMRanker`` (``rank_xendcg`` by default, ``lambdarank``
  available; several seeds averaged) learns on them with early stopping on an
  inner split of the labelled users, then is refitted on all of them.
  Cold-start simulation (:func:`training_world`): some ``fit`` rows are moved
  from the context into the labels (every row of a sample of items, and all
  but 1..``cold_user_max`` rows of a sample of users) so that the ranker also
  sees cold items and cold users; the fitted models, which did see those rows,
  are never used on cold users or cold items (same rule at test time), unless
  ``refit_sources`` re-fits them on the simulated context (``model_cold_users``).
  Models the stage cannot re-fit (the encoder: :func:`refittable`) keep the
  rule (never on cold users or cold items, in training and at test time alike)
  and are absent from the extra cross-fitting folds (``cv_folds``), unless
  ``refit_fixed_sources`` trains them again there from the item features
  (:func:`fixed_refitter`).
* **test time**: the ``full`` models and all training rows produce candidates
  and the same features for every user of the catalogue; the ranker orders
  them and the top ``k`` are written with a readable reason.

Candidate sources (each proposes its top ``N`` unseen items per user; ``N`` per
source in ``params['candidates']``, 0 = feature only):

* every CF / sequence model (``Recommender`` objects, e.g. ease, itemknn, als,
  encoder), on warm users x warm items of the context only;
* ``cooc_item`` / ``cooc_user``: item- and user-based kNN computed from the
  context rows themselves (they serve cold users, whose model scores are not
  used);
* ``content_<modality>``: cosine between the user's content vector (mean of
  the L2-normalised embeddings of the items in the user's history) and each
  item's embedding: covers cold items;
* ``segment_pop``: popularity within the user's attribute segment (e.g.
  gender x age bucket x occupation from ``users.parquet``), smoothed towards
  the global popularity;
* ``content_knn``: sum of content similarities between the candidate and the
  items of the user's history (top-``content_neighbors`` neighbours per item),
  proposing cold items only by default (``content_knn_cold_only``).

Features per (user, candidate): per source score / user's best score,
per-user z-score and rank (``rank_depth + 1`` beyond the depth, NaN where the
source cannot score; raw scores optional); number of sources proposing it;
co-occurrence with the history (mean / soft-max / count / recent items / the
user's centred ratings of the neighbours); the people the item shares with the
history (``tag_columns``, e.g. director and cast: shared names summed over the
history, the share of history items sharing one, recent items sharing one);
item popularity (relative to the
mean item, percentile), cold-item flag, item recency and age relative to the
user's last interaction, the item's activity inside the user's active window
and around the user's sessions, smoothed item mean rating, numeric item
attributes and their distance to the user's mean (e.g. year); user activity,
activity x popularity, popularity relative to the user's usual popularity;
the user's genre share / lift for the item's genres, the segment's genre
lift, and per user attribute the lift of the item within the user's group.
Scale-dependent quantities are normalised so that the fit-fold and full
contexts give features on the same scale.

Everything is vectorised over user batches (dense score matrices of one
batch, numpy gathers over the (user, candidate) pairs); only the reasons of
the final top-``k`` are formatted in a Python loop.  The ranker is saved as a
LightGBM text model (bags merged into one model) or, for the scikit-learn
fallback (``ranker: sklearn`` or lightgbm missing), a JSON tree dump that
:class:`Ranker` reloads; never pickled.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data import Interactions, Split
from .recommenders.base import Recommender, topk
from .schema import ITEM, RATING, RECOMMENDATION_COLUMNS, TS, USER, mostly_numeric

log = logging.getLogger("mmrec.fusion")

DEFAULTS: dict = {
    "k": 50,  # recommendations written per user
    # candidates per source; keys: a model name, 'content' (every content_<m>) or 'content_<m>',
    # 'cooc_item', 'cooc_user', 'segment_pop', 'content_knn'; 'default' for the rest.
    # 0 = feature only, proposes nothing.
    "candidates": {"default": 100, "segment_pop": 50, "content": 50, "content_knn": 20,
                   "cooc_item": 50, "cooc_user": 50},
    "sources": None,  # restrict to these source names (null = every source found)
    "rank_depth": 200,  # ranks computed down to this depth; deeper items get rank_depth + 1
    "raw_scores": False,  # also give each source's raw score (its scale differs fit vs full)
    "cold_user_max": 5,  # users with at most this many interactions: cold (no model features)
    "user_neighbors": 50,  # cooc_user source: neighbours per user
    # cooc_user: above this many users, neighbours are chosen among this many users with the
    # longest histories (0 = every user): exact neighbours cost users x users, which made this
    # source the largest share of the test-time scoring at 100,000 users (see UserKNNScorer)
    "user_neighbor_pool": 20000,
    # training-time cold-start simulation (no leakage: moved fit rows become labels and the
    # fitted models are never used on the simulated pairs): share of warm items whose fit rows
    # are moved out of the training context, share of validation users truncated to
    # 1..cold_user_max fit rows; 'auto' = the share of cold items / cold users at test time
    "cold_item_simulation": "auto",
    "cold_user_simulation": "auto",
    # stratified: the simulated cold items are a systematic sample along the items' popularity
    # (every popularity range in proportion, as in expectation in a uniform draw, without its
    # spread); uniform: a plain random draw
    "cold_item_draw": "stratified",
    "max_simulation_share": 0.3,
    "genre_column": "genres",
    "genre_sep": "|",
    "title_column": "title",
    # people (or any tags) that items share: ``tag_sep``-separated item columns, each item's
    # first ``tag_max_per_item`` per column (billing order); a tag counts when 2 to
    # ``tag_max_items`` items carry it (a name on more items tells them apart no better than
    # popularity, and would make the item x item graph quadratic). Missing columns: skipped
    "tag_columns": ["director", "cast"],
    "tag_sep": "|",
    "tag_max_per_item": 5,
    "tag_max_items": 100,
    "segment_columns": None,  # user attributes defining segments (null = auto)
    "segment_max_levels": 30,  # auto: skip categorical attributes with more levels (ids, zip codes)
    "segment_bins": 4,  # numeric attributes: quantile buckets
    "smoothing": 10.0,  # pseudo-count towards the global rate (segments, genres, ratings)
    "content_neighbors": 50,
    "knn_neighbors": 100,  # co-occurrence neighbourhood features (cosine top-k per item)
    "knn_power": 8.0,  # (sum sim^p)^(1/p): a soft max of the similarity to the history
    "recent_n": 5,  # similarity to the user's last N items
    "window_days": 7.0,  # item activity within the user's active window +- this margin
    "session_hours": 24.0,  # time bucket of the "rated around the user's sessions" feature
    "session_window": 1,  # +- buckets around each of the user's active buckets
    "max_time_buckets": 4000,  # coarser buckets beyond this many
    "item_numeric_columns": None,  # numeric item attributes (null = auto, e.g. year, runtime)
    "content_knn_cold_only": True,
    "reason_neighbors": 50,
    "reason_min_sim": 0.05,
    "reason_min_lift": 1.2,
    "ranker": "auto",  # auto | lightgbm | sklearn
    "objective": "rank_xendcg",  # LightGBM ranking objective: rank_xendcg | lambdarank
    "n_estimators": 400,
    "learning_rate": 0.03,
    "num_leaves": 15,
    "min_child_samples": 200,
    "feature_fraction": 0.5,
    "bagging_fraction": 0.7,  # < 1: row subsampling every iteration
    "lambda_l2": 1.0,
    "n_bags": 2,  # rankers with different seeds, averaged (merged into one model file)
    # above this many ranker training rows (0 = no limit) one ranker is trained, not n_bags:
    # bagging cuts variance where groups are few, its cost grows with the rows (synthetic 1M,
    # 3.1M rows: 2 bags 0.2653 NDCG@10 vs 1 bag 0.2649, fuse 580 s vs 420 s)
    "bag_max_rows": 1_500_000,
    "early_stopping_rounds": 50,  # 0: no early stopping (n_estimators trees, every user)
    # early stopping needs this many held-out users (eval_fraction of the labelled ones); with
    # fewer their NDCG is too noisy to pick a tree count, and n_estimators trees learn on every
    # user.  ML-100K coldstart, the cold ranker (about 58 held-out users): stopped at 26 / 205 /
    # 266 trees over ranker seeds 42 / 1 / 2, cold_users NDCG@10 0.677 / 0.698 / 0.701 and
    # recall@10 0.1201 / 0.1204 / 0.1225; 400 trees: 0.704 / 0.702 / 0.697 and 0.1256 / 0.1219 /
    # 0.1228.  The main ranker (567 held-out users there) is unaffected
    # (0 = any number; params.yaml sets 100 for the cold ranker: cold_ranker_params)
    "early_stopping_min_users": 0,
    "eval_fraction": 0.2,  # share of validation users held out for early stopping
    "eval_at": 10,
    "refit_full": True,  # refit on every validation user with the early-stopped tree count
    "refit_max_rows": 1_500_000,  # ... only up to this many training rows (0 = no limit)
    "seed": 42,
    "num_threads": 2,
    "max_train_users": 3000,  # subsample of labelled users the ranker learns on (per fold)
    # cross-fitting: 1 = the split's val fold only; K > 1 adds K - 1 folds of the fit rows (each
    # hiding as many rows per user as the val fold) with the sources re-fitted on the rest
    "cv_folds": 1,
    # re-fit the sources (clones of the fit models: same class and hyper-parameters) on each
    # training context AFTER the cold-start simulation, so that they never saw the moved rows
    "refit_sources": False,
    # use model scores on cold users too (needs refit_sources: else the training-time models saw
    # the simulated cold users' hidden rows)
    "model_cold_users": False,
    # sources the stage cannot re-fit from interactions alone (the encoder: it needs the item
    # features) are trained again on each extra cross-fitting fold's context, the way their fit
    # variant was trained (see EncoderRecommender.context_clone), when that training is
    # expected to take at most fixed_refit_max_seconds per fold; else they are absent there.
    # ML-100K stratified, 3 ranker seeds: hybrid NDCG@10 0.4987 vs 0.4985 without, for +85 s
    "refit_fixed_sources": False,
    "fixed_refit_max_seconds": 120.0,
    "memory_mb": 512,  # scratch budget per user batch (dense score matrices)
    "cold_item_slots": 0,  # reserve the last N of the top-k for the best-ranked cold items
    # a second ranker learns on the cold groups only (the simulated cold users of every fold)
    # and ranks the users with at most cold_user_max training rows; it needs at least
    # cold_ranker_min_users such groups with a positive label, else one ranker ranks everyone
    "cold_ranker": True,
    "cold_ranker_min_users": 50,
    # fuse keys overridden for the cold ranker (e.g. num_leaves); merged into this default
    "cold_ranker_params": {},
    # each training group (user) weighs n_labels ** -power in the ranker's loss: 0 = every user
    # alike (NDCG's view); 1 = each label row alike per user (recall's view: a user's recall is
    # hits / n_labels).  0.5 for the cold ranker (cold_ranker_params) was mixed on ML-100K
    # coldstart: cold_users recall@10 up on 3 seeds of one set of inputs (+0.0016..+0.0038),
    # down on the benchmark's own inputs (0.1219 -> 0.1207, NDCG 0.698 -> 0.679): not a default
    "group_weight_power": 0.0,
    # incremental retraining (see reuse_decision): reuse the previous run's ranker when the
    # training data grew by at most warm_max_growth (relative) and every other fuse param and
    # every source model's configuration is the same; after warm_max_reuses reuses in a row the
    # ranker is trained again
    "warm_start": False,
    "warm_max_growth": 0.10,
    "warm_max_reuses": 3,
    # with a reused ranker: 'changed' rescores only the users whose training rows (or
    # attributes) changed and keeps the previous lists of the others; 'all' rescores everyone
    "rescore": "changed",
}

# params that do not change what a trained ranker is (its reuse ignores them)
WARM_KEYS = ("warm_start", "warm_max_growth", "warm_max_reuses", "rescore", "num_threads")



# =========================================================================== params

def resolve_params(params: dict | None) -> dict:
    p = {**DEFAULTS, **(params or {})}
    cand = dict(DEFAULTS["candidates"])
    cand.update(p.get("candidates") or {})
    p["candidates"] = cand
    cold = dict(DEFAULTS["cold_ranker_params"])
    cold.update(p.get("cold_ranker_params") or {})
    p["cold_ranker_params"] = cold
    for key, where in ((p, "fuse"), (cold, "fuse.cold_ranker_params")):
        if "group_weight_power" in key and not 0.0 <= float(key["group_weight_power"]) <= 2.0:
            raise ValueError(f"{where}.group_weight_power must be in [0, 2], got "
                             f"{key['group_weight_power']}")
        if "early_stopping_min_users" in key and int(key["early_stopping_min_users"]) < 0:
            raise ValueError(f"{where}.early_stopping_min_users must be >= 0, got "
                             f"{key['early_stopping_min_users']}")
    if p["ranker"] not in ("auto", "lightgbm", "sklearn"):
        raise ValueError(f"fuse.ranker must be auto, lightgbm or sklearn, got {p['ranker']!r}")
    if p["objective"] not in ("lambdarank", "rank_xendcg"):
        raise ValueError(f"fuse.objective must be lambdarank or rank_xendcg, got {p['objective']!r}")
    if int(p["k"]) < 1:
        raise ValueError(f"fuse.k must be >= 1, got {p['k']}")
    if p["model_cold_users"] and not p["refit_sources"]:
        raise ValueError("fuse.model_cold_users needs fuse.refit_sources: the fit-fold models saw "
                         "the hidden rows of the simulated cold users (leakage)")
    if p["cold_item_draw"] not in ("stratified", "uniform"):
        raise ValueError(f"fuse.cold_item_draw must be stratified or uniform, got {p['cold_item_draw']!r}")
    if int(p["user_neighbor_pool"]) < 0:
        raise ValueError(f"fuse.user_neighbor_pool must be >= 0, got {p['user_neighbor_pool']}")
    if int(p["cv_folds"]) < 1:
        raise ValueError(f"fuse.cv_folds must be >= 1, got {p['cv_folds']}")
    if not 0.0 <= float(p["eval_fraction"]) < 1.0:
        raise ValueError(f"fuse.eval_fraction must be in [0, 1), got {p['eval_fraction']}")
    if not isinstance(p["tag_columns"] or [], (list, tuple)):
        raise ValueError(f"fuse.tag_columns must be a list of item columns, got {p['tag_columns']!r}")
    if int(p["tag_max_per_item"]) < 1 or int(p["tag_max_items"]) < 2:
        raise ValueError("fuse.tag_max_per_item must be >= 1 and fuse.tag_max_items >= 2, got "
                         f"{p['tag_max_per_item']} and {p['tag_max_items']}")
    if p["rescore"] not in ("changed", "all"):
        raise ValueError(f"fuse.rescore must be changed or all, got {p['rescore']!r}")
    if float(p["warm_max_growth"]) < 0 or int(p["warm_max_reuses"]) < 0:
        raise ValueError("fuse.warm_max_growth and fuse.warm_max_reuses must be >= 0, got "
                         f"{p['warm_max_growth']} and {p['warm_max_reuses']}")
    return p


# model params that a warm start changes without changing what the model is (ALS/BPR
# iterations, the encoder's epochs); keys starting with "_" are derived from the data (e.g. the
# encoder's architecture record with its attribute vocabularies), not configuration
VOLATILE_MODEL_KEYS = ("iterations", "num_threads", "epochs")


def params_fingerprint(p: dict, models: dict[str, Recommender] | None = None) -> str:
    """Hash of every fuse param that shapes the ranker or its features (not :data:`WARM_KEYS`)
    and of the sources behind the features (class and hyper-parameters of each ``models``
    entry, :data:`VOLATILE_MODEL_KEYS` aside): changing ALS's factors retrains the ranker."""
    import hashlib

    keep = {k: v for k, v in p.items() if k not in WARM_KEYS}
    keep["_sources"] = {n: [type(m).__name__, {k: v for k, v in (m.params or {}).items()
                                               if k not in VOLATILE_MODEL_KEYS
                                               and not k.startswith("_")}]
                        for n, m in sorted((models or {}).items())}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def n_candidates(p: dict, name: str) -> int:
    c = p["candidates"]
    if name in c:
        return int(c[name])
    if name.startswith("content_") and name != "content_knn" and "content" in c:
        return int(c["content"])
    return int(c.get("default", 100))


# =========================================================================== item / user side

@dataclass
class ItemSide:
    """Everything about items that does not depend on interactions."""

    item_ids: np.ndarray
    titles: np.ndarray
    genres: sp.csr_matrix  # items x genres, binary
    genre_names: np.ndarray
    emb: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> L2-normalised [n, d]
    present: dict[str, np.ndarray] = field(default_factory=dict)
    content: np.ndarray | None = None  # combined normalised embedding (all modalities)
    content_sim: sp.csr_matrix | None = None  # [neighbour h, target i] top-k cosine
    num: np.ndarray | None = None  # [n_items, n_numeric] float32 (NaN missing)
    num_names: list = field(default_factory=list)
    tags: sp.csr_matrix | None = None  # items x tags, binary (None: no tag column)
    tag_names: np.ndarray | None = None  # display name per tag
    tag_sim: sp.csr_matrix | None = None  # items x items: tags shared (zero diagonal)
    tag_bin: sp.csr_matrix | None = None  # tag_sim's pattern: 1 where two items share a tag

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def align_features(item_ids: np.ndarray, feat_ids, emb, present) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows re-ordered to the catalogue; items without a row are not present."""
    emb = np.asarray(emb, dtype=np.float32)
    pos = pd.Index(np.asarray(feat_ids, dtype=object).astype(str)).get_indexer(
        np.asarray(item_ids, dtype=object).astype(str))
    ok = pos >= 0
    out = np.zeros((len(item_ids), emb.shape[1] if emb.ndim == 2 else 0), np.float32)
    pres = np.zeros(len(item_ids), bool)
    out[ok] = emb[pos[ok]]
    pres[ok] = np.asarray(present, dtype=bool)[pos[ok]]
    pres &= np.isfinite(out).all(axis=1) & (np.abs(out).sum(axis=1) > 0)
    out[~pres] = 0.0
    return _l2(out), pres


def dense_topk_sim(E: np.ndarray, k: int, memory_mb: int = 256) -> sp.csr_matrix:
    """Top-``k`` cosine neighbours per item of row-normalised ``E``: S[h, i] = sim(h, i), h != i."""
    n = E.shape[0]
    k = min(int(k), n - 1)
    if n < 2 or k < 1 or not np.any(E):
        return sp.csr_matrix((n, n), dtype=np.float32)
    block = int(max(1, min(n, memory_mb * 2**20 // (8 * n))))
    rows, cols, vals = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = E @ E[start:stop].T  # n x b
        sims[start + np.arange(stop - start), np.arange(stop - start)] = 0.0
        top = topk(sims.T, k).T  # k x b (equal similarities: the lower index, on any CPU)
        tv = np.take_along_axis(sims, top, axis=0)
        keep = tv > 0
        rows.append(top[keep])
        cols.append(np.broadcast_to(np.arange(start, stop)[None, :], top.shape)[keep])
        vals.append(tv[keep].astype(np.float32))
    S = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n, n), dtype=np.float32)
    S.sort_indices()
    return S


def build_item_side(items: pd.DataFrame, item_ids: np.ndarray,
                    features: dict[str, tuple] | None, p: dict) -> ItemSide:
    """Titles, genres and per-modality embeddings aligned to the catalogue ``item_ids``.

    ``features``: modality -> ``(feature_item_ids, embeddings, present)`` (as returned by
    :func:`pipelines.features.read_features`, first three values).
    """
    item_ids = np.asarray(item_ids, dtype=object)
    it = items.copy()
    it[ITEM] = it[ITEM].astype(str)
    it = it.drop_duplicates(ITEM).set_index(ITEM).reindex(item_ids)
    tcol = p["title_column"]
    titles = it[tcol] if tcol in it.columns else pd.Series(np.nan, index=it.index)
    titles = np.asarray([str(t) if isinstance(t, str) and t else str(i)
                         for t, i in zip(titles.tolist(), item_ids)], dtype=object)
    gcol = p["genre_column"]
    if gcol in it.columns:
        ex = _split_tokens(it[gcol], p["genre_sep"])
        codes, names = pd.factorize(ex, sort=True)  # genre columns in name order
        G = _binary_csr(ex.index.to_numpy(), codes, (len(item_ids), len(names)))
        genre_names = np.asarray(names, dtype=object)
    else:
        G = sp.csr_matrix((len(item_ids), 0), dtype=np.float32)
        genre_names = np.asarray([], dtype=object)
    side = ItemSide(item_ids, titles, G, genre_names)
    side.num_names, side.num = _numeric_attributes(it, p)
    side.tags, side.tag_names = item_tags(it, p)
    if side.tags is not None:
        S = (side.tags @ side.tags.T).tocsr().astype(np.float32)
        S.setdiag(0.0)
        S.eliminate_zeros()
        side.tag_sim = S
        side.tag_bin = S.copy()
        side.tag_bin.data[:] = 1.0
        log.info("fusion: %d tags shared by 2-%d items (%s), %d item pairs", side.tags.shape[1],
                 int(p["tag_max_items"]), ", ".join(p["tag_columns"]), S.nnz)
    for m, (fids, emb, present) in sorted((features or {}).items()):
        E, pres = align_features(item_ids, fids, emb, present)
        if not pres.any():
            log.info("fusion: modality %s has no present item, skipped", m)
            continue
        side.emb[m], side.present[m] = E, pres
    if side.emb:
        comb = _l2(np.concatenate([side.emb[m] for m in sorted(side.emb)], axis=1))
        side.content = comb
        side.content_sim = dense_topk_sim(comb, int(p["content_neighbors"]), int(p["memory_mb"]))
    return side


def _split_tokens(col: pd.Series, sep: str, max_per_item: int | None = None) -> pd.Series:
    """The non-empty, stripped tokens of a ``sep``-joined text column, indexed by row position
    (0 .. len - 1) in their order within each row; at most ``max_per_item`` per row."""
    ex = col.astype("string").fillna("").reset_index(drop=True).str.split(sep, regex=False)
    ex = ex.explode().str.strip()
    ex = ex[ex.notna() & (ex != "")]
    if max_per_item is not None:
        ex = ex[ex.groupby(level=0).cumcount() < max_per_item]
    return ex


def _binary_csr(rows: np.ndarray, codes: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Rows x codes 0/1 matrix (a token repeated in a row counts once)."""
    M = sp.csr_matrix((np.ones(len(codes), np.float32), (rows, codes)), shape=shape)
    M.sum_duplicates()
    M.data[:] = 1.0
    return M


def item_tags(it: pd.DataFrame, p: dict) -> tuple[sp.csr_matrix | None, np.ndarray | None]:
    """Items x tags binary matrix of the ``tag_columns`` (rows: ``it``'s order) and each
    tag's display name; ``(None, None)`` when no column has a tag on at least 2 items."""
    rows, toks, names = [], [], []
    for col in p["tag_columns"] or []:
        if col not in it.columns:
            log.info("fusion: tag column '%s' not in items, skipped", col)
            continue
        ex = _split_tokens(it[col], p["tag_sep"], int(p["tag_max_per_item"]))
        rows.append(ex.index.to_numpy())
        toks.append((col + "\x1f" + ex).to_numpy(dtype=object))
        names.append(ex.to_numpy(dtype=object))
    if not rows or not sum(len(r) for r in rows):
        return None, None
    codes, uniq = pd.factorize(np.concatenate(toks))  # tag columns in order of appearance
    name_of = pd.Series(np.concatenate(names)).groupby(codes).first().to_numpy(dtype=object)
    T = _binary_csr(np.concatenate(rows), codes, (len(it), len(uniq)))
    n = np.asarray(T.sum(axis=0)).ravel()
    keep = (n >= 2) & (n <= int(p["tag_max_items"]))
    if not keep.any():
        return None, None
    return T[:, keep].tocsr(), name_of[keep]


_NOT_NUMERIC = {"title", "description", "genres", "image", "video", "director", "writer", "cast"}


def _numeric_attributes(it: pd.DataFrame, p: dict) -> tuple[list, np.ndarray]:
    cols = p["item_numeric_columns"]
    if cols is None:
        cols = []
        for c in it.columns:
            if c in _NOT_NUMERIC or c in (p["title_column"], p["genre_column"]):
                continue
            x = pd.to_numeric(it[c], errors="coerce")
            if x.notna().mean() >= 0.5 and x.nunique() > 2:
                cols.append(c)
    for c in cols:
        if c not in it.columns:
            raise ValueError(f"fuse.item_numeric_columns: items table has no column '{c}'")
    if not cols:
        return [], np.zeros((len(it), 0), np.float32)
    num = np.stack([pd.to_numeric(it[c], errors="coerce").to_numpy(np.float64) for c in cols], axis=1)
    return [str(c) for c in cols], num.astype(np.float32)


@dataclass
class UserSide:
    """User attributes -> segments (independent of interactions) + readable labels."""

    user_ids: np.ndarray
    attrs: dict[str, np.ndarray]  # attribute -> level code per user (-1 never happens: 'NA' level)
    seg: np.ndarray  # combined segment code per user
    n_seg: int
    labels: np.ndarray  # readable segment per user


def _attr_codes(col: pd.Series, p: dict) -> tuple[np.ndarray, np.ndarray] | None:
    s = col
    if pd.api.types.is_bool_dtype(s):
        s = s.astype("string")
    # numbers stored as text (CSV tables are read as text: ML-100K's age) are binned like numbers
    # (the encoder's rule, attribute_spec); with few levels they stay categories, as written
    numeric, x = mostly_numeric(s)
    if numeric and x.nunique() > int(p["segment_max_levels"]):
        try:
            b = pd.qcut(x, int(p["segment_bins"]), duplicates="drop")
        except ValueError:
            return None
        lab = b.astype("string").fillna("NA")
        lab = lab.map(lambda v: v if v == "NA" else
                      v.strip("(]").replace(", ", "-").replace(".0", ""))
        s = pd.Series(lab, index=s.index)
    elif pd.api.types.is_numeric_dtype(s):
        s = x.astype("string")
    s = s.astype("string").fillna("NA").str.strip()
    if s.nunique() > int(p["segment_max_levels"]) or s.nunique() < 2:
        return None
    codes, levels = pd.factorize(s, sort=True)
    return codes.astype(np.int64), np.asarray(levels, dtype=object)


def build_user_side(users: pd.DataFrame | None, user_ids: np.ndarray, p: dict,
                    profiles: pd.DataFrame | None = None) -> UserSide:
    user_ids = np.asarray(user_ids, dtype=object)
    attrs, labels = {}, []
    if users is not None and len(users) and USER in users.columns:
        u = users.copy()
        u[USER] = u[USER].astype(str)
        u = u.drop_duplicates(USER).set_index(USER).reindex(user_ids)
        cols = p["segment_columns"]
        if cols is None:
            cols = [c for c in u.columns if c not in ("zip_code", "zip", "postcode", "email", "name")]
        for c in cols:
            if c not in u.columns:
                raise ValueError(f"fuse.segment_columns: users table has no column '{c}'")
            res = _attr_codes(u[c], p)
            if res is None:
                continue
            attrs[str(c)] = res[0]
            labels.append(res[1][res[0]])
    if attrs:
        stacked = np.stack(list(attrs.values()), axis=1)
        _, seg = np.unique(stacked, axis=0, return_inverse=True)
        seg = np.asarray(seg).ravel().astype(np.int64)
        text = np.asarray([", ".join(str(v) for v in row) for row in zip(*labels)], dtype=object)
    else:
        seg = np.zeros(len(user_ids), np.int64)
        text = np.full(len(user_ids), "all users", dtype=object)
    if profiles is not None and "segment" in profiles.columns and USER in profiles.columns:
        prof = profiles.assign(**{USER: profiles[USER].astype(str)}).drop_duplicates(USER)
        named = prof.set_index(USER)["segment"].reindex(user_ids)
        ok = named.notna().to_numpy()
        text = np.where(ok, named.astype("string").fillna("").to_numpy(dtype=object), text)
    return UserSide(user_ids, attrs, seg, int(seg.max()) + 1 if len(seg) else 1, text)


# =========================================================================== context

@dataclass
class Context:
    """Statistics derived from ONE set of interactions (the fit fold, or all training rows)."""

    inter: Interactions
    X: sp.csr_matrix  # binary users x items (what the user has seen)
    pop: np.ndarray
    p_glob: np.ndarray  # share of active users who interacted with the item
    logpop: np.ndarray
    logshare: np.ndarray  # log of popularity / mean popularity (half an interaction for cold items)
    user_rel: np.ndarray  # log of the user's interactions over the mean active user's
    pop_pct: np.ndarray
    cold: np.ndarray  # item without interaction in these rows
    item_first: np.ndarray
    item_last: np.ndarray
    item_rating: np.ndarray
    user_n: np.ndarray
    user_last: np.ndarray
    user_logpop: np.ndarray
    user_vec: dict[str, np.ndarray]
    user_has_vec: dict[str, np.ndarray]
    genre_share: np.ndarray  # users x genres
    genre_lift: np.ndarray  # users x genres (smoothed)
    seg_pop: np.ndarray  # segments x items, smoothed share of segment users
    seg_genre_lift: np.ndarray  # segments x genres
    attr_lift: dict[str, np.ndarray]  # attribute -> levels x items lift
    S: sp.csr_matrix  # item-item cosine, top-k neighbours (co-occurrence in these rows)
    S_bin: sp.csr_matrix
    S_pow: sp.csr_matrix  # S ** knn_power (soft max over the history)
    X_recent: sp.csr_matrix  # each user's last ``recent_n`` items
    user_first: np.ndarray
    ts_keys: np.ndarray  # sorted item_index * 1e10 + timestamp (window counts)
    R_c: sp.csr_matrix | None  # user-centred ratings (None without a rating column)
    D: sp.csr_matrix  # users x time buckets: around the user's active buckets
    H_T: sp.csr_matrix  # time buckets x items: interaction counts
    num_mean: np.ndarray  # users x numeric item attributes: mean over the history
    num_std: np.ndarray


def _group_max(codes: np.ndarray, values: np.ndarray, n: int, fn=np.fmax) -> np.ndarray:
    out = np.full(n, np.nan)
    fn.at(out, codes, values.astype(np.float64))
    return out


def _smoothed_table(A: sp.csr_matrix, X: sp.csr_matrix, p_glob: np.ndarray, m: float) -> np.ndarray:
    """(levels x items) share of each level's users who interacted, smoothed towards ``p_glob``."""
    counts = (A.T @ X).toarray().astype(np.float64)
    active = (np.diff(X.indptr) > 0).astype(np.float64)
    n_level = A.T @ active
    return ((counts + m * p_glob[None, :]) / (n_level[:, None] + m)).astype(np.float32)


def build_context(inter: Interactions, items: ItemSide, users: UserSide, p: dict) -> Context:
    m = float(p["smoothing"])
    X = inter.matrix()
    nu, ni = X.shape
    df = inter.df
    pop = np.asarray(X.sum(axis=0)).ravel().astype(np.float64)
    active = np.diff(X.indptr) > 0
    n_active = max(int(active.sum()), 1)
    p_glob = pop / n_active
    logpop = np.log1p(pop).astype(np.float32)
    # popularity relative to the mean interacted item: the same scale on the fit fold and on
    # every training row (a raw count or a share of users grows with the amount of data)
    mean_pop = float(pop[pop > 0].mean()) if (pop > 0).any() else 1.0
    logshare = np.log((pop + 0.5) / mean_pop).astype(np.float32)
    order = np.argsort(np.argsort(pop, kind="stable"), kind="stable")
    pop_pct = (order / max(ni - 1, 1)).astype(np.float32)
    iidx, uidx = df["iidx"].to_numpy(), df["uidx"].to_numpy()
    ts = pd.to_numeric(df[TS], errors="coerce").to_numpy(np.float64) if TS in df else \
        np.full(len(df), np.nan)
    item_first = _group_max(iidx, -ts, ni)
    item_first = -item_first
    item_last = _group_max(iidx, ts, ni)
    user_last = _group_max(uidx, ts, nu)
    if RATING in df.columns and pd.api.types.is_numeric_dtype(df[RATING]) and df[RATING].notna().any():
        r = df[RATING].to_numpy(np.float64)
        ok = np.isfinite(r)
        g = r[ok].mean()
        s = np.bincount(iidx[ok], weights=r[ok], minlength=ni)
        c = np.bincount(iidx[ok], minlength=ni)
        item_rating = ((s + m * g) / (c + m)).astype(np.float32)
        item_rating[c == 0] = np.nan
    else:
        item_rating = np.full(ni, np.nan, np.float32)
    user_n = np.diff(X.indptr).astype(np.float32)
    mean_n = float(user_n[active].mean()) if active.any() else 1.0
    user_rel = np.log((user_n + 0.5) / mean_n).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        user_logpop = (np.asarray(X @ logpop).ravel() / user_n).astype(np.float32)
    user_logpop[user_n == 0] = np.nan
    # content vectors: mean of the normalised embeddings of the history items that have one
    user_vec, has_vec = {}, {}
    for mod, E in items.emb.items():
        pres = items.present[mod].astype(np.float32)
        Xp = X.multiply(pres[None, :]).tocsr()
        V = np.asarray(Xp @ E, dtype=np.float32)
        user_vec[mod] = _l2(V)
        has_vec[mod] = np.asarray(Xp.sum(axis=1)).ravel() > 0
    # genre interests
    G = items.genres
    if G.shape[1]:
        ucount = (X @ G).toarray().astype(np.float64)
        gcount = np.asarray(pop @ G).ravel()
        glob = gcount / max(gcount.sum(), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = ucount / np.maximum(user_n[:, None], 1.0)
            gl = np.where(glob > 0, glob, np.nan)
            lift = (ucount + m * glob[None, :]) / (ucount.sum(1, keepdims=True) + m) / gl[None, :]
        A = sp.csr_matrix((np.ones(nu, np.float32), (np.arange(nu), users.seg)),
                          shape=(nu, users.n_seg))
        scount = (A.T @ ucount)
        with np.errstate(invalid="ignore", divide="ignore"):
            seg_lift = (scount + m * glob[None, :]) / (scount.sum(1, keepdims=True) + m) / gl[None, :]
    else:
        share = np.zeros((nu, 0))
        lift = np.zeros((nu, 0))
        seg_lift = np.zeros((users.n_seg, 0))
    # segment / attribute popularity
    A = sp.csr_matrix((np.ones(nu, np.float32), (np.arange(nu), users.seg)), shape=(nu, users.n_seg))
    seg_pop = _smoothed_table(A, X, p_glob, m)
    attr_lift = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.where(p_glob > 0, 1.0 / p_glob, np.nan).astype(np.float32)
        for name, codes in users.attrs.items():
            Aa = sp.csr_matrix((np.ones(nu, np.float32), (np.arange(nu), codes)),
                               shape=(nu, int(codes.max()) + 1))
            attr_lift[name] = _smoothed_table(Aa, X, p_glob, m) * inv[None, :]
    # item-item co-occurrence neighbourhood and the user's most recent items
    from .recommenders.knn import cosine_topk

    S = cosine_topk(X, int(p["knn_neighbors"])) if X.nnz else sp.csr_matrix((ni, ni), dtype=np.float32)
    S_bin = S.copy()
    S_bin.data[:] = 1.0
    # cosine similarities grow with the density of the data: express them relative to the mean
    # neighbour similarity so that fit-fold and full features share one scale
    if S.nnz:
        S = (S / float(S.data.mean())).tocsr()
    S_pow = S.power(float(p["knn_power"])).tocsr()
    user_first = -_group_max(uidx, -ts, nu)
    recent = _recent(df, nu, ni, int(p["recent_n"]))
    keys = np.sort(iidx.astype(np.float64) * 1e10 + np.where(np.isfinite(ts), ts, -1.0))
    R_c = None
    if RATING in df.columns and pd.api.types.is_numeric_dtype(df[RATING]) and df[RATING].notna().any():
        r = pd.to_numeric(df[RATING], errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(r)
        su = np.bincount(uidx[ok], weights=r[ok], minlength=nu)
        cu = np.bincount(uidx[ok], minlength=nu)
        mu = np.divide(su, cu, out=np.zeros(nu), where=cu > 0)
        R_c = sp.csr_matrix(((r[ok] - mu[uidx[ok]]).astype(np.float32), (uidx[ok], iidx[ok])),
                            shape=(nu, ni))
        R_c.sum_duplicates()
    D, H_T = _time_buckets(uidx, iidx, ts, nu, ni, p)
    num_mean, num_std = _user_numeric(X, items.num)
    return Context(inter, X, pop.astype(np.float32), p_glob.astype(np.float32), logpop, logshare,
                   user_rel, pop_pct,
                   pop == 0, item_first, item_last, item_rating, user_n, user_last, user_logpop,
                   user_vec, has_vec, share.astype(np.float32), lift.astype(np.float32),
                   seg_pop, seg_lift.astype(np.float32), attr_lift, S, S_bin, S_pow, recent,
                   user_first, keys, R_c, D, H_T, num_mean, num_std)


def _time_buckets(uidx, iidx, ts, nu, ni, p) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Users x buckets (the user's active buckets, dilated) and buckets x items (counts)."""
    ok = np.isfinite(ts)
    if not ok.any():
        return sp.csr_matrix((nu, 1), dtype=np.float32), sp.csr_matrix((1, ni), dtype=np.float32)
    width = float(p["session_hours"]) * 3600.0
    b = np.floor((ts[ok] - ts[ok].min()) / width).astype(np.int64)
    nb = int(b.max()) + 1
    if nb > int(p["max_time_buckets"]):
        factor = int(math.ceil(nb / int(p["max_time_buckets"])))
        b //= factor
        nb = int(b.max()) + 1
    H_T = sp.csr_matrix((np.ones(len(b), np.float32), (b, iidx[ok])), shape=(nb, ni))
    H_T.sum_duplicates()
    D0 = sp.csr_matrix((np.ones(len(b), np.float32), (uidx[ok], b)), shape=(nu, nb))
    D0.sum_duplicates()
    D0.data[:] = 1.0
    w = int(p["session_window"])
    if w > 0:
        band = sp.diags([np.ones(nb - abs(o), np.float32) for o in range(-w, w + 1)],
                        list(range(-w, w + 1)), shape=(nb, nb), format="csr")
        D0 = (D0 @ band).tocsr()
        D0.data[:] = 1.0
    return D0.astype(np.float32), H_T


def _user_numeric(X: sp.csr_matrix, num: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if num is None or not num.shape[1]:
        return np.zeros((X.shape[0], 0), np.float32), np.zeros((X.shape[0], 0), np.float32)
    ok = np.isfinite(num)
    v = np.where(ok, num, 0.0).astype(np.float64)
    cnt = np.asarray(X @ ok.astype(np.float64))
    s1 = np.asarray(X @ v)
    s2 = np.asarray(X @ (v * v))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        std = np.sqrt(np.maximum(s2 / cnt - mean ** 2, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def _recent(df: pd.DataFrame, nu: int, ni: int, n: int) -> sp.csr_matrix:
    """Binary users x items of each user's last ``n`` interactions (by timestamp)."""
    if not len(df) or n <= 0:
        return sp.csr_matrix((nu, ni), dtype=np.float32)
    d = df[["uidx", "iidx"]].copy()
    d["ts"] = pd.to_numeric(df[TS], errors="coerce").fillna(0).to_numpy() if TS in df else 0
    d = d.sort_values(["uidx", "ts", "iidx"], ascending=[True, False, True], kind="stable")
    d = d[d.groupby("uidx").cumcount() < n]
    M = sp.csr_matrix((np.ones(len(d), np.float32), (d["uidx"].to_numpy(), d["iidx"].to_numpy())),
                      shape=(nu, ni))
    M.sum_duplicates()
    M.data[:] = 1.0
    return M


# =========================================================================== sources

@dataclass
class Source:
    name: str
    n: int  # candidates proposed per user
    score: Callable[[np.ndarray], np.ndarray]  # catalogue user idx -> [B, n_items] float32
    only_cold: bool = False
    model: bool = False  # a fitted Recommender: used only on warm users x warm items (see frame)
    fixed: bool = False  # a model the stage cannot re-fit (see refittable): never on cold users


class ModelSource:
    """A fitted :class:`Recommender`, re-indexed to the catalogue users and items."""

    def __init__(self, model: Recommender, user_ids: np.ndarray, item_ids: np.ndarray):
        self.model = model
        self.umap = model.user_index(user_ids)
        if len(model.item_ids) == len(item_ids) and np.array_equal(
                np.asarray(model.item_ids, dtype=object).astype(str), item_ids.astype(str)):
            self.cols = None
        else:
            self.cols = pd.Index(np.asarray(model.item_ids, dtype=object).astype(str)).get_indexer(
                item_ids.astype(str))
        self.n_items = len(item_ids)

    def __call__(self, uidx: np.ndarray) -> np.ndarray:
        sc = np.array(self.model.score_users(self.umap[uidx]), dtype=np.float32, copy=True)
        if self.cols is not None:
            out = np.full((len(uidx), self.n_items), -np.inf, np.float32)
            ok = self.cols >= 0
            out[:, ok] = sc[:, self.cols[ok]]
            sc = out
        sc[~np.isfinite(sc)] = -np.inf
        return sc


class UserKNNScorer:
    """User-based kNN on the context rows: cosine to every user, top-k neighbours, their items.

    With ``pool`` > 0 and more users than that, the neighbours are chosen among the ``pool``
    users with the longest histories (ties: lower index), the rule of
    :class:`~pipelines.recommenders.userknn.UserKNN` (``max_candidates``): a batch of B users
    then costs B x pool similarities instead of B x users, so scoring every user grows
    linearly with their number.  Otherwise (the default up to 20,000 users) it is exact.
    """

    def __init__(self, X: sp.csr_matrix, k: int, cold: np.ndarray, pool: int = 0):
        self.X = X
        self.norm = np.sqrt(np.asarray(X.sum(axis=1)).ravel()).astype(np.float32)
        self.pool = None
        if 0 < int(pool) < X.shape[0]:  # (fuse.user_neighbor_pool is checked in resolve_params)
            self.pool = np.sort(np.argsort(-np.diff(X.indptr), kind="stable")[:int(pool)])
        self.Xp = X if self.pool is None else X[self.pool].tocsr()
        self.XpT = self.Xp.T.tocsr()
        self.norm_p = self.norm if self.pool is None else self.norm[self.pool]
        self.k, self.cold = max(1, int(k)), cold

    def __call__(self, uidx: np.ndarray) -> np.ndarray:
        B, n_p = len(uidx), self.Xp.shape[0]
        sims = np.asarray((self.X[uidx] @ self.XpT).toarray(), dtype=np.float32)
        denom = self.norm[uidx][:, None] * self.norm_p[None, :]
        np.divide(sims, denom, out=sims, where=denom > 0)
        if self.pool is None:
            sims[np.arange(B), uidx] = 0.0
        elif n_p:  # a user in the pool is not its own neighbour
            pos = np.minimum(np.searchsorted(self.pool, uidx), n_p - 1)
            own = self.pool[pos] == uidx
            sims[np.nonzero(own)[0], pos[own]] = 0.0
        k = min(self.k, n_p)
        top = topk(sims, k)
        vals = np.take_along_axis(sims, top, axis=1)
        keep = vals > 0
        W = sp.csr_matrix((vals[keep], (np.broadcast_to(np.arange(B)[:, None], top.shape)[keep],
                                        top[keep])), shape=(B, n_p))
        sc = np.asarray((W @ self.Xp).toarray(), dtype=np.float32)
        sc[:, self.cold] = -np.inf
        return sc


def refittable(model: Recommender) -> bool:
    """Whether the fuse stage can re-fit a clone of ``model`` (see :func:`clone_model`).

    Models that need side information to fit (the sequence encoder) are *fixed* sources: their
    ``fit`` variant is used as trained, masked on the cold users and cold items of the training
    context (the rows that the cold-start simulation moved into the labels are exactly theirs)
    and at test time alike, so that the ranker meets them where it learned them (hiding them
    from the simulated cold users only measured slightly worse on the ML-100K coldstart
    protocol: 0.4955 vs 0.4982 NDCG@10); they are absent (NaN features, no candidates) from the
    extra cross-fitting folds, whose labels are fit rows that the ``fit`` variant learned from."""
    return not hasattr(model, "set_side_info")


def make_sources(models: dict[str, Recommender], ctx: Context, items: ItemSide,
                 users: UserSide, p: dict, absent: tuple | list | set = ()) -> list[Source]:
    """Every candidate source on context ``ctx``.  ``absent``: model names without a usable
    model in this context (see :func:`refittable`): same feature columns, all missing."""
    srcs = []
    ni = len(items.item_ids)
    for name in sorted(set(models) | set(absent)):
        if name in models:
            srcs.append(Source(name, n_candidates(p, name),
                               ModelSource(models[name], users.user_ids, items.item_ids), model=True,
                               fixed=not refittable(models[name])))
        else:
            srcs.append(Source(name, n_candidates(p, name),
                               lambda uidx: np.full((len(uidx), ni), -np.inf, np.float32),
                               model=True, fixed=True))
    for mod in sorted(items.emb):
        E, pres, U, has = items.emb[mod], items.present[mod], ctx.user_vec[mod], ctx.user_has_vec[mod]

        def content(uidx, E=E, pres=pres, U=U, has=has):
            sc = U[uidx] @ E.T
            sc[:, ~pres] = -np.inf
            sc[~has[uidx]] = -np.inf
            return sc.astype(np.float32, copy=False)

        srcs.append(Source(f"content_{mod}", n_candidates(p, f"content_{mod}"), content))
    if ctx.X.nnz:
        def cooc_item(uidx, X=ctx.X, S=ctx.S):
            sc = np.asarray((X[uidx] @ S).toarray(), dtype=np.float32)
            sc[:, ctx.cold] = -np.inf
            return sc

        srcs.append(Source("cooc_item", n_candidates(p, "cooc_item"), cooc_item))
        srcs.append(Source("cooc_user", n_candidates(p, "cooc_user"),
                           UserKNNScorer(ctx.X, int(p["user_neighbors"]), ctx.cold,
                                         int(p["user_neighbor_pool"]))))
    seg_pop = np.where(ctx.pop[None, :] > 0, ctx.seg_pop, -np.inf).astype(np.float32)
    srcs.append(Source("segment_pop", n_candidates(p, "segment_pop"),
                       lambda uidx: seg_pop[users.seg[uidx]].copy()))
    if items.content_sim is not None and items.content_sim.nnz:
        def knn(uidx, X=ctx.X, S=items.content_sim):
            return np.asarray((X[uidx] @ S).toarray(), dtype=np.float32)

        srcs.append(Source("content_knn", n_candidates(p, "content_knn"), knn,
                           only_cold=bool(p["content_knn_cold_only"])))
    if p.get("sources"):
        keep = set(p["sources"])
        srcs = [s for s in srcs if s.name in keep]
    if len(srcs) > 62:
        raise ValueError(f"fusion supports at most 62 sources, got {len(srcs)}")
    return srcs


def check_no_leak(models: dict[str, Recommender], rows: pd.DataFrame, what: str = "validation") -> None:
    """Raise if any (user, item) of ``rows`` is in the training data of one of ``models``."""
    if not len(rows):
        return
    for name, model in models.items():
        seen = getattr(model, "_seen", None)
        if seen is None:
            continue
        u = model.user_index(rows[USER].astype(str).to_numpy())
        i = pd.Index(np.asarray(model.item_ids, dtype=object).astype(str)).get_indexer(
            rows[ITEM].astype(str).to_numpy())
        ok = (u >= 0) & (i >= 0)
        hit = int((np.asarray(seen[u[ok], i[ok]]).ravel() > 0).sum()) if ok.any() else 0
        if hit:
            raise ValueError(f"fusion: source '{name}' was trained on {hit} of {len(rows)} {what} "
                             f"interactions (leakage): the training-time models must be fitted "
                             f"on the 'fit' fold only")


# =========================================================================== features

def _expand(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray):
    """For each entry r of ``rows`` the CSR row's column indices: (pair index, column, counts)."""
    counts = (indptr[rows + 1] - indptr[rows]).astype(np.int64)
    tot = int(counts.sum())
    pair = np.repeat(np.arange(len(rows)), counts)
    offs = np.cumsum(counts) - counts
    pos = np.arange(tot) - np.repeat(offs, counts) + np.repeat(indptr[rows].astype(np.int64), counts)
    return pair, indices[pos], counts


def _pair_mean_max(pair: np.ndarray, vals: np.ndarray, counts: np.ndarray):
    n = len(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(pair, weights=vals, minlength=n) / counts
    mx = np.full(n, np.nan)
    nz = counts > 0
    if nz.any() and len(vals):
        mx[nz] = np.maximum.reduceat(vals, (np.cumsum(counts) - counts)[nz])
    mean[~nz] = np.nan
    return mean.astype(np.float32), mx.astype(np.float32)


def _gather(M: sp.spmatrix, r: np.ndarray, i: np.ndarray) -> np.ndarray:
    """M[r, i] of a (batch-sized) sparse product, through a dense block (scipy's sparse fancy
    indexing is far slower than densifying one batch)."""
    return np.asarray(M.toarray(), dtype=np.float64)[r, i]


def _nan(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.isfinite(x), x, np.float32(np.nan))


@dataclass
class Frame:
    users: np.ndarray  # catalogue user index per pair (grouped, ascending)
    items: np.ndarray
    X: np.ndarray  # float32 [n_pairs, n_features]
    bits: np.ndarray  # int64 bitmask of proposing sources
    names: list[str]


class FeatureBuilder:
    """Candidates + features for user batches, from one context and one set of sources."""

    def __init__(self, sources: list[Source], ctx: Context, items: ItemSide, users: UserSide, p: dict):
        self.sources, self.ctx, self.items, self.users, self.p = sources, ctx, items, users, p
        self.names = self.feature_names()
        ni = items.n_items
        per_cell = 12 * max(len(sources), 1) + 16
        self.batch = int(max(1, min(4096, int(p["memory_mb"]) * 2**20 // (per_cell * max(ni, 1)))))
        self.timings = {"score": 0.0, "features": 0.0}

    def feature_names(self) -> list[str]:
        names = []
        raw = bool(self.p["raw_scores"])
        for s in self.sources:
            names += ([f"{s.name}_score"] if raw else []) + [f"{s.name}_ratio", f"{s.name}_z",
                                                             f"{s.name}_rank"]
        names += ["knn_sum", "knn_count", "knn_mean", "knn_max", "knn_recent", "window_share",
                  "knn_liked", "session_share"]
        if self.items.tag_sim is not None:
            names += ["tag_sum", "tag_share", "tag_recent"]
        for c in self.items.num_names:
            names += [f"item_{c}", f"item_{c}_vs_user"]
        names += ["n_sources", "pop_log", "pop_pct", "is_cold_item", "item_rating",
                  "item_last_days", "item_age_days", "user_activity", "user_x_pop", "pop_vs_user"]
        if self.items.genres.shape[1]:
            names += ["genre_share", "genre_lift_mean", "genre_lift_max", "seg_genre_lift"]
        names += ["seg_lift"] + [f"attr_{a}_lift" for a in sorted(self.ctx.attr_lift)]
        return names

    def _knn_window(self, seen, uidx, r, i, u) -> list[np.ndarray]:
        """Co-occurrence neighbourhood of the history, and the item's activity in the user's window."""
        ctx = self.ctx
        ssum = _gather(seen @ ctx.S, r, i)
        cnt = _gather(seen @ ctx.S_bin, r, i)
        spow = _gather(seen @ ctx.S_pow, r, i)
        rec = _gather(ctx.X_recent[uidx] @ ctx.S, r, i)
        n_hist = np.maximum(ctx.user_n[u], 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, ssum / cnt, np.nan)
            smax = np.where(spow > 0, spow ** (1.0 / float(self.p["knn_power"])), np.nan)
        margin = float(self.p["window_days"]) * 86400.0
        lo = i.astype(np.float64) * 1e10 + (ctx.user_first[u] - margin)
        hi = i.astype(np.float64) * 1e10 + (ctx.user_last[u] + margin)
        ok = np.isfinite(lo) & np.isfinite(hi)
        n_win = np.zeros(len(i))
        if ok.any():
            n_win[ok] = (np.searchsorted(ctx.ts_keys, hi[ok], side="right")
                         - np.searchsorted(ctx.ts_keys, lo[ok], side="left"))
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where((ctx.pop[i] > 0) & ok, n_win / ctx.pop[i], np.nan)
        liked = np.full(len(i), np.nan)
        if ctx.R_c is not None:
            lsum = _gather(ctx.R_c[uidx] @ ctx.S, r, i)
            with np.errstate(invalid="ignore", divide="ignore"):
                liked = np.where(ssum > 0, lsum / ssum, np.nan)
        near = _gather(ctx.D[uidx] @ ctx.H_T, r, i)
        with np.errstate(invalid="ignore", divide="ignore"):
            session = np.where(ctx.pop[i] > 0, near / ctx.pop[i], np.nan)
        cols = [ssum / n_hist, cnt / n_hist, mean, smax, rec, share, liked, session]
        if self.items.tag_sim is not None:  # people shared with the history
            cols += [_gather(seen @ self.items.tag_sim, r, i) / n_hist,
                     _gather(seen @ self.items.tag_bin, r, i) / n_hist,
                     _gather(ctx.X_recent[uidx] @ self.items.tag_bin, r, i)]
        num = self.items.num
        for c in range(len(self.items.num_names)):
            v = num[i, c]
            with np.errstate(invalid="ignore", divide="ignore"):
                z = (v - ctx.num_mean[u, c]) / np.maximum(ctx.num_std[u, c], 1e-6)
            cols += [v, z]
        return cols

    def batches(self, uidx: np.ndarray):
        for start in range(0, len(uidx), self.batch):
            yield self.frame(uidx[start:start + self.batch])

    def frame(self, uidx: np.ndarray) -> Frame:
        t0 = time.perf_counter()
        ctx, p = self.ctx, self.p
        uidx = np.asarray(uidx, dtype=np.int64)
        B, ni = len(uidx), self.items.n_items
        seen = ctx.X[uidx]
        srows = np.repeat(np.arange(B), np.diff(seen.indptr))
        mask = np.zeros((B, ni), bool)
        bits = np.zeros((B, ni), np.int64)
        scores, ranks, stats = [], [], []
        depth_cfg = int(p["rank_depth"])
        cold_max = int(p["cold_user_max"])
        for j, s in enumerate(self.sources):
            sc = s.score(uidx)
            if sc.shape != (B, ni):
                raise ValueError(f"source '{s.name}' returned scores of shape {sc.shape}, "
                                 f"expected {(B, ni)}")
            if s.model:  # fitted models: warm items (and warm users) of the context only
                if not p["model_cold_users"] or s.fixed:
                    sc[ctx.user_n[uidx] <= cold_max] = -np.inf
                sc[:, ctx.cold] = -np.inf
            sc[srows, seen.indices] = -np.inf
            fin = np.isfinite(sc)
            cnt = fin.sum(1)
            z = np.where(fin, sc, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = z.sum(1) / cnt
                std = np.sqrt(np.maximum((z * z).sum(1) / cnt - mean ** 2, 0.0))
            sel = np.where(ctx.cold[None, :], sc, -np.inf) if s.only_cold else sc
            depth = min(max(s.n, depth_cfg), ni)
            rank = np.where(fin, np.float32(depth + 1), np.float32(np.nan)).astype(np.float32)
            best = np.full(B, np.nan, np.float32)
            if depth > 0:
                top = topk(sel, depth)
                tv = np.take_along_axis(sel, top, axis=1)
                ok = np.isfinite(tv)
                rr = np.broadcast_to(np.arange(B)[:, None], top.shape)
                rank[rr[ok], top[ok]] = np.broadcast_to(np.arange(1, depth + 1, dtype=np.float32),
                                                        top.shape)[ok]
                top_all = topk(sc, 1)[:, 0] if s.only_cold else top[:, 0]
                best = _nan(sc[np.arange(B), top_all])
                n = min(s.n, depth)
                if n > 0:
                    okn = ok[:, :n]
                    mask[rr[:, :n][okn], top[:, :n][okn]] = True
                    bits[rr[:, :n][okn], top[:, :n][okn]] |= np.int64(1) << j
            scores.append(sc)
            ranks.append(rank)
            stats.append((best, mean.astype(np.float32), std.astype(np.float32)))
        t1 = time.perf_counter()
        r, i = np.nonzero(mask)
        u = uidx[r]
        cols = []
        for sc, rank, (best, mean, std) in zip(scores, ranks, stats):
            v = _nan(sc[r, i])
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(best[r] > 0, v / best[r], np.nan)
                zs = np.where(std[r] > 0, (v - mean[r]) / std[r], np.nan)
            cols += ([v] if self.p["raw_scores"] else []) + [ratio, zs, rank[r, i]]
        cols += self._knn_window(seen, uidx, r, i, u)
        pb = bits[r, i]
        nsrc = np.zeros(len(r), np.float32)
        for j in range(len(self.sources)):
            nsrc += ((pb >> j) & 1).astype(np.float32)
        # popularity as a share of active users and activity relative to the mean user: the
        # same scale whether computed on the fit fold or on every training row
        logpop = ctx.logshare[i]
        un = ctx.user_rel[u]
        day = 86400.0
        cols += [nsrc, logpop, ctx.pop_pct[i], ctx.cold[i].astype(np.float32), ctx.item_rating[i],
                 (ctx.user_last[u] - ctx.item_last[i]) / day, (ctx.user_last[u] - ctx.item_first[i]) / day,
                 un, un * logpop, ctx.logpop[i] - ctx.user_logpop[u]]
        if self.items.genres.shape[1]:
            G = self.items.genres
            pair, g, counts = _expand(G.indptr, G.indices, i)
            share, _ = _pair_mean_max(pair, ctx.genre_share[u[pair], g], counts)
            lmean, lmax = _pair_mean_max(pair, ctx.genre_lift[u[pair], g], counts)
            sgl, _ = _pair_mean_max(pair, ctx.seg_genre_lift[self.users.seg[u[pair]], g], counts)
            cols += [share, lmean, lmax, sgl]
        with np.errstate(invalid="ignore", divide="ignore"):
            pg = ctx.p_glob[i]
            cols.append(np.where(pg > 0, ctx.seg_pop[self.users.seg[u], i] / pg, np.nan))
        for a in sorted(ctx.attr_lift):
            cols.append(ctx.attr_lift[a][self.users.attrs[a][u], i])
        Xf = _nan(np.stack([np.asarray(c, dtype=np.float32) for c in cols], axis=1)) if len(r) else \
            np.zeros((0, len(self.names)), np.float32)
        if Xf.shape[1] != len(self.names):
            raise RuntimeError("fusion: feature names and columns disagree")  # programming error
        self.timings["score"] += t1 - t0
        self.timings["features"] += time.perf_counter() - t1
        return Frame(u, i.astype(np.int64), Xf, pb, self.names)


# =========================================================================== ranker

def _lightgbm():
    import lightgbm

    return lightgbm


def ranker_kind(p: dict) -> str:
    if p["ranker"] == "sklearn":
        return "sklearn"
    try:
        _lightgbm()
    except ImportError:
        if p["ranker"] == "lightgbm":
            raise
        log.warning("fusion: lightgbm is not importable, falling back to scikit-learn (pointwise)")
        return "sklearn"
    return "lightgbm"


def _group_sizes(groups: np.ndarray) -> np.ndarray:
    if not len(groups):
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.nonzero(groups[1:] != groups[:-1])[0] + 1]
    return np.diff(np.r_[starts, len(groups)])


class Ranker:
    """LightGBM LambdaRank (text model) or a pointwise sklearn HGB (JSON trees) behind one API."""

    def __init__(self, kind: str, features: list[str], booster=None, trees: dict | None = None,
                 info: dict | None = None):
        self.kind, self.features = kind, list(features)
        self.booster, self.trees = booster, trees
        self.info = dict(info or {})
        # held-out users' scores from before a refit on every user (set by training; not saved)
        self.heldout_pred: np.ndarray | None = None

    # ---- training --------------------------------------------------------
    @classmethod
    def train(cls, X, y, groups, X_eval, y_eval, groups_eval, features, p,
              group_weight: np.ndarray | None = None) -> "Ranker":
        """``group_weight``: optional weight per group id (see :func:`group_weights`), applied
        to every row of the group in the training loss (not to the early-stopping metric)."""
        kind = ranker_kind(p)
        if kind == "lightgbm":
            return cls._train_lgb(X, y, groups, X_eval, y_eval, groups_eval, features, p,
                                  group_weight)
        return cls._train_sklearn(X, y, X_eval, y_eval, features, p,
                                  None if group_weight is None else group_weight[groups])

    @classmethod
    def _train_lgb(cls, X, y, groups, Xe, ye, ge, features, p, gw=None) -> "Ranker":
        lgb = _lightgbm()

        def make(n, seed):
            bag = float(p["bagging_fraction"])
            return lgb.LGBMRanker(
                objective=str(p["objective"]), n_estimators=int(n),
                learning_rate=float(p["learning_rate"]),
                num_leaves=int(p["num_leaves"]), min_child_samples=int(p["min_child_samples"]),
                colsample_bytree=float(p["feature_fraction"]), reg_lambda=float(p["lambda_l2"]),
                subsample=bag, subsample_freq=1 if bag < 1.0 else 0,
                random_state=int(seed), n_jobs=int(p["num_threads"]), deterministic=True,
                force_row_wise=True, verbose=-1)

        seed, n_bags = int(p["seed"]), max(1, int(p["n_bags"]))
        eval_ok = len(ye) > 0 and ye.sum() > 0
        n_rows = len(y) + len(ye)
        large = {k: int(p.get(k) or 0) for k in ("bag_max_rows", "refit_max_rows")}
        bags_capped = bool(large["bag_max_rows"] and n_rows > large["bag_max_rows"] and n_bags > 1)
        if bags_capped:
            n_bags = 1
        model = make(p["n_estimators"], seed)
        kw = {}
        if eval_ok:
            kw = dict(eval_X=(Xe,), eval_y=(ye,), eval_group=[_group_sizes(ge)],
                      eval_at=[int(p["eval_at"])],
                      callbacks=[lgb.early_stopping(int(p["early_stopping_rounds"]), verbose=False)])
        if gw is not None:  # LightGBM's ranking objectives scale each row's gradient by it
            kw["sample_weight"] = gw[groups]
        model.fit(X, y, group=_group_sizes(groups), feature_name=list(features), **kw)
        best = int(model.best_iteration_ or 0) if eval_ok else 0
        best = best if best > 0 else int(p["n_estimators"])
        info = {"best_iteration": best, "early_stopping": bool(eval_ok), "n_bags": n_bags,
                "objective": str(p["objective"]),
                "group_weight_power": float(p.get("group_weight_power") or 0.0)}
        if eval_ok:
            info["eval_ndcg"] = float(model.best_score_["valid_0"][f"ndcg@{int(p['eval_at'])}"])
        refit = bool(eval_ok and p["refit_full"])
        if bags_capped:
            info["bags_capped"] = f"{n_rows} training rows > bag_max_rows {large['bag_max_rows']}"
        if refit and large["refit_max_rows"] and n_rows > large["refit_max_rows"]:
            refit = False
            info["refit_skipped"] = f"{n_rows} training rows > refit_max_rows {large['refit_max_rows']}"
        if refit:  # every validation user, the early-stopped number of trees
            Xa, ya = np.concatenate([X, Xe]), np.concatenate([y, ye])
            ga = np.concatenate([groups, ge])
            order = np.argsort(ga, kind="stable")
            Xa, ya, ga = Xa[order], ya[order], ga[order]
            info["refit_full"] = True
        else:
            Xa, ya, ga = X, y, groups
        strings = []
        for b in range(n_bags):
            if b == 0 and not refit:
                m = model
            else:
                m = make(best, seed + b)
                m.fit(Xa, ya, group=_group_sizes(ga), feature_name=list(features),
                      sample_weight=None if gw is None else gw[ga])
            strings.append(m.booster_.model_to_string(num_iteration=best))
        text = strings[0] if n_bags == 1 else merge_lgb_models(strings)
        out = cls("lightgbm", features, booster=lgb.Booster(model_str=text), info=info)
        # with a refit: the early-stopped model's scores of the held-out users, before the
        # refit learnt on them (diagnostics only, never saved); without one the saved ranker
        # (every bag) never saw them
        out.heldout_pred = (np.asarray(model.predict(Xe, num_iteration=best), dtype=np.float64)
                            if refit else None)
        return out

    @classmethod
    def _train_sklearn(cls, X, y, Xe, ye, features, p, sample_weight=None) -> "Ranker":
        from sklearn.ensemble import HistGradientBoostingClassifier

        # early_stopping_rounds 0 means no early stopping (as for LightGBM); HGB needs >= 1
        eval_ok = len(ye) > 0 and 0 < ye.sum() < len(ye) and int(p["early_stopping_rounds"]) > 0
        model = HistGradientBoostingClassifier(
            max_iter=int(p["n_estimators"]), learning_rate=float(p["learning_rate"]),
            max_leaf_nodes=int(p["num_leaves"]), min_samples_leaf=int(p["min_child_samples"]),
            l2_regularization=float(p["lambda_l2"]), early_stopping=bool(eval_ok),
            n_iter_no_change=max(1, int(p["early_stopping_rounds"])), scoring="loss",
            random_state=int(p["seed"]))
        from threadpoolctl import threadpool_limits

        # HGB uses every OpenMP thread by default: honour num_threads (and avoid oversubscription)
        with threadpool_limits(limits=max(1, int(p["num_threads"])), user_api="openmp"):
            if eval_ok:
                model.fit(X, y, sample_weight=sample_weight, X_val=Xe, y_val=ye)
            else:
                model.fit(X, y, sample_weight=sample_weight)
        trees = export_hgb(model)
        info = {"best_iteration": int(model.n_iter_), "early_stopping": bool(eval_ok),
                "pointwise": True, "group_weight_power": float(p.get("group_weight_power") or 0.0)}
        return cls("sklearn", features, trees=trees, info=info)

    # ---- inference --------------------------------------------------------
    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.shape[1] != len(self.features):
            raise ValueError(f"ranker expects {len(self.features)} features, got {X.shape[1]}")
        if not len(X):
            return np.zeros(0)
        if self.kind == "lightgbm":
            return np.asarray(self.booster.predict(X, num_threads=int(self.info.get("num_threads", 0)
                                                                       or 0)), dtype=np.float64)
        return predict_trees(self.trees, X)

    def importances(self) -> dict[str, dict[str, float]]:
        if self.kind == "lightgbm":
            gain = self.booster.feature_importance("gain")
            split = self.booster.feature_importance("split")
        else:
            gain = np.zeros(len(self.features))
            split = np.zeros(len(self.features))
            for t in self.trees["trees"]:
                f = np.asarray(t["feature"])
                inner = ~np.asarray(t["is_leaf"], bool)
                np.add.at(gain, f[inner], np.asarray(t["gain"])[inner])
                np.add.at(split, f[inner], 1)
        tot = float(np.sum(gain)) or 1.0
        out = {f: {"gain": float(g), "gain_share": float(g) / tot, "split": int(s)}
               for f, g, s in zip(self.features, gain, split)}
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["gain"]))

    # ---- persistence --------------------------------------------------------
    @staticmethod
    def file_name(kind: str, prefix: str = "") -> str:
        return prefix + ("model.txt" if kind == "lightgbm" else "model.json")

    def model_file(self, prefix: str = "") -> str:
        return self.file_name(self.kind, prefix)

    def save(self, out: Path, prefix: str = "") -> None:
        """``model.txt`` (LightGBM text) or ``model.json`` (sklearn trees) + ``features.json``
        (each name preceded by ``prefix``: ``cold_`` for the cold-user ranker)."""
        out = Path(out)
        meta = {"kind": self.kind, "features": self.features, **self.info}
        if self.kind == "lightgbm":
            self.booster.save_model(str(out / self.model_file(prefix)))
        else:
            (out / self.model_file(prefix)).write_text(json.dumps(self.trees), encoding="utf-8")
        (out / f"{prefix}features.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path, prefix: str = "") -> "Ranker":
        path = Path(path)
        meta = json.loads((path / f"{prefix}features.json").read_text(encoding="utf-8"))
        kind = meta.pop("kind")
        features = meta.pop("features")
        if kind == "lightgbm":
            booster = _lightgbm().Booster(model_file=str(path / cls.file_name(kind, prefix)))
            if list(booster.feature_name()) != list(features):
                raise ValueError(f"{path}: {prefix}model.txt features differ from "
                                 f"{prefix}features.json")
            return cls(kind, features, booster=booster, info=meta)
        if kind == "sklearn":
            trees = json.loads((path / cls.file_name(kind, prefix)).read_text(encoding="utf-8"))
            return cls(kind, features, trees=trees, info=meta)
        raise ValueError(f"{path}: unknown ranker kind '{kind}'")


def merge_lgb_models(strings: list[str]) -> str:
    """One LightGBM text model whose prediction is the mean of the given models (bagging).

    The trees of every model are concatenated (renumbered) with their leaf values divided by
    the number of models; the header (features, objective) and trailer are the first model's.
    """
    n = len(strings)
    first = strings[0]
    head = first[:first.index("\nTree=")]
    head = "\n".join(line for line in head.splitlines() if not line.startswith("tree_sizes="))
    tail = first[first.index("end of trees"):]
    trees = []
    for text in strings:
        body = text[text.index("\nTree="):text.index("end of trees")]
        for block in body.split("\nTree=")[1:]:
            lines = block.rstrip("\n").split("\n")
            out = [f"Tree={len(trees)}"]
            for line in lines[1:]:
                if line.startswith("leaf_value="):
                    vals = [float(v) / n for v in line[len("leaf_value="):].split()]
                    line = "leaf_value=" + " ".join(repr(v) for v in vals)
                out.append(line)
            trees.append("\n".join(out) + "\n")
    return head + "\n\n" + "\n".join(trees) + "\n" + tail


def export_hgb(model) -> dict:
    """A fitted binary ``HistGradientBoostingClassifier`` as plain JSON-able trees (raw score)."""
    trees = []
    for it in model._predictors:
        nodes = it[0].nodes
        if nodes["is_categorical"].any():
            raise ValueError("categorical splits cannot be exported")
        trees.append({"feature": nodes["feature_idx"].astype(int).tolist(),
                      "threshold": [float(v) for v in nodes["num_threshold"]],
                      "missing_left": nodes["missing_go_to_left"].astype(int).tolist(),
                      "left": nodes["left"].astype(int).tolist(),
                      "right": nodes["right"].astype(int).tolist(),
                      "is_leaf": nodes["is_leaf"].astype(int).tolist(),
                      "value": nodes["value"].astype(float).tolist(),
                      "gain": np.nan_to_num(nodes["gain"].astype(float)).tolist()})
    return {"baseline": float(np.ravel(model._baseline_prediction)[0]), "trees": trees}


def predict_trees(dump: dict, X: np.ndarray) -> np.ndarray:
    """Raw scores of :func:`export_hgb` trees, vectorised over rows."""
    X = np.asarray(X, dtype=np.float64)
    out = np.full(len(X), dump["baseline"], dtype=np.float64)
    rows = np.arange(len(X))
    for t in dump["trees"]:
        feat = np.asarray(t["feature"], np.int64)
        thr = np.asarray(t["threshold"], np.float64)
        ml = np.asarray(t["missing_left"], bool)
        left, right = np.asarray(t["left"], np.int64), np.asarray(t["right"], np.int64)
        leaf = np.asarray(t["is_leaf"], bool)
        node = np.zeros(len(X), np.int64)
        active = rows[~leaf[node]]
        while len(active):
            nd = node[active]
            x = X[active, feat[nd]]
            go_left = np.where(np.isnan(x), ml[nd], x <= thr[nd])
            node[active] = np.where(go_left, left[nd], right[nd])
            active = active[~leaf[node[active]]]
        out += np.asarray(t["value"], np.float64)[node]
    return out


# =========================================================================== metrics on frames

def group_ndcg(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray, n_truth: np.ndarray,
               k: int) -> float:
    """Mean ndcg@k over groups (contiguous ids); ``n_truth`` per group = all relevant items."""
    if not len(groups):
        return float("nan")
    gid = np.r_[0, np.cumsum(groups[1:] != groups[:-1])]
    ng = int(gid[-1]) + 1
    order = np.lexsort((-np.nan_to_num(scores, nan=-np.inf), gid))
    g, lab = gid[order], labels[order]
    starts = np.r_[0, np.nonzero(g[1:] != g[:-1])[0] + 1]
    pos = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    top = pos < k
    dcg = np.bincount(g[top], weights=lab[top] * disc[pos[top]], minlength=ng)
    ideal = np.r_[0.0, np.cumsum(disc)][np.minimum(n_truth, k)]
    keep = n_truth > 0
    return float(np.mean(dcg[keep] / ideal[keep])) if keep.any() else float("nan")


# =========================================================================== training

def _val_matrix(val: pd.DataFrame, inter: Interactions) -> sp.csr_matrix:
    u = inter.user_index(val[USER].astype(str).to_numpy())
    i = inter.item_index(val[ITEM].astype(str).to_numpy())
    ok = (u >= 0) & (i >= 0)
    V = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (u[ok], i[ok])),
                      shape=(inter.n_users, inter.n_items))
    V.sum_duplicates()
    V.data[:] = 1.0
    return V


def training_world(split: Split, p: dict, fit_df: pd.DataFrame | None = None,
                   val_df: pd.DataFrame | None = None, salt: int = 0) -> dict:
    """The training-time context (fit rows) and labels (val rows), with cold-start simulation.

    Test time has cold items (no training row) and cold users (at most ``cold_user_max``
    rows) that the validation fold barely shows.  To teach the ranker about them without
    leakage, some ``fit`` rows are *moved* from the context into the labels: every row of a
    sample of warm items (they become cold items) and the rows beyond a random 1..
    ``cold_user_max`` of a sample of validation users (they become cold users).  Features are
    computed from the context only, and the fitted models (which did see the moved rows) are
    never used on cold users or cold items of the context (see :meth:`FeatureBuilder.frame`),
    the same rule as at test time.

    ``fit_df`` / ``val_df``: another context / label partition of the training rows (a
    cross-fitting fold, see :func:`cross_folds`; default: the split's ``fit`` / ``val`` folds);
    ``salt`` varies the simulation's random draws per fold.
    """
    rng = np.random.default_rng([int(p["seed"]), 7] if not salt else [int(p["seed"]), 7, int(salt)])
    if fit_df is None or val_df is None:
        train = split.train
        fold = train["fold"].astype(str).to_numpy()
        fit_df, val_df = train[fold == "fit"], train[fold == "val"]
    full = split.interactions()
    Xf = full.matrix()
    cmax = int(p["cold_user_max"])
    cap = float(p["max_simulation_share"])

    def share(value, auto: float) -> float:
        v = auto if value == "auto" else float(value or 0.0)
        return float(min(max(v, 0.0), cap))

    # auto: the share of items the split holds out of training (the cold_items slice).  Items
    # that are merely too rare to have a training row are not counted: their test rows are
    # as rare (on ML-100K 34 such items have 41 test rows in all), whereas a simulated cold
    # item keeps all its rows as labels, so counting them taught the ranker that "no history"
    # means "very relevant" and sank the hybrid below popularity-aware CF.
    held_out = split.slices.get("cold_items") or []
    item_share = share(p["cold_item_simulation"], len(held_out) / max(Xf.shape[1], 1))
    user_share = share(p["cold_user_simulation"], float(np.mean(np.diff(Xf.indptr) <= cmax)))
    fit_items, fit_pop = np.unique(fit_df[ITEM].astype(str).to_numpy(), return_counts=True)
    n_ci = int(round(item_share * len(fit_items)))
    C = _draw_cold_items(fit_items, fit_pop, n_ci, p["cold_item_draw"], rng)
    is_c = fit_df[ITEM].astype(str).isin(set(C)).to_numpy()
    moved_items, rest = fit_df[is_c], fit_df[~is_c]
    moved_users = rest.iloc[:0]
    n_cu = 0
    U = np.array([], dtype=object)
    if cmax >= 1 and user_share > 0:
        cnt = rest[USER].astype(str).value_counts()
        vusers = np.unique(val_df[USER].astype(str).to_numpy())
        eligible = vusers[cnt.reindex(vusers).fillna(0).to_numpy() > cmax]
        n_cu = int(round(user_share * len(eligible)))
        if n_cu:
            U = np.sort(rng.choice(eligible, n_cu, replace=False))
            keep_n = pd.Series(rng.integers(1, cmax + 1, n_cu), index=U)
            sub = rest[rest[USER].astype(str).isin(set(U)).to_numpy()]
            key = pd.Series(rng.random(len(sub)), index=sub.index)
            pos = key.groupby(sub[USER].astype(str)).rank(method="first").to_numpy() - 1
            drop = pos >= keep_n.reindex(sub[USER].astype(str)).to_numpy()
            moved_users = sub[drop]
            rest = rest.drop(index=sub.index[drop])
    context = Interactions.build(rest, split.user_ids, split.item_ids)
    labels = pd.concat([val_df, moved_items, moved_users])
    stats = {"cold_items": int(n_ci), "cold_users": int(n_cu), "item_share": item_share,
             "user_share": user_share, "moved_rows": int(len(moved_items) + len(moved_users)),
             "val_rows": int(len(val_df))}
    return {"context": context, "labels": labels, "stats": stats, "sim_items": C, "sim_users": U}


def _draw_cold_items(items: np.ndarray, pop: np.ndarray, n: int, how: str,
                     rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``items`` (sorted) to simulate as cold items.

    ``uniform``: a random draw. ``stratified``: the items ordered by popularity (random order
    among equals), then every ``len / n``-th from a random offset, so that each popularity range
    gives its share. On ML-100K's coldstart protocol, fuse seeds 42 / 1 / 2 gave `all` NDCG@10
    0.5014 / 0.4829 / 0.5051 with uniform draws and 0.5042 / 0.5070 / 0.5021 stratified.
    """
    if not n:
        return np.array([], dtype=object)
    if how == "uniform":
        return np.sort(rng.choice(items, n, replace=False))
    order = np.lexsort((rng.random(len(items)), -np.asarray(pop)))
    step = len(items) / n
    pick = np.minimum((rng.random() * step + step * np.arange(n)).astype(np.int64), len(items) - 1)
    return np.sort(items[order[pick]])


def cross_folds(split: Split, n_folds: int, seed: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Extra (context rows, label rows) partitions of the training rows for cross-fitting.

    Fold 0 is the split's own ``fit`` / ``val`` pair.  Folds 1..``n_folds - 1`` each take, per
    user, as many of the user's ``fit`` rows as the user has ``val`` rows (disjoint random
    chunks) as labels; the context is every other training row (the ``val`` rows included).
    Every fold thus hides the same share of each user's history as the ``val`` fold, and the
    labels of a fold are never in its context.  Test rows are never touched.
    """
    train = split.train
    fold = train["fold"].astype(str).to_numpy()
    if n_folds <= 1 or not (fold == "val").any():
        return []
    fit_rows = train[fold == "fit"]
    n_val = train[fold == "val"][USER].astype(str).value_counts()
    users = fit_rows[USER].astype(str)
    rng = np.random.default_rng([int(seed), 11])
    key = pd.Series(rng.random(len(fit_rows)), index=fit_rows.index)
    pos = key.groupby(users).rank(method="first").to_numpy().astype(np.int64) - 1
    size = n_val.reindex(users).fillna(0).to_numpy().astype(np.int64)
    chunk = np.where(size > 0, pos // np.maximum(size, 1) + 1, 0)
    out = []
    for k in range(1, int(n_folds)):
        is_label = chunk == k
        if not is_label.any():
            break  # users have too few fit rows for more folds
        labels = fit_rows[is_label]
        context = train.drop(index=labels.index)
        out.append((context, labels))
    return out


def warm_rows(rows: pd.DataFrame, ctx: Context, p: dict) -> pd.DataFrame:
    """The rows of ``rows`` whose user is warm (more than ``cold_user_max`` context rows) and
    whose item is warm (in the context): where masked models score (see FeatureBuilder.frame)."""
    u = ctx.inter.user_index(rows[USER].astype(str).to_numpy())
    i = ctx.inter.item_index(rows[ITEM].astype(str).to_numpy())
    ok = (u >= 0) & (i >= 0)
    ok[ok] = (ctx.user_n[u[ok]] > int(p["cold_user_max"])) & ~ctx.cold[i[ok]]
    return rows[ok]


def clone_model(model: Recommender) -> Recommender:
    """An unfitted model of the same class and hyper-parameters (for cross-fitting)."""
    from .recommenders.base import REGISTRY

    if hasattr(model, "set_side_info"):  # e.g. the encoder: its fit needs features the fuse lacks
        raise ValueError(f"fuse: source '{model.name}' cannot be re-fitted inside the fuse stage "
                         f"(it needs side information): the stage uses it as a fixed source "
                         f"(see refittable)")
    return REGISTRY[model.name](**model.params)


def side_info(model: Recommender, split: Split, item_features: dict | None) -> tuple[dict, pd.DataFrame]:
    """The side information a fixed source was trained with (its modalities' item features in
    catalogue order, the users table), for :func:`fixed_refitter`."""
    arch = model.params.get("_arch") or {}
    feats = {}
    for mod in arch.get("modalities", []):
        if mod not in (item_features or {}):
            raise ValueError(f"fuse: source '{model.name}' was trained with {mod} features, which "
                             f"this stage was not given: pass --{mod} or set "
                             f"fuse.refit_fixed_sources false")
        fids, emb, present = item_features[mod][:3]
        pos = pd.Index(np.asarray(fids, dtype=object).astype(str)).get_indexer(
            np.asarray(split.item_ids, dtype=object).astype(str))
        emb = np.asarray(emb, dtype=np.float32)
        E = np.zeros((len(pos), emb.shape[1]), np.float32)
        pres = np.zeros(len(pos), bool)
        ok = pos >= 0
        E[ok] = emb[pos[ok]]
        pres[ok] = np.asarray(present, dtype=bool)[pos[ok]]
        E[~pres] = 0.0
        feats[mod] = (E, pres)
    return feats, split.users


def fixed_refitter(fit_models: dict[str, Recommender], split: Split, item_features: dict | None,
                   p: dict) -> tuple[dict[str, Callable[[Interactions], Recommender]], dict]:
    """For each fixed source (see :func:`refittable`) that can be trained again on a
    cross-fitting fold within ``fixed_refit_max_seconds``: a function context -> fitted model.
    Returns (functions, {name: why it is or is not re-fitted})."""
    out, why = {}, {}
    cap = float(p["fixed_refit_max_seconds"])
    for name, m in sorted(fit_models.items()):
        if refittable(m):
            continue
        est = m.recipe_seconds() if hasattr(m, "recipe_seconds") else None
        if not p["refit_fixed_sources"]:
            why[name] = "refit_fixed_sources off"
        elif est is None:
            why[name] = "the model records no training recipe"
        elif cap > 0 and est > cap:
            why[name] = f"expected {est:.0f}s per fold > fixed_refit_max_seconds {cap:g}"
        else:
            feats, users = side_info(m, split, item_features)

            def fit(inter, m=m, feats=feats, users=users):
                # every context row is a training row here (a "fold" column would make the
                # encoder hold the val rows out for validation)
                inter = Interactions(inter.df.drop(columns="fold", errors="ignore"),
                                     inter.user_ids, inter.item_ids)
                # twice the expected time at most (a slower machine), never a run-away
                return m.context_clone(feats, users, max_seconds=2 * cap if cap > 0 else 0.0).fit(inter)

            out[name] = fit
            why[name] = f"re-fitted per fold (expected {est:.0f}s each)"
    return out, why


def build_training_set(fb: FeatureBuilder, val: pd.DataFrame, p: dict) -> dict:
    """Candidates/features over labelled users; labels = their label rows not in the context."""
    ctx = fb.ctx
    V = _val_matrix(val, ctx.inter)
    V = V - V.multiply(ctx.X)  # a val row on an item already in the fit history is not a target
    V.eliminate_zeros()
    users = np.nonzero(np.diff(V.indptr) > 0)[0]
    rng = np.random.default_rng(int(p["seed"]))
    if p["max_train_users"] and len(users) > int(p["max_train_users"]):
        users = np.sort(rng.choice(users, int(p["max_train_users"]), replace=False))
    parts = []
    n_truth_total = int(V[users].nnz)
    covered = 0
    per_source = np.zeros(len(fb.sources), np.int64)
    n_cand = []
    for fr in fb.batches(users):
        y = _csr_lookup(V, fr.users, fr.items).astype(np.float32)
        covered += int(y.sum())
        for j in range(len(fb.sources)):
            per_source[j] += int(y[((fr.bits >> j) & 1) > 0].sum())
        n_cand.append(np.bincount(np.searchsorted(users, fr.users), minlength=len(users)))
        parts.append((fr.users, fr.items, fr.X, y))
    gu = np.concatenate([q[0] for q in parts]) if parts else np.zeros(0, np.int64)
    gi = np.concatenate([q[1] for q in parts]) if parts else np.zeros(0, np.int64)
    X = np.concatenate([q[2] for q in parts]) if parts else np.zeros((0, len(fb.names)), np.float32)
    y = np.concatenate([q[3] for q in parts]) if parts else np.zeros(0, np.float32)
    cand = np.sum(n_cand, axis=0) if n_cand else np.zeros(0)
    n_truth = np.diff(V.indptr)
    cold = ctx.user_n[gu] <= int(p["cold_user_max"])
    return {"users": gu, "items": gi, "X": X, "y": y, "cold": cold, "n_truth": n_truth,
            "n_users": int(V.shape[0]),
            "stats": {"n_val_users": int(len(users)), "n_val_items": n_truth_total,
                      "candidate_recall": covered / max(n_truth_total, 1),
                      "candidate_recall_by_source": {s.name: int(c) / max(n_truth_total, 1)
                                                     for s, c in zip(fb.sources, per_source)},
                      "candidates_per_user": _describe(cand)}}


def _describe(x) -> dict:
    x = np.asarray(x, dtype=np.float64)
    if not len(x):
        return {"mean": 0.0, "min": 0, "median": 0.0, "max": 0}
    return {"mean": float(x.mean()), "min": int(x.min()), "median": float(np.median(x)),
            "max": int(x.max())}


def group_weights(n_truth: np.ndarray, power: float) -> np.ndarray | None:
    """Per group id, ``n_labels ** -power`` scaled to mean 1 over the groups that have a label
    (None for ``power`` 0: unweighted)."""
    if not power:
        return None
    n = np.asarray(n_truth, dtype=np.float64)
    w = np.maximum(n, 1.0) ** -float(power)
    has = n > 0
    return (w / w[has].mean()).astype(np.float64) if has.any() else w


def train_ranker(ts: dict, names: list[str], sources: list[str], p: dict) -> tuple[Ranker, dict]:
    """Keep groups with a positive, split users for early stopping, fit; diagnostics on eval users."""
    users, y, X = ts["users"], ts["y"], ts["X"]
    pos_users = np.unique(users[y > 0])
    keep = np.isin(users, pos_users)
    users, y, X = users[keep], y[keep], X[keep]
    if not len(pos_users):
        raise ValueError("fusion: no validation interaction is covered by the candidates: cannot "
                         "train the ranker (raise fuse.candidates or split.val_ratio)")
    rng = np.random.default_rng(int(p["seed"]))
    # groups of cross-fitting folds are user + fold * n_users: early stopping holds out real
    # users (every fold of them), so that no eval user's history is also learnt on
    base = int(ts.get("n_users") or (int(users.max()) + 1 if len(users) else 1))
    real = np.unique(pos_users % base)
    n_eval = int(round(float(p["eval_fraction"]) * len(real)))
    min_eval = int(p["early_stopping_min_users"])
    skipped = None
    if n_eval and n_eval < min_eval and int(p["early_stopping_rounds"]) > 0:
        skipped = (f"{n_eval} held-out users < early_stopping_min_users={min_eval}: "
                   f"{int(p['n_estimators'])} trees on every user")
    if len(real) - n_eval < 1 or int(p["early_stopping_rounds"]) <= 0 or skipped:
        n_eval = 0  # no early stopping: n_estimators trees on every labelled user
    eval_users = rng.choice(real, n_eval, replace=False) if n_eval else np.zeros(0, np.int64)
    is_eval = np.isin(users % base, eval_users)
    weights = group_weights(ts["n_truth"], float(p.get("group_weight_power") or 0.0))
    ranker = Ranker.train(X[~is_eval], y[~is_eval], users[~is_eval], X[is_eval], y[is_eval],
                          users[is_eval], names, p, weights)
    ranker.info["num_threads"] = int(p["num_threads"])
    diag = {"n_rows": int(len(y)), "n_groups": int(len(pos_users)),
            "n_eval_groups": int(len(np.unique(users[is_eval]))),
            "positive_rate": float(y.mean()) if len(y) else 0.0}
    if skipped:
        diag["early_stopping_skipped"] = skipped
    if n_eval:
        ue, Xe, ye = users[is_eval], X[is_eval], y[is_eval]
        n_truth = ts["n_truth"][np.unique(ue)]
        k = int(p["eval_at"])
        # "hybrid": the ranker before it saw these users (they only chose its tree count);
        # after refit_full the saved ranker has learnt on them too: that figure is in-sample
        refit = bool(ranker.info.get("refit_full"))
        held = ranker.heldout_pred if refit else ranker.predict(Xe)
        scores = {"hybrid": group_ndcg(ue, held, ye, n_truth, k)}
        if refit:
            scores["hybrid_refit_in_sample"] = group_ndcg(ue, ranker.predict(Xe), ye, n_truth, k)
        diag[f"eval_ndcg@{k}"] = scores
        for s in sources:
            col = names.index(f"{s}_z")
            diag[f"eval_ndcg@{k}"][s] = group_ndcg(ue, Xe[:, col], ye, n_truth, k)
    return ranker, diag


def train_cold_ranker(ts: dict, names: list[str], sources: list[str],
                      p: dict) -> tuple[Ranker | None, dict]:
    """A ranker of the cold groups only (users with at most ``cold_user_max`` context rows in
    their training fold: the simulated cold users and the split's own), or None and why.

    One ranker for everyone learns mostly from warm users, whose best features (model scores,
    long histories) cold users lack.  On the ML-100K coldstart protocol a cold specialist
    raised the hybrid's cold_users NDCG@10 from 0.677 to 0.698 (recall@10 0.1207 -> 0.1219),
    the ``all`` slice unchanged (0.4982 -> 0.5003); adding more simulated cold users to its
    training set (every validation user truncated in an extra world) did not help (0.693).
    """
    if not p["cold_ranker"]:
        return None, {"used": False, "reason": "cold_ranker is off"}
    cold = ts["cold"]
    n_groups = int(len(np.unique(ts["users"][cold & (ts["y"] > 0)])))
    need = int(p["cold_ranker_min_users"])
    if n_groups < need:
        return None, {"used": False, "n_groups": n_groups,
                      "reason": f"{n_groups} cold training users with a positive label, fewer "
                                f"than cold_ranker_min_users={need}: one ranker ranks everyone"}
    sub = {**ts, **{k: ts[k][cold] for k in ("users", "items", "X", "y", "cold")}}
    ranker, diag = train_ranker(sub, names, sources, {**p, **(p.get("cold_ranker_params") or {})})
    return ranker, {"used": True, **diag, **ranker.info}


# =========================================================================== test time

class CsrLookup:
    """Vectorised ``S[rows, cols]`` lookups into a sparse matrix; the sorted (row, col) keys
    are built once, so repeated lookups (chunks of pairs) cost a binary search each."""

    def __init__(self, S: sp.csr_matrix):
        S = sp.csr_matrix(S, copy=True)
        S.sum_duplicates()
        S.sort_indices()
        self.n_cols = S.shape[1]
        self.keys = np.repeat(np.arange(S.shape[0], dtype=np.int64), np.diff(S.indptr)) \
            * self.n_cols + S.indices
        self.data = S.data

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        q = np.asarray(rows, dtype=np.int64) * self.n_cols + np.asarray(cols, dtype=np.int64)
        if not len(self.keys):
            return np.zeros(len(q), np.float32)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return np.where(self.keys[pos] == q, self.data[pos], 0.0).astype(np.float32)


def _csr_lookup(S: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """S[rows, cols] as a dense vector (one-off lookup; see :class:`CsrLookup`)."""
    return CsrLookup(S)(rows, cols)


def _best_history(X: sp.csr_matrix, users: np.ndarray, items: np.ndarray, sim) -> tuple:
    """Per (user, item) pair: the history item most similar to the item, and that similarity."""
    pair, h, counts = _expand(X.indptr, X.indices, users)
    best_h = np.full(len(users), -1, np.int64)
    best_v = np.zeros(len(users), np.float32)
    if not len(pair):
        return best_h, best_v
    # chunked: a content similarity gathers [rows, dim] embedding blocks (bounded memory)
    step = 16384
    v = np.concatenate([np.asarray(sim(h[s:s + step], items[pair[s:s + step]]), dtype=np.float32)
                        for s in range(0, len(h), step)])
    order = np.lexsort((-v, pair))
    first = (np.cumsum(counts) - counts)[counts > 0]
    sel = order[first]
    best_h[counts > 0] = h[sel]
    best_v[counts > 0] = v[sel]
    return best_h, best_v


def _first_shared(T: sp.csr_matrix, a: np.ndarray, b: np.ndarray,
                  at: CsrLookup | None = None) -> np.ndarray:
    """Per pair, the first column that rows ``a[k]`` and ``b[k]`` of ``T`` both hold (-1: none);
    ``at``: ``T``'s lookup when the caller keeps one."""
    out = np.full(len(a), -1, np.int64)
    pair, col, counts = _expand(T.indptr, T.indices, a)
    if not len(pair):
        return out
    hit = (at or CsrLookup(T))(b[pair], col) > 0
    first = np.unique(pair[hit], return_index=True)
    out[first[0]] = col[hit][first[1]]
    return out


class Explainer:
    """Readable reasons for final recommendations (vectorised over pairs, formatted in a loop)."""

    def __init__(self, ctx: Context, items: ItemSide, users: UserSide, p: dict):
        from .recommenders.knn import cosine_topk

        self.ctx, self.items, self.users, self.p = ctx, items, users, p
        self.S_cf = cosine_topk(ctx.X, int(p["reason_neighbors"])) if ctx.X.nnz else None
        # lookups built once: reasons are computed in chunks of pairs
        self._cf_at = CsrLookup(self.S_cf) if self.S_cf is not None else None
        self._tag_at = CsrLookup(items.tag_sim) if items.tag_sim is not None else None
        self._tags_at = CsrLookup(items.tags) if items.tags is not None else None

    def reasons(self, u: np.ndarray, i: np.ndarray, budget: int = 4_000_000) -> list[str]:
        """One reason per (user, item) pair; chunked so that (pair x history item) stays bounded."""
        cost = np.cumsum(np.maximum(self.ctx.user_n[u], 1).astype(np.int64))
        bounds = np.searchsorted(cost, np.arange(budget, int(cost[-1]) + budget, budget)) \
            if len(u) else np.zeros(0, np.int64)
        out, start = [], 0
        for stop in list(np.unique(np.minimum(bounds + 1, len(u)))) + [len(u)]:
            if stop > start:
                out += self._reasons(u[start:stop], i[start:stop])
                start = stop
        return out

    def _reasons(self, u: np.ndarray, i: np.ndarray) -> list[str]:
        ctx, items, p = self.ctx, self.items, self.p
        n = len(u)
        cold = ctx.cold[i]
        has_hist = ctx.user_n[u] > 0
        h_cf = np.full(n, -1, np.int64)
        v_cf = np.zeros(n, np.float32)
        warm = ~cold & has_hist
        if self.S_cf is not None and warm.any():
            h_cf[warm], v_cf[warm] = _best_history(ctx.X, u[warm], i[warm], self._cf_at)
        h_ct = np.full(n, -1, np.int64)
        v_ct = np.zeros(n, np.float32)
        if items.content is not None:
            E = items.content
            sel = cold & has_hist
            if sel.any():
                h_ct[sel], v_ct[sel] = _best_history(
                    ctx.X, u[sel], i[sel], lambda h, j: np.einsum("nd,nd->n", E[h], E[j]))
        min_sim, min_lift = float(p["reason_min_sim"]), float(p["reason_min_lift"])
        few = ctx.user_n[u] <= int(p["cold_user_max"])
        liked = (h_cf >= 0) & (v_cf >= min_sim) & ~(few & (v_cf < 2 * min_sim))
        # the history item sharing the most people (tags) with the item, and one shared name;
        # only where no co-rating neighbour gives the reason
        h_tag, tag_of = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        sel = np.nonzero(has_hist & (cold | ~liked))[0]
        if items.tag_sim is not None and len(sel):
            hb, vb = _best_history(ctx.X, u[sel], i[sel], self._tag_at)
            ok = vb > 0
            h_tag[sel[ok]] = hb[ok]
            tag_of[sel[ok]] = _first_shared(items.tags, i[sel[ok]], hb[ok], self._tags_at)
        # best genre of the item for this user (highest lift)
        G = items.genres
        g_best = np.full(n, -1, np.int64)
        l_best = np.zeros(n, np.float32)
        if G.shape[1]:
            pair, g, counts = _expand(G.indptr, G.indices, i)
            if len(pair):
                lv = np.nan_to_num(ctx.genre_lift[u[pair], g], nan=0.0)
                order = np.lexsort((-lv, pair))
                first = (np.cumsum(counts) - counts)[counts > 0]
                g_best[counts > 0] = g[order[first]]
                l_best[counts > 0] = lv[order[first]]
        out = []
        titles, gnames, seg = items.titles, items.genre_names, self.users.labels
        tnames = items.tag_names
        for j in range(n):
            if cold[j]:
                if h_tag[j] >= 0:
                    out.append(f"new item with {tnames[tag_of[j]]}, as in {titles[h_tag[j]]}")
                elif h_ct[j] >= 0 and v_ct[j] > 0:
                    out.append(f"new item similar to {titles[h_ct[j]]}")
                elif g_best[j] >= 0:
                    out.append(f"new item matching your interest in {gnames[g_best[j]]}")
                else:
                    out.append("new in the catalogue")
            elif liked[j]:
                out.append(f"because you liked {titles[h_cf[j]]}")
            elif h_tag[j] >= 0:
                out.append(f"with {tnames[tag_of[j]]}, as in {titles[h_tag[j]]}")
            elif has_hist[j] and g_best[j] >= 0 and l_best[j] >= min_lift:
                out.append(f"matches your interest in {gnames[g_best[j]]}")
            else:
                out.append(f"popular with users like you ({seg[u[j]]})")
        return out


def _apply_cold_slots(items: np.ndarray, scores: np.ndarray, cold: np.ndarray, k: int,
                      slots: int) -> np.ndarray:
    """Order of one user's candidates with the best ``slots`` cold items forced into the top-k."""
    order = np.argsort(-scores, kind="stable")
    if slots <= 0:
        return order[:k]
    top = order[:k]
    have = cold[items[top]].sum()
    need = min(slots, k) - int(have)
    if need <= 0:
        return top
    extra = [o for o in order[k:] if cold[items[o]]][:need]
    if not extra:
        return top
    warm_pos = [t for t in top if not cold[items[t]]]
    drop = set(warm_pos[len(warm_pos) - len(extra):])
    kept = [t for t in top if t not in drop]
    return np.asarray(kept + extra, dtype=np.int64)


def recommend_all(ranker: Ranker, fb: FeatureBuilder, user_idx: np.ndarray, p: dict,
                  explainer: Explainer | None = None,
                  cold_ranker: Ranker | None = None) -> tuple[pd.DataFrame, dict]:
    """Top-k table (user_id, item_id, rank, score, reason, sources) for ``user_idx``.

    With ``cold_ranker``, the candidates of users with at most ``cold_user_max`` training rows
    are scored by it (scores are only compared within a user)."""
    for r in (ranker, cold_ranker):
        if r is not None and list(r.features) != list(fb.names):
            raise ValueError(f"fusion: ranker features {r.features} differ from the test-time "
                             f"features {fb.names}")
    cold_max = int(p["cold_user_max"])
    n_cold_scored = 0
    k = int(p["k"])
    slots = int(p["cold_item_slots"])
    src_names = [s.name for s in fb.sources]
    out_u, out_i, out_r, out_s, out_b = [], [], [], [], []
    n_cand = []
    t_pred = 0.0
    for fr in fb.batches(np.asarray(user_idx, dtype=np.int64)):
        t0 = time.perf_counter()
        sc = ranker.predict(fr.X)
        if cold_ranker is not None and len(fr.users):
            few = fb.ctx.user_n[fr.users] <= cold_max
            if few.any():
                sc[few] = cold_ranker.predict(fr.X[few])
                n_cold_scored += len(np.unique(fr.users[few]))
        t_pred += time.perf_counter() - t0
        if not len(fr.users):
            continue
        order = np.lexsort((-sc, fr.users))
        u, it, s, b = fr.users[order], fr.items[order], sc[order], fr.bits[order]
        starts = np.r_[0, np.nonzero(u[1:] != u[:-1])[0] + 1]
        counts = np.diff(np.r_[starts, len(u)])
        n_cand.append(counts)
        pos = np.arange(len(u)) - np.repeat(starts, counts)
        if slots > 0:
            keep_idx = []
            for st, c in zip(starts, counts):
                sel = _apply_cold_slots(it[st:st + c], s[st:st + c], fb.ctx.cold, k, slots)
                keep_idx.append(st + sel)
            idx = np.concatenate(keep_idx)
            rank_new = np.concatenate([np.arange(1, len(x) + 1) for x in keep_idx])
            out_u.append(u[idx]); out_i.append(it[idx]); out_s.append(s[idx]); out_b.append(b[idx])
            out_r.append(rank_new)
        else:
            top = pos < k
            out_u.append(u[top]); out_i.append(it[top]); out_s.append(s[top]); out_b.append(b[top])
            out_r.append(pos[top] + 1)
    if out_u:
        u, i = np.concatenate(out_u), np.concatenate(out_i)
        r, s, b = np.concatenate(out_r), np.concatenate(out_s), np.concatenate(out_b)
    else:
        u = i = r = b = np.zeros(0, np.int64)
        s = np.zeros(0)
    t0 = time.perf_counter()
    reasons = explainer.reasons(u, i) if explainer is not None else [""] * len(u)
    srcs = [",".join(n for j, n in enumerate(src_names) if (bb >> j) & 1) for bb in b.tolist()]
    t_reason = time.perf_counter() - t0
    table = pd.DataFrame({USER: fb.users.user_ids[u].astype(str), ITEM: fb.items.item_ids[i].astype(str),
                          "rank": r.astype(np.int64), "score": s.astype(np.float64),
                          "reason": reasons, "sources": srcs})[list(RECOMMENDATION_COLUMNS)]
    stats = {"candidates_per_user": _describe(np.concatenate(n_cand) if n_cand else []),
             "users_ranked_by_cold_ranker": int(n_cold_scored),
             "seconds_predict": round(t_pred, 3), "seconds_reasons": round(t_reason, 3)}
    return table, stats


# =========================================================================== incremental reuse

def user_state(split: Split) -> pd.DataFrame:
    """One row per catalogue user: ``user_id``, ``n_train`` and ``digest``.

    ``digest`` is an order-free hash (wrapping sum of row hashes) of the user's training rows
    (user, item, timestamp, rating) and attribute row: equal digests = the test-time features
    of that user were computed from the same rows.
    """
    ids = split.user_ids
    index = pd.Index(ids)
    digest = np.zeros(len(ids), np.uint64)
    n = np.zeros(len(ids), np.int64)
    tr = split.train
    if len(tr):
        cols = [c for c in (USER, ITEM, TS, RATING) if c in tr.columns]
        h = pd.util.hash_pandas_object(tr[cols].astype({USER: str, ITEM: str}), index=False)
        pos = index.get_indexer(tr[USER].astype(str))
        np.add.at(digest, pos, h.to_numpy(np.uint64))
        n = np.bincount(pos, minlength=len(ids)).astype(np.int64)
    us = split.users
    if us is not None and len(us) and USER in us.columns:
        attrs = us.astype({USER: str}).sort_index(axis=1)
        h = pd.util.hash_pandas_object(attrs.astype(str), index=False).to_numpy(np.uint64)
        pos = index.get_indexer(attrs[USER])
        ok = pos >= 0
        np.add.at(digest, pos[ok], h[ok])
    return pd.DataFrame({USER: np.asarray(ids, dtype=object).astype(str), "n_train": n,
                         "digest": digest})


def reuse_decision(previous: dict | None, p: dict, state: pd.DataFrame,
                   models: dict[str, Recommender] | None = None) -> tuple[bool, str]:
    """Whether the previous run's ranker may be reused, and why (not).

    ``previous``: ``{"summary", "ranker", "recommendations", "user_state"}`` of the last
    output (None when there is none).  Reused when ``warm_start`` is on, the previous run had
    the same :func:`params_fingerprint` (fuse params and the ``models``' configurations), its
    ranker has been reused fewer than ``warm_max_reuses`` times in a row, and the training rows grew by at most
    ``warm_max_growth`` (relative; shrinking data always retrains).  The features must also
    match, checked once the test-time feature builder exists.
    """
    if not p["warm_start"]:
        return False, "warm_start off"
    if previous is None:
        return False, "no previous output"
    summ = previous["summary"]
    if summ.get("params_fingerprint") != params_fingerprint(p, models):
        return False, "fuse params or source models changed since the previous ranker was trained"
    reuses = int(summ.get("warm_start", {}).get("reuses", 0))
    if reuses >= int(p["warm_max_reuses"]):
        return False, f"ranker already reused {reuses} times in a row (warm_max_reuses)"
    before = int(summ.get("n_train_interactions", 0))
    now = int(state["n_train"].sum())
    if before <= 0 or now < before:
        return False, f"training rows went from {before} to {now}"
    growth = now / before - 1.0
    if growth > float(p["warm_max_growth"]):
        return False, f"training rows grew {growth:.1%} > warm_max_growth {float(p['warm_max_growth']):.0%}"
    return True, f"training rows grew {growth:.1%}"


def changed_users(previous_state: pd.DataFrame | None, state: pd.DataFrame) -> np.ndarray:
    """[len(state)] bool: users that are new or whose digest differs from ``previous_state``."""
    if previous_state is None:
        return np.ones(len(state), bool)
    pos = pd.Index(previous_state[USER].astype(str)).get_indexer(state[USER].astype(str))
    known = pos >= 0  # (no reindex: a missing user would turn the uint64 digests into floats)
    same = np.zeros(len(state), bool)
    same[known] = (previous_state["digest"].to_numpy(np.uint64)[pos[known]]
                   == state["digest"].to_numpy(np.uint64)[known])
    return ~same


def kept_recommendations(recs: pd.DataFrame, keep_users: np.ndarray, item_ids: np.ndarray,
                         k: int) -> pd.DataFrame:
    """The previous lists of ``keep_users``, without items gone from the catalogue (re-ranked)."""
    r = recs[recs[USER].astype(str).isin(set(map(str, keep_users)))
             & recs[ITEM].astype(str).isin(set(map(str, item_ids)))]
    r = r.sort_values([USER, "rank"], kind="stable")
    r = r.assign(rank=r.groupby(USER, sort=False).cumcount().to_numpy() + 1)
    return r[r["rank"] <= k].reset_index(drop=True)


# =========================================================================== the stage

def _add_cross_folds(ts: dict, folds: list, split: Split, fit_models: dict[str, Recommender],
                     items: ItemSide, users: UserSide, p: dict,
                     refit_fixed: dict[str, Callable] | None = None) -> tuple[dict, dict]:
    """Training rows of the extra cross-fitting folds appended to ``ts`` (fold 0).

    For each fold the sources are re-fitted (same class and hyper-parameters as the ``fit``
    models) on the fold's context rows only, checked against its labels, and the whole
    feature pipeline runs on that context.  Group ids are ``user + fold * n_users``.
    """
    nb = int(ts["n_users"])
    parts, stats = [ts], []
    for k, (context_df, label_df) in enumerate(folds, start=1):
        t = time.perf_counter()
        world = training_world(split, p, context_df, label_df, salt=k)
        if p["refit_sources"]:  # the models never see the rows moved by the simulation either
            inter, label_df = world["context"], world["labels"]
        else:
            inter = Interactions.build(context_df, split.user_ids, split.item_ids)
        models = {n: clone_model(m).fit(inter) for n, m in fit_models.items() if refittable(m)}
        t_fixed = time.perf_counter()
        models.update({n: f(inter) for n, f in (refit_fixed or {}).items() if n in fit_models})
        t_fixed = time.perf_counter() - t_fixed
        # the others learned from this fold's labels: absent here
        fixed = sorted(set(fit_models) - set(models))
        check_no_leak(models, label_df, what=f"cross-fitting fold {k} label")
        t_fit = time.perf_counter() - t
        ctx = build_context(world["context"], items, users, p)
        fb = FeatureBuilder(make_sources(models, ctx, items, users, p, absent=fixed), ctx, items,
                            users, p)
        tk = build_training_set(fb, world["labels"], p)
        tk["users"] = tk["users"] + k * nb
        parts.append(tk)
        stats.append({"fold": k, "label_rows": int(len(label_df)), "n_rows": int(len(tk["y"])),
                      "candidate_recall": tk["stats"]["candidate_recall"],
                      "seconds_fit": round(t_fit, 3), "seconds_fit_fixed": round(t_fixed, 3),
                      "absent": fixed, "seconds": round(time.perf_counter() - t, 3)})
        log.info("fusion: cross-fitting fold %d: %d rows, candidate recall %.3f", k, len(tk["y"]),
                 tk["stats"]["candidate_recall"])
    out = {"users": np.concatenate([q["users"] for q in parts]),
           "items": np.concatenate([q["items"] for q in parts]),
           "X": np.concatenate([q["X"] for q in parts]),
           "y": np.concatenate([q["y"] for q in parts]),
           "cold": np.concatenate([q["cold"] for q in parts]),
           "n_truth": np.concatenate([q["n_truth"] for q in parts]),
           "n_users": nb, "stats": ts["stats"]}
    return out, stats


def fuse(split: Split, fit_models: dict[str, Recommender] | Callable[[], dict[str, Recommender]],
         full_models: dict[str, Recommender],
         item_features: dict[str, tuple] | None = None, profiles: pd.DataFrame | None = None,
         params: dict | None = None, previous: dict | None = None) -> dict:
    """Pure stage logic. Returns ``recommendations``, ``ranker``, ``importances``, ``summary``,
    ``user_state``.

    ``fit_models`` may be a callable that loads them: a reused ranker (``previous``, see
    :func:`reuse_decision`) needs no fit-fold model, so they are not even loaded then.
    """
    p = resolve_params(params)
    timings = {}
    t = time.perf_counter()
    wanted = set(p["sources"]) if p.get("sources") else None  # only these are scored / re-fitted

    def pick(models: dict) -> dict:
        return {n: m for n, m in models.items() if wanted is None or n in wanted}

    full_models = pick(full_models)
    items = build_item_side(split.items, split.item_ids, item_features, p)
    users = build_user_side(split.users, split.user_ids, p, profiles)
    state = user_state(split)
    timings["item_user_side"] = time.perf_counter() - t

    reuse, why = reuse_decision(previous, p, state, full_models)
    fb_full = None
    if reuse:  # the test-time features must be those the previous ranker was trained on
        t = time.perf_counter()
        ctx_full = build_context(split.interactions(), items, users, p)
        fb_full = FeatureBuilder(make_sources(full_models, ctx_full, items, users, p), ctx_full,
                                 items, users, p)
        timings["test_context"] = time.perf_counter() - t
        if list(previous["ranker"].features) != list(fb_full.names):
            reuse, why = False, "the features differ from the previous ranker's"
    log.info("fusion: %s the previous ranker (%s)", "reusing" if reuse else "not reusing", why)

    if reuse:
        ranker, cold_ranker = previous["ranker"], previous.get("cold_ranker")
        src_names = [s.name for s in fb_full.sources]
        prev_summ = previous["summary"]
        train_stats = {**prev_summ.get("training", {}), "reused_from_previous_run": True}
        n_features = len(fb_full.names)
        changed = changed_users(previous["user_state"], state) if p["rescore"] == "changed" else \
            np.ones(len(state), bool)
        warm = {"used": True, "reason": why, "reuses": int(prev_summ.get("warm_start", {})
                                                         .get("reuses", 0)) + 1,
                "rescore": p["rescore"], "rescored_users": int(changed.sum()),
                "kept_users": int((~changed).sum())}
        cold_info = dict(prev_summ.get("cold_ranker") or {"used": False})
    else:
        if callable(fit_models):
            fit_models = fit_models()
        fit_models = pick(fit_models)
        if set(fit_models) != set(full_models):
            raise ValueError(f"fusion: fit models {sorted(fit_models)} and full models "
                             f"{sorted(full_models)} differ: every source needs both variants")
        warm = {"used": False, "reason": why, "reuses": 0}
        changed = np.ones(len(state), bool)
        # ---- training: fit-fold models + fit-fold rows; labels = val rows
        t = time.perf_counter()
        check_no_leak(fit_models, split.val())
        world = training_world(split, p)
        train_models = fit_models
        if p["refit_sources"]:
            refitted = {n: clone_model(m).fit(world["context"]) for n, m in fit_models.items()
                        if refittable(m)}
            check_no_leak(refitted, world["labels"], what="training label")
            # fixed sources stay as trained on the fit rows: masked on every cold user and cold
            # item, the simulated ones (whose moved rows they saw) included (Source.fixed)
            train_models = {**fit_models, **refitted}
        ctx_fit = build_context(world["context"], items, users, p)
        masked = {n: m for n, m in train_models.items()
                  if not p["refit_sources"] or not refittable(m)}
        # the models used as trained never saw a label row of a warm user x warm item (the
        # pairs they score; the others are masked, see FeatureBuilder.frame)
        check_no_leak(masked, warm_rows(world["labels"], ctx_fit, p),
                      what="training label (warm user x warm item)")
        fb_fit = FeatureBuilder(make_sources(train_models, ctx_fit, items, users, p), ctx_fit,
                                items, users, p)
        ts = build_training_set(fb_fit, world["labels"], p)
        folds = cross_folds(split, int(p["cv_folds"]), int(p["seed"]))
        if folds:
            refit_fixed, refit_why = fixed_refitter(fit_models, split, item_features, p)
            ts, fold_stats = _add_cross_folds(ts, folds, split, fit_models, items, users, p,
                                              refit_fixed)
            world["stats"]["cross_folds"] = fold_stats
            world["stats"]["fixed_sources"] = refit_why
        # (not "train_features": that key is the training FeatureBuilder's own timing, below)
        timings["training_set"] = time.perf_counter() - t
        log.info("fusion: %d training rows, candidate recall on val %.3f", len(ts["y"]),
                 ts["stats"]["candidate_recall"])
        t = time.perf_counter()
        src_names = [s.name for s in fb_fit.sources]
        ranker, diag = train_ranker(ts, fb_fit.names, src_names, p)
        timings["train_ranker"] = time.perf_counter() - t
        t = time.perf_counter()
        cold_ranker, cold_info = train_cold_ranker(ts, fb_fit.names, src_names, p)
        timings["train_cold_ranker"] = time.perf_counter() - t
        train_stats = {**ts["stats"], **diag, **ranker.info, "simulation": world["stats"]}
        n_features = len(fb_fit.names)
        timings.update({f"train_{k}": v for k, v in fb_fit.timings.items()})
        del ts

    # ---- test time: full models + all training rows, every (changed) catalogue user
    t = time.perf_counter()
    if fb_full is None:
        ctx_full = build_context(split.interactions(), items, users, p)
        fb_full = FeatureBuilder(make_sources(full_models, ctx_full, items, users, p), ctx_full,
                                 items, users, p)
    explainer = Explainer(ctx_full, items, users, p)
    recs, rstats = recommend_all(ranker, fb_full, np.nonzero(changed)[0], p, explainer,
                                 cold_ranker=cold_ranker)
    if not changed.all():
        kept = kept_recommendations(previous["recommendations"], state[USER].to_numpy()[~changed],
                                    items.item_ids, int(p["k"]))
        recs = pd.concat([kept, recs], ignore_index=True) if len(recs) else kept
        # the order of a full run: catalogue user order, then rank (byte-identical output when
        # nothing changed)
        pos = pd.Series(np.arange(len(users.user_ids)), index=pd.Index(users.user_ids).astype(str))
        order = np.lexsort((recs["rank"].to_numpy(), pos.reindex(recs[USER].astype(str)).to_numpy()))
        recs = recs.iloc[order].reset_index(drop=True)
    timings["recommend"] = time.perf_counter() - t
    timings.update({f"test_{k}": v for k, v in fb_full.timings.items()})
    summary = {
        "k": int(p["k"]), "ranker": ranker.kind, "sources": src_names,
        "modalities": sorted(items.emb), "n_features": n_features,
        "n_users": int(len(users.user_ids)), "n_items": int(items.n_items),
        "n_segments": int(users.n_seg), "segment_attributes": sorted(users.attrs),
        "n_train_interactions": int(state["n_train"].sum()),
        "params_fingerprint": params_fingerprint(p, full_models), "warm_start": warm,
        "training": train_stats, "cold_ranker": cold_info,
        "test": {k2: v for k2, v in rstats.items() if not k2.startswith("seconds")},
        "seconds": {k2: round(v, 3) for k2, v in timings.items()} |
                   {k2: v for k2, v in rstats.items() if k2.startswith("seconds")},
    }
    return {"recommendations": recs, "ranker": ranker, "cold_ranker": cold_ranker,
            "importances": ranker.importances(),
            "summary": summary, "user_state": state}


# =========================================================================== loading helpers

def register_recommenders() -> list[str]:
    """Import every module of :mod:`pipelines.recommenders` so that saved models can be loaded."""
    from . import recommenders

    failed = []
    for mod in pkgutil.iter_modules(recommenders.__path__):
        try:
            importlib.import_module(f"{recommenders.__name__}.{mod.name}")
        except ImportError as exc:  # e.g. an optional dependency missing: only its models fail
            log.warning("fusion: cannot import recommenders.%s (%s)", mod.name, exc)
            failed.append(mod.name)
    return failed


def discover_sources(root: str | Path) -> dict[str, tuple[Path, Path]]:
    """Model dirs with both variants under ``root``: name -> (fit dir, full dir).

    Layouts: ``root/fit/<name>`` + ``root/full/<name>`` (fit_cf), or ``root/model_fit`` +
    ``root/model`` (train_encoder; the name is the saved model's).
    """
    root = Path(root)
    found = {}
    if (root / "fit").is_dir() and (root / "full").is_dir():
        for d in sorted((root / "fit").iterdir()):
            if (d / "config.json").exists() and (root / "full" / d.name / "config.json").exists():
                found[d.name] = (d, root / "full" / d.name)
    if (root / "model_fit" / "config.json").exists() and (root / "model" / "config.json").exists():
        name = json.loads((root / "model" / "config.json").read_text(encoding="utf-8"))["model"]
        found[name] = (root / "model_fit", root / "model")
    return found
