"""Multi-dimensional user profiles and the ``python -m pipelines profile USER_ID`` card.

:func:`build_profiles` turns the training interactions, item metadata, item
features, text keywords, user attributes and (optionally) the encoder's user
vectors into one row per user (``profiles.parquet``):

* ``behaviour_embedding``: the encoder user vector (null without an encoder);
* ``text_affinity`` / ``image_affinity`` / ``video_affinity``: rating- and
  recency-weighted mean of the present embeddings of the items the user liked
  (rating >= ``liked_min``; every item when ratings do not vary), L2-normalised;
  null when no liked item has the modality;
* ``interests``: weighted interests over item categories (``genre_column``),
  list of ``{name, weight, lift}``.  Each interaction weighs
  ``w = w_rating * 0.5 ** (age / half_life_days)`` (``w_rating`` maps the
  rating range linearly onto [0.1, 1]; age is counted back from the user's
  last interaction) and spreads over the item's categories.  The user's shares
  are shrunk towards the global prior ``p0`` (the share of every category over
  all training interactions) with ``prior_strength`` pseudo-interactions:
  ``p = (M + k p0) / (S + k)``, ``lift = p / p0``.  The interest weight is
  the category's positive term of KL(p || p0), ``p * ln(lift)`` where
  ``lift >= min_lift``, normalised to sum to 1 over the kept top ``n_interests``.  So
  a user is not "Drama" just because most items are dramas: only
  over-represented categories count, weighted by share and lift (a user
  whose shares match the prior has no interests: "broad tastes");
* ``keywords``: the same scheme over ``keywords.parquet`` weights;
* ``people``: directors and top-billed cast (``cast_top``) seen in at least
  ``min_people_items`` of the user's items, ranked by weighted count;
* ``decades``: decade shares with lift (when items have ``year``);
* activity: ``n_interactions``, ``first_ts``, ``last_ts``, ``days_active``,
  ``mean_interval_days``, ``rating_mean``, ``rating_std``, ``cadence``
  (single session / daily / weekly / monthly / occasionally);
* ``segment``: user attributes joined with `` · ``: a column whose name
  contains ``age`` is bucketed at ``age_buckets`` (``25-34``), other columns
  with at most ``segment_max_cardinality`` values are used as they are, the
  rest (ids, zip codes) are left out;
* ``cold_start`` (``n_interactions <= cold_user_max``) and
  ``profile_source``: ``behaviour``, or ``segment-prior`` for cold users, whose
  interests are ``a * own + (1 - a) * segment mean`` with
  ``a = n / (cold_user_max + 1)``; the segment mean is over the segment's
  non-cold users, backing off to coarser segments (dropping the attribute
  with the most distinct values first) while fewer than
  ``min_segment_users`` users support it;
* ``shaping_items``: the user's items contributing most to the top two
  interests; ``summary``: one readable line.

Everything but the summary strings is vectorised (sparse matrices, numpy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from .data import item_titles
from .schema import ITEM, LIST_SEP, RATING, TS, USER

DEFAULTS: dict[str, Any] = {
    "cold_user_max": 5,
    "liked_min": 4.0,
    "half_life_days": 365.0,
    "prior_strength": 5.0,
    "min_lift": 1.1,
    "n_interests": 5,
    "n_keywords": 10,
    "n_people": 5,
    "min_people_items": 2,
    "cast_top": 5,
    "genre_column": "genres",
    "people_columns": ["director", "cast"],
    "age_buckets": [18, 25, 35, 45, 50, 56],
    "segment_max_cardinality": 30,
    "min_segment_users": 5,
    "n_shaping_items": 5,
    "n_sample": 5,
}
MODALITIES = ("text", "image", "video")
SEG_SEP = " · "
ROLE_WORDS = {"cast": "actor", "director": "director", "writer": "writer"}


# ---------------------------------------------------------------------------- helpers

def _exploded(items: pd.DataFrame, col: str, top: int | None = None) -> pd.DataFrame:
    """(iidx, name) pairs from a ``|``-separated item column (first ``top`` names)."""
    if col not in items.columns:
        return pd.DataFrame({"iidx": np.zeros(0, np.int64), "name": np.zeros(0, object)})
    s = items[col].astype(object).where(items[col].notna(), "").astype(str)
    e = s.str.split(LIST_SEP).explode()
    e = e.str.strip()
    df = pd.DataFrame({"iidx": e.index.to_numpy(np.int64), "name": e.to_numpy(object)})
    df = df[df["name"] != ""]
    if top is not None:
        df = df[df.groupby("iidx").cumcount() < int(top)]
    return df.drop_duplicates().reset_index(drop=True)


def _incidence(pairs: pd.DataFrame, n_items: int, normalise: bool,
               weight: np.ndarray | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Items x names sparse matrix (rows sum to 1 when ``normalise``) and the names."""
    names, codes = np.unique(pairs["name"].to_numpy(object).astype(str), return_inverse=True) \
        if len(pairs) else (np.zeros(0, object), np.zeros(0, np.int64))
    w = np.ones(len(pairs), np.float64) if weight is None else np.asarray(weight, np.float64)
    m = sp.csr_matrix((w, (pairs["iidx"].to_numpy(np.int64), codes)), shape=(n_items, len(names)))
    m.sum_duplicates()
    if normalise and m.nnz:
        rs = np.asarray(m.sum(1)).ravel()
        m = sp.diags(1.0 / np.where(rs > 0, rs, 1.0)) @ m
    return m.tocsr(), np.asarray(names, dtype=object)


def _excess(M: sp.csr_matrix, S: np.ndarray, p0: np.ndarray, k: float, min_lift: float = 1.0):
    """Over-represented categories: shrunk share ``p = (M + k p0)/(S + k)``, ``lift = p/p0``,
    score ``p * ln(lift)`` (the category's term of KL(p || p0)) where lift > 1.

    Only categories the user touched can be over-represented, so working on
    M's nonzeros is exact.  Returns (rows, cols, score, lift) for score > 0.
    """
    C = M.tocoo()
    rows, cols, m = C.row.astype(np.int64), C.col.astype(np.int64), C.data.astype(np.float64)
    s = S[rows]
    p = (m + k * p0[cols]) / (s + k)
    lift = p / np.maximum(p0[cols], 1e-12)
    score = p * np.log(np.maximum(lift, 1e-12))
    keep = (score > 1e-12) & (lift >= min_lift)
    return rows[keep], cols[keep], score[keep], lift[keep]


def _top_per_row(rows: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask keeping the ``n`` largest ``score`` entries of each row (ties: first)."""
    if len(rows) == 0:
        return np.zeros(0, bool)
    order = np.lexsort((-score, rows))
    r = rows[order]
    start = np.r_[0, np.nonzero(r[1:] != r[:-1])[0] + 1]
    rank = np.arange(len(r)) - np.repeat(start, np.diff(np.r_[start, len(r)]))
    keep = np.zeros(len(rows), bool)
    keep[order[rank < n]] = True
    return keep


def _sorted_lists(rows: np.ndarray, score: np.ndarray, n_users: int, fields: dict[str, Any],
                  types: dict[str, pa.DataType]) -> pa.Array:
    """list<struct<fields>> per user (row order), each list sorted by score descending."""
    order = np.lexsort((-score, rows))
    counts = np.bincount(rows[order], minlength=n_users) if len(rows) else np.zeros(n_users, np.int64)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    children = [pa.array(np.asarray(fields[f])[order] if len(rows) else [], type=types[f]) for f in fields]
    struct = pa.StructArray.from_arrays(children, names=list(fields))
    return pa.ListArray.from_arrays(pa.array(offsets), struct)


def _normalise_rows(rows: np.ndarray, values: np.ndarray, n_users: int) -> np.ndarray:
    tot = np.bincount(rows, weights=values, minlength=n_users) if len(rows) else np.zeros(n_users)
    return values / np.where(tot[rows] > 0, tot[rows], 1.0) if len(rows) else values


def _embedding_array(mat: np.ndarray, valid: np.ndarray) -> pa.Array:
    n, d = mat.shape
    flat = np.ascontiguousarray(mat, dtype=np.float32).reshape(-1)
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    arr = pa.ListArray.from_arrays(offsets, pa.array(flat, type=pa.float32()),
                                   mask=pa.array(~np.asarray(valid, bool)))
    return arr


def _null_embeddings(n: int) -> pa.Array:
    return pa.nulls(n, type=pa.list_(pa.float32()))


# ---------------------------------------------------------------------------- segments

def segment_labels(users: pd.DataFrame, user_ids: np.ndarray, params: dict) -> tuple[pd.DataFrame, list[str]]:
    """Per user (``user_ids`` order) the segment parts (one column each) and their names."""
    p = {**DEFAULTS, **params}
    u = users.copy()
    u[USER] = u[USER].astype(str)
    u = u.drop_duplicates(USER).set_index(USER).reindex(np.asarray(user_ids, dtype=object))
    parts, names = {}, []
    edges = [float(e) for e in p["age_buckets"]]
    for col in u.columns:
        s = u[col]
        if "age" in str(col).lower() and pd.to_numeric(s, errors="coerce").notna().any():
            x = pd.to_numeric(s, errors="coerce").to_numpy(np.float64)
            b = np.searchsorted(np.asarray(edges), x, side="right")
            lo = np.r_[-np.inf, edges]
            hi = np.r_[edges, np.inf]
            labels = np.array([f"<{int(edges[0])}" if i == 0 else
                               (f"{int(lo[i])}+" if i == len(edges) else f"{int(lo[i])}-{int(hi[i]) - 1}")
                               for i in range(len(edges) + 1)], dtype=object)
            lab = np.where(np.isfinite(x), "age " + labels[np.minimum(b, len(edges))].astype(str), "age ?")
            parts[str(col)] = lab
            names.append(str(col))
        elif 1 < s.dropna().nunique() <= int(p["segment_max_cardinality"]):
            parts[str(col)] = s.astype(object).where(s.notna(), "?").astype(str).to_numpy(object)
            names.append(str(col))
    return pd.DataFrame(parts, index=np.arange(len(user_ids))), names


def segment_prior(values: np.ndarray, parts: pd.DataFrame, names: list[str], eligible: np.ndarray,
                  min_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user the mean of ``values`` rows over eligible users of the finest supported segment.

    Backs off by dropping trailing attributes; level 0 = global mean.
    Returns (prior [n, k], level [n] = number of attributes used).
    """
    n, k = values.shape
    prior = np.zeros((n, k))
    level = np.full(n, -1, np.int64)
    V = pd.DataFrame(values)
    for depth in range(len(names), -1, -1):
        todo = level < 0
        if not todo.any():
            break
        if depth == 0:
            ok = eligible
            mean = values[ok].mean(0) if ok.any() else np.zeros(k)
            prior[todo] = mean
            level[todo] = 0
            break
        key = parts[names[:depth]].astype(str).agg(SEG_SEP.join, axis=1).to_numpy(object)
        elig = V[eligible].groupby(key[eligible])
        counts = elig.size()
        means = elig.mean()
        supported = counts[counts >= int(min_users)].index
        hit = todo & pd.Index(supported).get_indexer(key).__ge__(0)
        if hit.any():
            prior[hit] = means.reindex(key[hit]).to_numpy()
            level[hit] = depth
    return prior, level


# ---------------------------------------------------------------------------- builder

def build_profiles(train: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame | None,
                   params: dict | None = None, features: dict | None = None,
                   keywords: pd.DataFrame | None = None,
                   behaviour: tuple[np.ndarray, np.ndarray] | None = None) -> pa.Table:
    """Profiles for every user of ``users`` (plus any user only seen in ``train``).

    ``features``: {modality: (emb [n_items, d], present [n_items])} in ``items`` order;
    ``keywords``: item_id, keyword, weight; ``behaviour``: (user_ids, vectors).
    """
    p = {**DEFAULTS, **(params or {})}
    items = items.reset_index(drop=True).copy()
    items[ITEM] = items[ITEM].astype(str)
    item_ids = items[ITEM].to_numpy(object)
    base_users = users[USER].astype(str).unique() if users is not None else np.zeros(0, object)
    extra = pd.Index(train[USER].astype(str).unique()).difference(pd.Index(base_users))
    user_ids = np.asarray(list(base_users) + list(extra), dtype=object)
    users = users if users is not None else pd.DataFrame({USER: user_ids})
    n_users, n_items = len(user_ids), len(item_ids)

    df = train.copy()
    df["uidx"] = pd.Index(user_ids).get_indexer(df[USER].astype(str))
    df["iidx"] = pd.Index(item_ids).get_indexer(df[ITEM].astype(str))
    df = df[(df["uidx"] >= 0) & (df["iidx"] >= 0)].reset_index(drop=True)
    u = df["uidx"].to_numpy(np.int64)
    i = df["iidx"].to_numpy(np.int64)
    ts = df[TS].to_numpy(np.int64) if TS in df else np.zeros(len(df), np.int64)
    has_r = RATING in df and df[RATING].notna().any()
    r = df[RATING].to_numpy(np.float64) if has_r else np.ones(len(df))
    r = np.where(np.isfinite(r), r, np.nanmean(r) if np.isfinite(r).any() else 1.0)
    r_lo, r_hi = (float(r.min()), float(r.max())) if len(r) else (1.0, 1.0)
    varies = r_hi > r_lo
    w_rating = 0.1 + 0.9 * (r - r_lo) / (r_hi - r_lo) if varies else np.ones(len(r))
    last = np.zeros(n_users, np.int64)
    if len(df):
        np.maximum.at(last, u, ts)
    first = np.full(n_users, np.iinfo(np.int64).max)
    if len(df):
        np.minimum.at(first, u, ts)
    age_days = (last[u] - ts) / 86400.0
    w = w_rating * np.power(0.5, age_days / max(float(p["half_life_days"]), 1e-9))
    W = sp.csr_matrix((w, (u, i)), shape=(n_users, n_items))
    W.sum_duplicates()
    X = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(n_users, n_items))
    X.sum_duplicates()
    X.data[:] = 1.0
    n_inter = np.bincount(u, minlength=n_users)
    S = np.asarray(W.sum(1)).ravel()
    k = float(p["prior_strength"])
    cold = n_inter <= int(p["cold_user_max"])
    cols: dict[str, pa.Array] = {"user_id": pa.array(user_ids.astype(str).tolist(), type=pa.string())}

    # behaviour embedding ------------------------------------------------
    if behaviour is not None:
        b_ids, b_vecs = behaviour
        pos = pd.Index(np.asarray(b_ids, dtype=object).astype(str)).get_indexer(user_ids.astype(str))
        mat = np.zeros((n_users, b_vecs.shape[1]), np.float32)
        mat[pos >= 0] = b_vecs[pos[pos >= 0]]
        cols["behaviour_embedding"] = _embedding_array(mat, pos >= 0)
    else:
        cols["behaviour_embedding"] = _null_embeddings(n_users)

    # modality affinities ------------------------------------------------
    liked = (r >= float(p["liked_min"])) if varies and p.get("liked_min") is not None else np.ones(len(r), bool)
    WL = sp.csr_matrix((w[liked], (u[liked], i[liked])), shape=(n_users, n_items))
    WL.sum_duplicates()
    for m in MODALITIES:
        got = (features or {}).get(m)
        if got is None:
            cols[f"{m}_affinity"] = _null_embeddings(n_users)
            continue
        emb, present = got
        Wm = WL @ sp.diags(np.asarray(present, np.float64))
        A = np.asarray(Wm @ np.asarray(emb, np.float64))
        norm = np.linalg.norm(A, axis=1)
        valid = (np.asarray(Wm.sum(1)).ravel() > 0) & (norm > 0)
        A = (A / np.where(norm > 0, norm, 1.0)[:, None]).astype(np.float32)
        cols[f"{m}_affinity"] = _embedding_array(A, valid)

    # interests over categories (excess over the global prior) -------------------
    gpairs = _exploded(items, str(p["genre_column"]))
    G, gnames = _incidence(gpairs, n_items, normalise=True)
    str_t, f64 = pa.string(), pa.float64()
    if len(gnames):
        M = (W @ G).tocsr()
        p0 = np.asarray((X @ G).sum(0)).ravel()
        p0 = p0 / max(p0.sum(), 1e-12)
        rows, gcol, ex, lift = _excess(M, S, p0, k, float(p["min_lift"]))
        own = np.zeros((n_users, len(gnames)))
        np.add.at(own, (rows, gcol), ex)
        tot = own.sum(1, keepdims=True)
        own = np.divide(own, tot, out=np.zeros_like(own), where=tot > 0)
        lift_m = np.zeros((n_users, len(gnames)))
        Mc = M.tocoo()
        lift_m[Mc.row, Mc.col] = ((Mc.data + k * p0[Mc.col]) / (S[Mc.row] + k)) / np.maximum(p0[Mc.col], 1e-12)
        parts, seg_names = segment_labels(users, user_ids, p)
        backoff = sorted(seg_names, key=lambda c: parts[c].nunique())  # finest attribute dropped first
        prior, seg_level = segment_prior(own, parts, backoff, ~cold, int(p["min_segment_users"]))
        alpha = np.where(cold, n_inter / (int(p["cold_user_max"]) + 1.0), 1.0)
        interest = alpha[:, None] * own + (1 - alpha[:, None]) * prior
        ir, ic = np.nonzero(interest > 1e-12)
        iv = interest[ir, ic]
        keep = _top_per_row(ir, iv, int(p["n_interests"]))
        ir, ic, iv = ir[keep], ic[keep], iv[keep]
        iv = _normalise_rows(ir, iv, n_users)
        cols["interests"] = _sorted_lists(ir, iv, n_users,
                                          {"name": gnames[ic].astype(str), "weight": iv,
                                           "lift": lift_m[ir, ic]},
                                          {"name": str_t, "weight": f64, "lift": f64})
        # what the user watches most (own share of the weighted history), beside what sets the
        # user apart (``interests``): "mostly Drama and Comedy; more than most: Documentary"
        Mc_ = M.tocoo()
        tr, tc, tv = Mc_.row.astype(np.int64), Mc_.col.astype(np.int64), Mc_.data.astype(np.float64)
        tv = tv / np.maximum(np.asarray(S, np.float64)[tr], 1e-12)
        kt = _top_per_row(tr, tv, int(p["n_interests"])) & (tv > 0) & ~cold[tr]
        cols["top_categories"] = _sorted_lists(tr[kt], tv[kt], n_users,
                                               {"name": gnames[tc[kt]].astype(str), "share": tv[kt]},
                                               {"name": str_t, "share": f64})
        top_mask = np.zeros((n_users, len(gnames)), bool)
        k2 = _top_per_row(ir, iv, 2)
        top_mask[ir[k2], ic[k2]] = True
    else:
        parts, seg_names = segment_labels(users, user_ids, p)
        backoff = seg_names
        seg_level = np.zeros(n_users, np.int64)
        ir = ic = np.zeros(0, np.int64)
        iv = np.zeros(0)
        cols["interests"] = _sorted_lists(ir, iv, n_users, {"name": np.zeros(0, object), "weight": iv,
                                                            "lift": iv},
                                          {"name": str_t, "weight": f64, "lift": f64})
        cols["top_categories"] = _sorted_lists(ir, iv, n_users, {"name": np.zeros(0, object), "share": iv},
                                               {"name": str_t, "share": f64})
        top_mask = None

    # keywords -----------------------------------------------------------
    kw_r = np.zeros(0, np.int64)
    kw_names = np.zeros(0, object)
    kw_c = np.zeros(0, np.int64)
    kw_v = np.zeros(0)
    if keywords is not None and len(keywords):
        kp = pd.DataFrame({"iidx": pd.Index(item_ids).get_indexer(keywords[ITEM].astype(str)),
                           "name": keywords["keyword"].astype(str).to_numpy(object),
                           "w": keywords["weight"].to_numpy(np.float64) if "weight" in keywords
                           else np.ones(len(keywords))})
        kp = kp[kp["iidx"] >= 0]
        K, kw_names = _incidence(kp[["iidx", "name"]], n_items, normalise=False, weight=kp["w"].to_numpy())
        if K.nnz:
            MK = (W @ K).tocsr()
            SK = np.asarray(MK.sum(1)).ravel()
            p0k = np.asarray((X @ K).sum(0)).ravel()
            p0k = p0k / max(p0k.sum(), 1e-12)
            kw_r, kw_c, kw_v, _ = _excess(MK, SK, p0k, k, float(p["min_lift"]))
            keep = _top_per_row(kw_r, kw_v, int(p["n_keywords"]))
            kw_r, kw_c, kw_v = kw_r[keep], kw_c[keep], _normalise_rows(kw_r[keep], kw_v[keep], n_users)
    cols["keywords"] = _sorted_lists(kw_r, kw_v, n_users,
                                     {"name": kw_names[kw_c].astype(str) if len(kw_c) else np.zeros(0, object),
                                      "weight": kw_v}, {"name": str_t, "weight": f64})

    # people -------------------------------------------------------------
    pr_all, pv_all, pn_all, prole_all, pcnt_all = [], [], [], [], []
    for col in p["people_columns"] or []:
        pairs = _exploded(items, col, top=int(p["cast_top"]) if col == "cast" else None)
        if not len(pairs):
            continue
        P, pnames = _incidence(pairs, n_items, normalise=False)
        MP = (W @ P).tocoo()
        CP = (X @ P).tocsr()
        cnt = np.asarray(CP[MP.row, MP.col]).ravel()
        ok = cnt >= int(p["min_people_items"])
        pr_all.append(MP.row[ok].astype(np.int64))
        pv_all.append(MP.data[ok])
        pn_all.append(pnames[MP.col[ok]].astype(str))
        prole_all.append(np.full(int(ok.sum()), str(col), dtype=object))
        pcnt_all.append(cnt[ok].astype(np.int64))
    if pr_all:
        pr, pv = np.concatenate(pr_all), np.concatenate(pv_all)
        pn, prole, pcnt = np.concatenate(pn_all), np.concatenate(prole_all), np.concatenate(pcnt_all)
        keep = _top_per_row(pr, pv, int(p["n_people"]))
        pr, pv, pn, prole, pcnt = pr[keep], pv[keep], pn[keep], prole[keep], pcnt[keep]
        pv = _normalise_rows(pr, pv, n_users)
    else:
        pr, pv = np.zeros(0, np.int64), np.zeros(0)
        pn = prole = np.zeros(0, object)
        pcnt = np.zeros(0, np.int64)
    cols["people"] = _sorted_lists(pr, pv, n_users, {"name": pn, "role": prole, "weight": pv, "n_items": pcnt},
                                   {"name": str_t, "role": str_t, "weight": f64, "n_items": pa.int64()})

    # decades ------------------------------------------------------------
    dr, dv, dl = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    dnames = np.zeros(0, object)
    dc = np.zeros(0, np.int64)
    if "year" in items.columns:
        year = pd.to_numeric(items["year"], errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(year)
        if ok.any():
            dec = (np.floor(year[ok] / 10) * 10).astype(np.int64)
            pairs = pd.DataFrame({"iidx": np.nonzero(ok)[0], "name": [f"{d}s" for d in dec]})
            D, dnames = _incidence(pairs, n_items, normalise=True)
            MD = (W @ D).tocoo()
            p0d = np.asarray((X @ D).sum(0)).ravel()
            p0d = p0d / max(p0d.sum(), 1e-12)
            SD = np.asarray((W @ D).sum(1)).ravel()
            dr, dc = MD.row.astype(np.int64), MD.col.astype(np.int64)
            dv = MD.data / np.maximum(SD[dr], 1e-12)
            dl = ((MD.data + k * p0d[dc]) / (SD[dr] + k)) / np.maximum(p0d[dc], 1e-12)
            keep = _top_per_row(dr, dv, 3)
            dr, dc, dv, dl = dr[keep], dc[keep], dv[keep], dl[keep]
    cols["decades"] = _sorted_lists(dr, dv, n_users, {"name": dnames[dc].astype(str) if len(dc) else
                                                      np.zeros(0, object), "weight": dv, "lift": dl},
                                    {"name": str_t, "weight": f64, "lift": f64})

    # activity -----------------------------------------------------------
    has = n_inter > 0
    days = np.where(has, (last - np.where(has, first, 0)) / 86400.0, np.nan)
    interval = np.where(n_inter > 1, days / np.maximum(n_inter - 1, 1), np.nan)
    rsum = np.bincount(u, weights=r, minlength=n_users)
    rsq = np.bincount(u, weights=r * r, minlength=n_users)
    rmean = np.where(has, rsum / np.maximum(n_inter, 1), np.nan)
    rstd = np.where(has, np.sqrt(np.maximum(rsq / np.maximum(n_inter, 1) - rmean ** 2, 0)), np.nan)
    if not has_r:
        rmean[:] = np.nan
        rstd[:] = np.nan
    cadence = np.select([n_inter == 0, n_inter == 1, days < 1, interval <= 1.5, interval <= 10, interval <= 45],
                        ["inactive", "one interaction", "single session", "daily", "weekly", "monthly"],
                        "occasionally").astype(object)
    cols["n_interactions"] = pa.array(n_inter.astype(np.int64))
    cols["first_ts"] = pa.array(np.where(has, first, 0), mask=~has, type=pa.int64())
    cols["last_ts"] = pa.array(np.where(has, last, 0), mask=~has, type=pa.int64())
    cols["days_active"] = pa.array(days, from_pandas=True)
    cols["mean_interval_days"] = pa.array(interval, from_pandas=True)
    cols["rating_mean"] = pa.array(rmean, from_pandas=True)
    cols["rating_std"] = pa.array(rstd, from_pandas=True)
    cols["cadence"] = pa.array(cadence.tolist(), type=pa.string())

    # segment, cold start ------------------------------------------------
    segment = parts[seg_names].astype(str).agg(SEG_SEP.join, axis=1).to_numpy(object) if seg_names \
        else np.full(n_users, "all users", dtype=object)
    cols["segment"] = pa.array(segment.tolist(), type=pa.string())
    cols["cold_start"] = pa.array(cold)
    source = np.where(cold, "segment-prior", "behaviour").astype(object)
    cols["profile_source"] = pa.array(source.tolist(), type=pa.string())
    seg_level_names = np.array(["all users"] + [SEG_SEP.join(backoff[:d]) for d in range(1, len(backoff) + 1)],
                               dtype=object)
    prior_from = np.where(cold, seg_level_names[np.clip(seg_level, 0, len(backoff))], None)
    cols["segment_prior_level"] = pa.array(prior_from.tolist(), type=pa.string())

    # items that shaped the top interests --------------------------------------
    Wc = W.tocoo()
    wr, wc, wv = Wc.row.astype(np.int64), Wc.col.astype(np.int64), Wc.data
    if top_mask is not None and len(wr):
        contrib = wv * np.asarray(G[wc].multiply(top_mask[wr]).sum(1)).ravel()
    else:
        contrib = wv.copy()
    ok = contrib > 0
    keep = _top_per_row(wr[ok], contrib[ok], int(p["n_shaping_items"]))
    sr, sc, sv = wr[ok][keep], wc[ok][keep], contrib[ok][keep]
    order = np.lexsort((-sv, sr))
    counts = np.bincount(sr, minlength=n_users) if len(sr) else np.zeros(n_users, np.int64)
    cols["shaping_items"] = pa.ListArray.from_arrays(
        pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32)),
        pa.array(item_ids[sc[order]].astype(str).tolist() if len(sc) else [], type=pa.string()))

    table = pa.table(cols)
    summaries = [summary_line(rec) for rec in _iter_records(table)]
    return table.append_column("summary", pa.array(summaries, type=pa.string()))


# ---------------------------------------------------------------------------- text

def _iter_records(table: pa.Table, columns=("interests", "top_categories", "people", "decades", "cadence",
                                             "cold_start", "n_interactions", "segment", "profile_source")):
    data = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in columns}
    for j in range(table.num_rows):
        yield {c: data[c][j] for c in columns}


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def summary_line(rec: dict) -> str:
    """One readable line, e.g. 'mostly Sci-Fi and Thriller, more than most: Film-Noir (3.2x), 1990s,
    favours director X; active weekly'."""
    top = [x["name"] for x in (rec.get("interests") or [])[:2]]
    bits = []
    if rec.get("profile_source") == "segment-prior":
        n = int(rec.get("n_interactions") or 0)
        head = f"new user ({n} interaction{'s' if n != 1 else ''})"
        if top:
            head += f"; segment {rec.get('segment')} suggests {_and(top)}"
        return head
    shares = [x["name"] for x in (rec.get("top_categories") or [])[:3]]
    if shares:  # what the user watches most; then what sets the user apart, if it differs
        bits.append(f"mostly {_and(shares)}")
        extra = [x for x in (rec.get("interests") or [])[:2]
                 if x["name"] not in shares and (x.get("lift") or 0) > 1.5]
        if extra:
            bits.append("more than most: " + _and([f"{x['name']} ({x['lift']:.1f}x)" for x in extra]))
    elif top:
        bits.append(f"mostly {_and(top)}")
    dec = rec.get("decades") or []
    if dec:
        bits.append(dec[0]["name"])
    people = rec.get("people") or []
    if people:
        role = ROLE_WORDS.get(people[0]["role"], people[0]["role"])
        bits.append(f"favours {role} {people[0]['name']}")
    if not top:
        bits.insert(0, "broad tastes (no category stands out)")
    text = ", ".join(bits)
    cad = rec.get("cadence")
    if cad in ("daily", "weekly", "monthly"):
        text += f"; active {cad}"
    elif cad:
        text += f"; {cad}"
    return text


def to_records(table: pa.Table, rows=None) -> list[dict]:
    """Profiles as JSON-able dicts (embeddings shortened to their dimension and first values)."""
    t = table if rows is None else table.take(pa.array(rows, type=pa.int64()))
    out = []
    for rec in t.to_pylist():
        for key in [k for k in rec if k.endswith("_embedding") or k.endswith("_affinity")]:
            v = rec[key]
            rec[key] = None if v is None else {"dim": len(v), "head": [round(float(x), 4) for x in v[:4]]}
        out.append(rec)
    return out


def sample_rows(table: pa.Table, n: int) -> list[int]:
    """A few rows: the first behaviour profiles and the first cold-start ones."""
    cold = np.asarray(table.column("cold_start").to_pylist(), bool)
    warm_rows = np.nonzero(~cold)[0][:max(n - 1, 1)]
    cold_rows = np.nonzero(cold)[0][:max(n - len(warm_rows), 0)]
    return [int(x) for x in np.r_[warm_rows, cold_rows][:n]]


def _fmt_date(ts) -> str:
    if ts is None:
        return "-"
    return pd.Timestamp(int(ts), unit="s", tz="UTC").strftime("%Y-%m-%d")


def render_card(rec: dict, titles: dict[str, str] | None = None) -> str:
    """The profile card of one profile record (a dict from the table)."""
    titles = titles or {}
    lines = [f"Profile of user {rec['user_id']}  [{rec['profile_source']}]"
             f"{'  COLD START' if rec['cold_start'] else ''}",
             f"  {rec['summary']}", ""]

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<12} {text}")

    row("Segment", str(rec.get("segment")) + (f"  (prior from: {rec['segment_prior_level']})"
                                                if rec.get("segment_prior_level") else ""))
    row("Cold start", "yes" if rec["cold_start"] else "no")
    tops = rec.get("top_categories") or []
    row("Watches", " | ".join(f"{x['name']} {x['share']:.0%}" for x in tops) or "-")
    ints = rec.get("interests") or []
    row("Interests", " | ".join(f"{x['name']} {x['weight']:.2f}" + (f" (lift {x['lift']:.1f}x)" if x.get("lift") else "")
                                for x in ints) or "-")
    kws = rec.get("keywords") or []
    row("Keywords", ", ".join(f"{x['name']} ({x['weight']:.2f})" for x in kws) or "-")
    ppl = rec.get("people") or []
    row("People", "; ".join(f"{x['role']} {x['name']} ({x['n_items']} items)" for x in ppl) or "-")
    dec = rec.get("decades") or []
    row("Decades", ", ".join(f"{x['name']} {x['weight']:.2f}" for x in dec) or "-")
    n = rec.get("n_interactions") or 0
    act = f"{n} interactions"
    if n:
        act += f", {_fmt_date(rec.get('first_ts'))} to {_fmt_date(rec.get('last_ts'))}"
        if rec.get("days_active") is not None:
            act += f" ({rec['days_active']:.0f} days)"
        if rec.get("mean_interval_days") is not None:
            act += f", every {rec['mean_interval_days']:.1f} days on average"
        if rec.get("rating_mean") is not None:
            act += f"; ratings {rec['rating_mean']:.2f} +/- {rec['rating_std']:.2f}"
    row("Activity", f"{act} ({rec.get('cadence')})")
    shaped = [titles.get(i, i) for i in (rec.get("shaping_items") or [])]
    row("Shaped by", "; ".join(shaped) or "-")
    dims = []
    for key in ("behaviour_embedding", "text_affinity", "image_affinity", "video_affinity"):
        v = rec.get(key)
        dims.append(f"{key.split('_')[0]} " + (f"d={len(v)}" if v is not None else "-"))
    row("Vectors", ", ".join(dims))
    return "\n".join(lines)


def profile_cli(argv=None) -> int:
    """``python -m pipelines profile USER_ID [--profiles DIR] [--split DIR] [--json]``."""
    ap = argparse.ArgumentParser(prog="python -m pipelines profile",
                                 description="Print one user's profile card.")
    ap.add_argument("user_id")
    ap.add_argument("--profiles", default="artifacts/build_profiles",
                    help="build_profiles output directory (holds profiles.parquet)")
    ap.add_argument("--split", default="artifacts/split", help="split directory (item titles)")
    ap.add_argument("--json", action="store_true", help="print the profile as JSON")
    args = ap.parse_args(argv)
    path = Path(args.profiles) / "profiles.parquet"
    if not path.is_file():
        print(f"error: no profiles at {path} (run the build_profiles stage first)", file=sys.stderr)
        return 1
    table = pq.read_table(path, filters=[("user_id", "=", str(args.user_id))])
    if table.num_rows == 0:
        print(f"error: unknown user '{args.user_id}' (not in {path})", file=sys.stderr)
        return 2
    rec = table.slice(0, 1).to_pylist()[0]
    if args.json:
        print(json.dumps(to_records(table.slice(0, 1))[0], indent=2, default=str))
        return 0
    print(render_card(rec, item_titles(args.split, rec.get("shaping_items") or [])))
    return 0


__all__ = ["DEFAULTS", "build_profiles", "segment_labels", "segment_prior", "summary_line", "render_card",
           "profile_cli", "to_records", "sample_rows"]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(profile_cli())
