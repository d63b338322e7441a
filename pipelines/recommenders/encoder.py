"""Transformer user encoder over interaction histories, behind the Recommender interface.

Model
-----
A user is the sequence ``[ATTR] i_1 i_2 ... i_n`` of their interactions in
time order (the most recent ``max_len - 1`` at inference).

* **Item representation** (shared by input tokens and output vectors):
  ``v_i = E_id[i] * known_i + sum_m present_m[i] * W_m f_m[i]`` where ``f_m`` is
  the (centred, L2-normalised) text / image / video feature of the item and
  ``present_m`` its mask (a missing modality contributes exactly zero), plus a
  scalar bias ``b_i`` built the same way.  ``known_i`` is 1 for items that
  have training interactions; items without (cold items) are represented by
  their content alone, so they still get meaningful vectors.  During training
  the id part is dropped at random (``id_dropout``) so that the content
  projections learn to stand in for it.
* **Input tokens** add a learned position embedding, a log-bucketed time-gap
  embedding (gap to the previous interaction) and, when ratings vary, a
  rating-bucket embedding.
* **Attribute token** ``[ATTR]`` (position 0): a learned vector plus the
  embeddings of every user attribute (categorical columns by value, numeric
  columns by quantile bucket, index 0 = unknown) and hashed pairwise cross
  features of them.  A user with no history is encoded from this token alone
  (the segment prior), so cold users get a vector.
* ``torch.nn.TransformerEncoder`` (pre-LN, GELU), a final LayerNorm, pooling
  (mean over the sequence for ``holdout``, the last position for ``next``)
  and a linear head give the user vector ``u``; with ``bag`` (default) a
  linear map of the mean input item vector is added (a residual "bag of
  items" path that speeds up learning).  ``score(u, i) = u . v_i + b_i``.
  The recommender stores ``[u, 1]`` and ``[v_i, b_i]``, so scoring at
  evaluation is one dot product and needs neither torch nor features.
  ``d_item`` (default ``d_model``) sets the item / user vector size (items are
  projected to ``d_model`` inside the transformer); ``tie: false`` gives input
  tokens their own item tables (output vectors keep id + content).

Objectives (``objective``)
--------------------------
* ``holdout`` (default): for each user, a random subset of the history is the
  input and the rest are targets (multi-label softmax over the catalogue, the
  input items excluded from the softmax).  This matches a per-user *random*
  evaluation split: the user vector must predict held-out items anywhere in
  the history.  A share ``cold_train_prob`` of samples keeps only
  ``0..cold_user_max`` input items, training the attribute-only prior.
* ``next``: causal attention, every position predicts the next item.

The softmax is over the whole catalogue when it has at most
``full_softmax_max`` items, otherwise over the batch's target items (in-batch
negatives) plus ``n_negatives`` uniformly sampled items.

Training: AdamW with a cosine learning-rate schedule, an exponential moving
average of the weights (``ema``, with the usual ``(1+t)/(10+t)`` warm-up) that
is what gets evaluated and exported, early stopping on Recall@``eval_k`` over
the ``val`` fold (the model sees only ``fit`` rows; at the end the user
vectors are computed from the whole training history).  With ``refit`` (default)
a second, fresh model is then trained on every training row (fit + val) for the
epoch count that validated best (:func:`refit_epochs`), and that one is exported;
with ``ensemble`` (default) the phase-1 model joins it: the exported vectors are
``[u2, 1, u1, 1]`` and ``[v2, b2, v1, b1]``, so a score is the sum of both models'
scores (both user vectors from the whole training history; no extra training).
Attribute crosses shared by fewer than ``attr_cross_min_users`` users are not
embedded (``cross_keep`` buffer): rare combinations act as user ids.  On ML-100K the
moving average was worth about +0.03 NDCG@10: single-epoch weights are noisy.  Seeded per epoch (numpy and torch), CPU
runs use deterministic algorithms: the same params and data give the same
weights.  CUDA is used when present (bf16 autocast, optional ``torch.compile``).
A checkpoint is written atomically after every epoch (see
:class:`Checkpointer`); a killed run resumes from it.

Warm start (incremental retraining): :meth:`EncoderRecommender.set_warm_start`
with an earlier fitted encoder of the same architecture initialises the new
model from its weights: item tables are aligned by item id (new items keep a
fresh init, and get content vectors through the modality projections anyway),
attribute embeddings are copied (categorical vocabularies aligned by value;
re-bucketed numeric columns and, when any column's encoding changed, the hashed
crosses start afresh), all other weights are copied; training then runs ``warm_epochs`` epochs (cosine
schedule over those) instead of ``epochs``, each of at most
``warm_samples_per_epoch`` samples: first the users whose history changed
(new users, new interactions), then a replay of the others.  New users need nothing: user
vectors are computed from histories and attributes.  An incompatible earlier
model (other architecture, modalities or feature sizes) means a cold start;
``train_info_['warm_start']`` records which happened and why.  The first
phase (the ``fit`` variant, trained on the fit rows) starts from the previous
``fit`` variant, never from the previous full model, which learned from the
val rows that the fuse stage takes as honest labels.

Multi-GPU: launch the train_encoder stage with ``torchrun --nproc_per_node N
-m tasks.train_encoder ...``; when ``WORLD_SIZE > 1`` every rank trains on its
shard of users (``DistributedSampler``) inside ``DistributedDataParallel``
(NCCL on CUDA, gloo on CPU), rank 0 evaluates, checkpoints, logs and writes
the outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import Interactions
from ..io import atomic_path
from ..schema import RATING, TS, USER, mostly_numeric
from .base import Recommender, topk

log = logging.getLogger("mmrec.encoder")

MODALITIES = ("text", "image", "video")
N_GAP_BUCKETS = 26
N_RATING_BUCKETS = 12

DEFAULTS: dict[str, Any] = {
    # architecture
    "d_model": 64, "n_layers": 2, "n_heads": 2, "ff_mult": 2, "max_len": 200, "dropout": 0.2,
    "d_item": None,               # item / user vector size (None = d_model); projected to d_model inside
    "head_mlp": False,            # user head: Linear (False) or Linear-GELU-Linear
    "pool": "auto",               # auto (holdout: mean, next: last) | cls | mean | last
    "bag": True,                  # add a linear map of the mean input item vector to the user vector
    "tie": True,                  # input tokens and output vectors share the item tables
    "use_time": True, "use_rating": True, "use_attributes": True,
    "attr_max_categories": 50,    # categorical columns with more values are bucketed if numeric, else dropped
    "attr_numeric_buckets": 8, "attr_hash_buckets": 1024,
    # a hashed cross value shared by fewer users (with a history) is not embedded: rare
    # combinations act as user ids and are memorised (ML-100K cold-start protocol, cold users
    # NDCG@10: 0.514 with every cross, 0.547 with this filter, 0.559 without crosses)
    "attr_cross_min_users": 20,
    # objective
    "objective": "holdout",       # holdout | next
    "input_min": 0.5, "input_max": 0.9,  # holdout: share of the history used as input
    "input_target_weight": 0.0,   # holdout: >0 also reconstructs the input items with this relative weight
    "target_norm": "user",        # user: each user's targets sum to 1 | item: each target weighs the same
    "cold_train_prob": 0.1, "cold_user_max": 5,
    "full_softmax_max": 20000, "n_negatives": 2048,
    "id_dropout": 0.1, "token_dropout": 0.0,
    # optimisation
    "epochs": 10, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.01, "grad_clip": 1.0,
    "lr_schedule": "cosine",      # constant | cosine (over ``epochs``, after ``warmup_epochs`` linear warm-up)
    "warmup_epochs": 0, "lr_min_ratio": 0.1,
    "samples_per_user": 3,        # training samples (random input/target splits) per user and epoch
    "max_samples_per_epoch": 0,   # >0: at most this many samples per epoch (random users): bounds an epoch at scale
    "patience": 5, "eval_k": 20, "min_epochs": 1,
    "ema": 0.995,                 # >0: evaluate / export an exponential moving average of the weights
    "seed": 42, "device": "auto", "precision": "auto", "compile": False, "threads": 0,
    # training batches made this many steps ahead in a background thread (pinned memory and
    # asynchronous copies on CUDA); the same batches as made inline. "auto": 2 on CUDA, 0 on CPU
    "prefetch_batches": "auto",
    "deterministic": True, "max_train_seconds": 0,
    # after early stopping on the val fold, retrain on every training row for the best epoch count
    "refit": True, "refit_tolerance": 0.01,  # relative: see refit_epochs()
    # with refit: export the sum of both phases' scores (a two-model ensemble at no extra
    # training cost; ML-100K stratified NDCG@10 0.4445 -> 0.4474, coldstart cold users
    # 0.5465 -> 0.5617)
    "ensemble": True,
    # a cold-user member: a second encoder trained on short inputs only (cold_member_params)
    # scores the users with at most cold_user_max training rows (and unknown users); skipped
    # when no user is that short or no time is left (at most cold_member_max_seconds)
    "cold_member": True,
    "cold_member_params": {"cold_train_prob": 1.0, "attr_hash_buckets": 0},
    "cold_member_max_seconds": 150,
    # incremental retraining: start from the previous model (tasks.train_encoder reads it)
    "warm_start": False, "warm_epochs": 3,
    "warm_samples_per_epoch": 10000,  # warm epochs: users whose history changed first, then others (0 = all)
}


# ---------------------------------------------------------------------------- side information

def load_modality(dir_path: str | os.PathLike | None, item_ids) -> tuple[np.ndarray, np.ndarray] | None:
    """One modality's features aligned to ``item_ids``: (emb [n, d] float32, present [n] bool).

    Returns None when the directory (or its features.parquet) is absent or no
    item has the modality.  Items missing from the table count as not present.
    """
    if dir_path is None:
        return None
    d = Path(dir_path)
    if not (d / "features.parquet").is_file():
        return None
    from ..features import read_features

    ids, emb, present, _table = read_features(d)
    if emb.ndim != 2 or emb.shape[1] == 0 or not present.any():
        return None
    pos = pd.Index(pd.Series(ids, dtype=object).astype(str)).get_indexer(
        np.asarray(item_ids, dtype=object).astype(str))
    ok = pos >= 0
    out = np.zeros((len(pos), emb.shape[1]), np.float32)
    pres = np.zeros(len(pos), bool)
    out[ok] = emb[pos[ok]]
    pres[ok] = present[pos[ok]]
    out[~pres] = 0.0
    if not pres.any():
        return None
    return out, pres


def _normalise_features(emb: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Centre on the present rows' mean and L2-normalise; missing rows stay zero."""
    x = np.asarray(emb, np.float32).copy()
    if present.any():
        x[present] -= x[present].mean(axis=0, keepdims=True)
        n = np.linalg.norm(x[present], axis=1, keepdims=True)
        x[present] /= np.maximum(n, 1e-8)
    x[~present] = 0.0
    return x


def attribute_spec(users: pd.DataFrame | None, params: dict) -> list[dict]:
    """How each user attribute column is encoded (JSON-able, saved with the model).

    Numeric columns (>= 95% parse as numbers) with more than
    ``attr_max_categories`` distinct values are bucketed at quantiles;
    other columns with at most ``attr_max_categories`` values are categorical
    (vocabulary sorted); remaining high-cardinality text columns are dropped.
    """
    if users is None or not params.get("use_attributes", True):
        return []
    spec = []
    for col in users.columns:
        if col == USER:
            continue
        s = users[col]
        vals = s.dropna().astype(str)
        n_unique = vals.nunique()
        if n_unique <= 1:
            continue
        numeric, num = mostly_numeric(s)
        if n_unique <= int(params["attr_max_categories"]):
            spec.append({"name": str(col), "kind": "cat", "vocab": sorted(vals.unique().tolist())})
        elif numeric:
            qs = np.linspace(0, 1, int(params["attr_numeric_buckets"]) + 1)[1:-1]
            edges = np.unique(np.quantile(num.dropna().to_numpy(np.float64), qs)).tolist()
            spec.append({"name": str(col), "kind": "num", "edges": [float(e) for e in edges]})
    return spec


def attribute_codes(users: pd.DataFrame | None, user_ids, spec: list[dict]) -> np.ndarray:
    """[n_users, n_cols] int64 codes (0 = unknown) in ``user_ids`` order."""
    n = len(user_ids)
    codes = np.zeros((n, len(spec)), np.int64)
    if users is None or not spec:
        return codes
    u = users.copy()
    u[USER] = u[USER].astype(str)
    u = u.drop_duplicates(USER).set_index(USER).reindex(np.asarray(user_ids, dtype=object).astype(str))
    for j, c in enumerate(spec):
        if c["name"] not in u.columns:
            continue
        s = u[c["name"]]
        if c["kind"] == "cat":
            idx = pd.Index(c["vocab"]).get_indexer(s.astype(str))
            codes[:, j] = np.where((idx >= 0) & s.notna().to_numpy(), idx + 1, 0)
        else:
            num = pd.to_numeric(s, errors="coerce").to_numpy(np.float64)
            b = np.searchsorted(np.asarray(c["edges"], np.float64), num, side="right") + 1
            codes[:, j] = np.where(np.isfinite(num), b, 0)
    return codes


def cross_codes(codes: np.ndarray, n_hash: int) -> np.ndarray:
    """Hashed pairwise crosses of attribute codes: [n_users, n_pairs] in [0, n_hash).

    ``n_hash`` 0: no crosses (zero columns).
    """
    n, c = codes.shape
    if n_hash <= 0:
        return np.zeros((n, 0), np.int64)
    pairs = [(a, b) for a in range(c) for b in range(a + 1, c)]
    out = np.zeros((n, len(pairs)), np.int64)
    for p, (a, b) in enumerate(pairs):
        h = ((p + 1) * 1_000_003 + codes[:, a] * 7919 + codes[:, b] * 104_729) % max(n_hash, 1)
        out[:, p] = h
    return out


# ---------------------------------------------------------------------------- torch model

def _torch():
    import torch

    return torch


def build_module(arch: dict):
    """The torch module for an architecture dict (see :meth:`EncoderRecommender._arch`)."""
    torch = _torch()
    nn = torch.nn

    class UserEncoder(nn.Module):
        def __init__(self, a: dict):
            super().__init__()
            self.a = a
            d, n_items = int(a["d_model"]), int(a["n_items"])
            di = int(a.get("d_item") or d)  # item / user vector size (scoring space)
            self.n_items = n_items
            self.item_emb = nn.Embedding(n_items + 1, di, padding_idx=0)
            nn.init.normal_(self.item_emb.weight, std=0.05)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
            self.id_bias = nn.Embedding(n_items + 1, 1, padding_idx=0)
            nn.init.zeros_(self.id_bias.weight)
            self.register_buffer("known", torch.zeros(n_items + 1), persistent=True)
            self.modalities = list(a["modalities"])
            self.proj = nn.ModuleDict()
            self.proj_bias = nn.ModuleDict()
            for m, dim in zip(a["modalities"], a["modality_dims"]):
                self.register_buffer(f"feat_{m}", torch.zeros(n_items + 1, int(dim)), persistent=True)
                self.register_buffer(f"present_{m}", torch.zeros(n_items + 1), persistent=True)
                self.proj[m] = nn.Linear(int(dim), di, bias=False)
                self.proj_bias[m] = nn.Linear(int(dim), 1, bias=False)
                nn.init.normal_(self.proj[m].weight, std=0.05)
                nn.init.zeros_(self.proj_bias[m].weight)
            self.in_item_emb, self.in_proj_m = None, None
            if not a.get("tie", True):  # separate input-side item tables
                self.in_item_emb = nn.Embedding(n_items + 1, di, padding_idx=0)
                nn.init.normal_(self.in_item_emb.weight, std=0.05)
                with torch.no_grad():
                    self.in_item_emb.weight[0].zero_()
                self.in_proj_m = nn.ModuleDict({m: nn.Linear(int(dim), di, bias=False)
                                                for m, dim in zip(a["modalities"], a["modality_dims"])})
                for lin in self.in_proj_m.values():
                    nn.init.normal_(lin.weight, std=0.05)
            L = int(a["max_len"])
            self.pos_emb = nn.Embedding(L, d)
            nn.init.normal_(self.pos_emb.weight, std=0.02)
            self.gap_emb = nn.Embedding(N_GAP_BUCKETS, d) if a["use_time"] else None
            self.rating_emb = nn.Embedding(N_RATING_BUCKETS, d) if a["use_rating"] else None
            for e in (self.gap_emb, self.rating_emb):
                if e is not None:
                    nn.init.normal_(e.weight, std=0.02)
            self.cls = nn.Parameter(torch.zeros(d))
            self.attr_emb = nn.ModuleList([nn.Embedding(int(n) + 1, d) for n in a["attr_sizes"]])
            self.cross_emb = nn.Embedding(int(a["attr_hash_buckets"]), d) \
                if len(a["attr_sizes"]) >= 2 and int(a["attr_hash_buckets"]) > 0 else None
            if self.cross_emb is not None:  # 1 = the cross value is shared by enough users
                self.register_buffer("cross_keep", torch.ones(int(a["attr_hash_buckets"])),
                                     persistent=True)
            for e in list(self.attr_emb) + ([self.cross_emb] if self.cross_emb is not None else []):
                nn.init.normal_(e.weight, std=0.02)
            layer = nn.TransformerEncoderLayer(d, int(a["n_heads"]), d * int(a["ff_mult"]),
                                               float(a["dropout"]), activation="gelu",
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, int(a["n_layers"]), enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.in_proj = nn.Linear(di, d) if di != d else None
            self.head = nn.Sequential(nn.Linear(d, di), nn.GELU(), nn.Linear(di, di)) \
                if a.get("head_mlp") else nn.Linear(d, di)
            self.bag = nn.Linear(di, di, bias=False) if a.get("bag") else None
            self.drop = nn.Dropout(float(a["dropout"]))

        # item side -------------------------------------------------------
        def item_table(self, idx=None, keep_id=None, side: str = "out"):
            """(V [k, d_item], b [k]) for item indices ``idx`` (0-based; None = all items).

            ``side='in'`` gives the input-token representation: the same
            tables unless the model is untied (``tie: false``), in which case
            inputs have their own id embeddings and content projections.
            """
            rows = (torch.arange(self.n_items, device=self.known.device) if idx is None else idx) + 1
            mask = self.known[rows]
            if keep_id is not None:
                mask = mask * keep_id
            untied = side == "in" and self.in_item_emb is not None
            emb = self.in_item_emb if untied else self.item_emb
            proj = self.in_proj_m if untied else self.proj
            V = emb(rows) * mask[:, None]
            b = self.id_bias(rows)[:, 0] * mask
            for m in self.modalities:
                pres = getattr(self, f"present_{m}")[rows]
                f = getattr(self, f"feat_{m}")[rows]
                V = V + proj[m](f) * pres[:, None]
                if not untied:
                    b = b + self.proj_bias[m](f)[:, 0] * pres
            return V, b

        # user side -------------------------------------------------------
        def encode(self, tokens, gaps, ratings, attrs, crosses, V_tok, causal: bool = False):
            """User states. tokens [B, L] (0 = pad, else item index + 1); V_tok [B, L, d]."""
            B, L = tokens.shape
            x = V_tok if self.in_proj is None else self.in_proj(V_tok)
            pos = torch.arange(1, L + 1, device=tokens.device).clamp(max=self.pos_emb.num_embeddings - 1)
            x = x + self.pos_emb(pos)[None]
            if self.gap_emb is not None:
                x = x + self.gap_emb(gaps)
            if self.rating_emb is not None:
                x = x + self.rating_emb(ratings)
            a = self.cls[None, :].expand(B, -1) + self.pos_emb.weight[0][None]
            for j, e in enumerate(self.attr_emb):
                a = a + e(attrs[:, j])
            if self.cross_emb is not None and crosses.shape[1]:
                a = a + (self.cross_emb(crosses) * self.cross_keep[crosses][..., None]).sum(1)
            x = torch.cat([a[:, None, :], x], dim=1)
            pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=tokens.device), tokens == 0], 1)
            x = self.drop(x)
            mask = None
            if causal:
                mask = torch.triu(torch.ones(L + 1, L + 1, dtype=torch.bool, device=x.device), 1)
            h = self.encoder(x, mask=mask, src_key_padding_mask=pad)
            if self.bag is not None:  # residual "bag of items" path: masked mean of the input items
                n = (tokens > 0).sum(1, keepdim=True).clamp(min=1).to(V_tok.dtype)
                self._bag_mean = V_tok.sum(1) / n
            return self.norm(h), pad

        def pool(self, h, pad, how: str):
            if how == "cls":
                z = h[:, 0]
            elif how == "mean":
                w = (~pad).to(h.dtype)
                z = torch.where(pad[..., None], torch.zeros_like(h), h).sum(1) / w.sum(1, keepdim=True)
            elif how == "last":
                last = (~pad).sum(1) - 1
                z = h[torch.arange(h.shape[0], device=h.device), last]
            else:
                raise ValueError(f"unknown pool '{how}'")
            z = self.head(z)
            if self.bag is not None:
                z = z + self.bag(self._bag_mean)
            return z

        def forward(self, batch: dict):
            """Training loss for one batch (see :func:`_make_batch`)."""
            keep_id = batch.get("keep_id")
            cand = batch.get("cand")  # sorted 0-based candidate items, or None = all
            tokens = batch["tokens"]
            V, b = self.item_table(cand, keep_id)
            Vi = V if self.in_item_emb is None else self.item_table(cand, keep_id, side="in")[0]
            Vi = torch.cat([torch.zeros_like(Vi[:1]), Vi])
            V_tok = Vi[tokens] if cand is None else Vi[batch["tokens_c"]]
            causal = batch["objective"] == "next"
            h, pad = self.encode(tokens, batch["gaps"], batch["ratings"], batch["attrs"],
                                 batch["crosses"], V_tok, causal=causal)
            if causal:
                q = self.head(h)  # every position
                q = q.reshape(-1, q.shape[-1])
            else:
                q = self.pool(h, pad, batch["pool"])
            logits = q.float() @ V.float().T + b.float()[None]
            if batch["excl_rows"].numel():
                logits = logits.index_put((batch["excl_rows"], batch["excl_cols"]),
                                          torch.tensor(float("-inf"), device=logits.device))
            logp = torch.log_softmax(logits, dim=1)
            picked = logp[batch["pos_rows"], batch["pos_cols"]]
            # mean over targets within a row, then mean over rows
            w = batch["pos_w"]
            return -(picked * w).sum() / batch["n_rows"]

    return UserEncoder(arch)


# ---------------------------------------------------------------------------- batches

@dataclass
class _Histories:
    """Per-user time-ordered histories as flat arrays + offsets (user index order)."""

    items: np.ndarray   # int64 item indices
    ts: np.ndarray      # int64 seconds
    rbucket: np.ndarray  # int64 rating bucket (1..N_RATING_BUCKETS-1)
    offsets: np.ndarray  # [n_users + 1]

    @classmethod
    def from_df(cls, df: pd.DataFrame, n_users: int, rating_range: tuple[float, float]) -> "_Histories":
        d = df.sort_values(["uidx", TS, "iidx"], kind="stable")
        u = d["uidx"].to_numpy(np.int64)
        offsets = np.searchsorted(u, np.arange(n_users + 1)).astype(np.int64)
        items = d["iidx"].to_numpy(np.int64)
        ts = d[TS].to_numpy(np.int64) if TS in d else np.zeros(len(d), np.int64)
        rb = rating_buckets(d[RATING].to_numpy(np.float64) if RATING in d else np.ones(len(d)),
                            rating_range)
        return cls(items, ts, rb, offsets)

    @classmethod
    def empty(cls, n_users: int) -> "_Histories":
        z = np.zeros(0, np.int64)
        return cls(z, z, z, np.zeros(n_users + 1, np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, u: int):
        s, e = self.offsets[u], self.offsets[u + 1]
        return self.items[s:e], self.ts[s:e], self.rbucket[s:e]


def rating_buckets(r: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    lo, hi = rng
    r = np.nan_to_num(np.asarray(r, np.float64), nan=hi)
    if hi <= lo:
        return np.ones(len(r), np.int64)
    z = np.clip((r - lo) / (hi - lo), 0, 1)
    return (1 + np.round(z * (N_RATING_BUCKETS - 2))).astype(np.int64)


def gap_buckets(ts: np.ndarray) -> np.ndarray:
    """Log2 bucket of the gap (minutes) to the previous interaction; 0 for the first."""
    g = np.zeros(len(ts), np.int64)
    if len(ts) > 1:
        gap = np.maximum(np.diff(ts).astype(np.float64), 0) / 60.0
        g[1:] = np.minimum(1 + np.floor(np.log2(1 + gap)).astype(np.int64), N_GAP_BUCKETS - 1)
    return g


def _pad_sequences(seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], L: int):
    B = len(seqs)
    width = max([1] + [len(s[0]) for s in seqs])
    width = min(width, L)
    tok = np.zeros((B, width), np.int64)
    gap = np.zeros((B, width), np.int64)
    rat = np.zeros((B, width), np.int64)
    for r, (it, ts, rb) in enumerate(seqs):
        n = min(len(it), width)
        if n:
            tok[r, :n] = it[-n:] + 1
            gap[r, :n] = gap_buckets(ts[-n:])
            rat[r, :n] = rb[-n:]
    return tok, gap, rat


def _length_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int,
                    rng: np.random.Generator, pool: int = 32) -> list[np.ndarray]:
    """Split ``order`` into batches of users with similar history lengths (less padding).

    Consecutive windows of ``pool * batch_size`` users are sorted by length
    and cut into batches; the batches are then shuffled.
    """
    batches = []
    win = max(1, pool) * batch_size
    for s in range(0, len(order), win):
        w = order[s:s + win]
        w = w[np.argsort(lengths[w], kind="stable")]
        batches += [w[i:i + batch_size] for i in range(0, len(w), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _sample_holdout(rng: np.random.Generator, n: int, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Positions (time order) of input and target items for one user history of length n."""
    perm = rng.permutation(n)
    if n == 1:
        n_in = 0
    elif rng.random() < float(p["cold_train_prob"]):
        n_in = int(rng.integers(0, min(int(p["cold_user_max"]), n - 1) + 1))
    else:
        frac = rng.uniform(float(p["input_min"]), float(p["input_max"]))
        n_in = int(np.clip(round(frac * n), 1, n - 1))
    inp = np.sort(perm[:n_in])
    L = int(p["max_len"]) - 1
    if len(inp) > L:
        inp = np.sort(rng.choice(inp, L, replace=False))
    return inp, perm[n_in:]


def _make_batch(users: np.ndarray, hist: _Histories, attrs: np.ndarray, crosses: np.ndarray,
                rng: np.random.Generator, p: dict, n_items: int, device) -> dict | None:
    """Tensors for one training step (``None`` when no user in ``users`` has a history).

    ``pos_rows/pos_cols/pos_w``: weighted (query row, target item) pairs;
    ``excl_rows/excl_cols``: (query row, item) pairs removed from the softmax.
    """
    torch = _torch()
    objective = p["objective"]
    L = int(p["max_len"]) - 1
    seqs, targets, weights, rows_used = [], [], [], []
    ex_r, ex_c = [], []
    iw = float(p.get("input_target_weight", 0.0))
    for u in users:
        it, ts, rb = hist.get(int(u))
        if len(it) == 0:
            continue
        r = len(rows_used)
        rows_used.append(int(u))
        if objective == "holdout":
            inp, tgt = _sample_holdout(rng, len(it), p)
            if float(p["token_dropout"]) > 0 and len(inp) > 1:
                inp = inp[rng.random(len(inp)) >= float(p["token_dropout"])]
            seqs.append((it[inp], ts[inp], rb[inp]))
            t_items = np.unique(it[tgt])
            in_items = np.setdiff1d(np.unique(it[inp]), t_items)
            if iw > 0:  # also reconstruct the input items (Mult-DAE style), down-weighted by iw
                targets.append(np.concatenate([t_items, in_items]))
                tw = np.r_[np.ones(len(t_items)), np.full(len(in_items), iw)]
                weights.append(tw / tw.sum())
            else:  # predict only the held-out items; input items leave the softmax
                targets.append(t_items)
                weights.append(np.full(len(t_items), 1.0 / max(len(t_items), 1)))
                ex_r.append(np.full(len(in_items), r))
                ex_c.append(in_items)
        else:  # next: a window of up to L+1 items; position t (0 = ATTR) predicts window[t]
            if len(it) > L + 1:
                s = int(rng.integers(0, len(it) - L)) if rng.random() < 0.5 else len(it) - L - 1
                it, ts, rb = it[s:s + L + 1], ts[s:s + L + 1], rb[s:s + L + 1]
            seqs.append((it[:-1], ts[:-1], rb[:-1]))
            targets.append(it.astype(np.int64))
    if not rows_used:
        return None
    tok, gap, rat = _pad_sequences(seqs, L)
    B, W = tok.shape
    if objective == "holdout":
        pos_r = np.concatenate([np.full(len(t), r) for r, t in enumerate(targets)])
        pos_w = np.concatenate(weights)
        n_rows = float(B)
        if p.get("target_norm", "user") == "item":  # every target counts the same (heavy users weigh more)
            sizes = np.concatenate([np.full(len(t), len(t)) for t in targets])
            pos_w = pos_w * sizes * B / max(len(pos_w), 1)
    else:
        pos_r = np.concatenate([r * (W + 1) + np.arange(len(t)) for r, t in enumerate(targets)])
        pos_w = np.ones(len(pos_r))
        n_rows = float(len(pos_r))
    pos_c = np.concatenate(targets).astype(np.int64)
    pos_r = pos_r.astype(np.int64)
    pos_w = pos_w.astype(np.float32)
    ex_r = np.concatenate(ex_r).astype(np.int64) if ex_r else np.zeros(0, np.int64)
    ex_c = np.concatenate(ex_c).astype(np.int64) if ex_c else np.zeros(0, np.int64)
    rows_used = np.asarray(rows_used, np.int64)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    batch: dict[str, Any] = {"objective": objective, "pool": p["_pool"]}
    if n_items > int(p["full_softmax_max"]):
        # sampled softmax: the batch's targets and inputs (in-batch negatives) + uniform negatives
        negs = rng.integers(0, n_items, int(p["n_negatives"]))
        cand = np.unique(np.concatenate([pos_c, negs, tok[tok > 0] - 1]))
        batch["tokens_c"] = t(np.where(tok > 0, np.searchsorted(cand, np.maximum(tok - 1, 0)) + 1, 0))
        pos_c = np.searchsorted(cand, pos_c)
        keep = np.isin(ex_c, cand)
        ex_r, ex_c = ex_r[keep], np.searchsorted(cand, ex_c[keep])
        batch["cand"] = t(cand)
        n_id = len(cand)
    else:
        n_id = n_items
    keep_id = (rng.random(n_id) >= float(p["id_dropout"])).astype(np.float32)
    batch.update({
        "tokens": t(tok), "gaps": t(gap), "ratings": t(rat),
        "attrs": t(attrs[rows_used]), "crosses": t(crosses[rows_used]),
        "pos_rows": t(pos_r), "pos_cols": t(pos_c), "pos_w": t(pos_w),
        "excl_rows": t(ex_r), "excl_cols": t(ex_c), "n_rows": n_rows,
        "keep_id": t(keep_id),
    })
    return batch


def prefetch_depth(value, device) -> int:
    """Batches made ahead for ``prefetch_batches`` (``"auto"``: 2 on CUDA, 0 elsewhere)."""
    if value == "auto":
        return 2 if device.type == "cuda" else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train_encoder.prefetch_batches must be 'auto' or an integer >= 0, got {value!r}")
    return value


def _pin(batch: dict) -> dict:
    torch = _torch()
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


def _to_device(batch: dict, device, pinned: bool) -> dict:
    """The batch's tensors on ``device``; asynchronous copies when they are in pinned memory."""
    torch = _torch()
    return {k: v.to(device, non_blocking=pinned) if torch.is_tensor(v) else v for k, v in batch.items()}


def training_batches(chunks: list, make, depth: int, device):
    """Yield ``make(chunk)`` for each chunk (skipping ``None``), on ``device``.

    ``make`` builds CPU tensors.  With ``depth`` > 0 a background thread makes
    the batches, in order, at most ``depth`` ahead of the consumer, so host-side
    batching overlaps the training step; on CUDA they are pinned by the thread
    and copied with ``non_blocking``.  The thread is the only user of ``make``'s
    random generator while it runs, so the batches are the ones made inline.
    An exception in the thread is raised here; closing the generator (the
    consumer stops or fails) stops the thread.
    """
    pin = device.type == "cuda"
    move = device.type != "cpu"
    prepare = _pin if pin else (lambda b: b)  # host side: in the thread when there is one

    def on_device(b: dict) -> dict:
        return _to_device(b, device, pin) if move else b

    if depth <= 0:
        for c in chunks:
            b = make(c)
            if b is not None:
                yield on_device(prepare(b))
        return
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for c in chunks:
                if stop.is_set():
                    return
                b = make(c)
                if b is not None and not put(("batch", prepare(b))):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put(("error", exc))

    t = threading.Thread(target=work, name="encoder-batches", daemon=True)
    t.start()
    try:
        while True:
            kind, b = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise b
            yield on_device(b)
    finally:
        stop.set()
        t.join()


# ---------------------------------------------------------------------------- checkpoints

class Checkpointer:
    """``<dir>/last/``: state.safetensors (model, best model, optimizer tensors) + state.json.

    The JSON holds epoch, step, early-stopping state, the history of metrics,
    the optimizer's param groups, the numpy and torch RNG states and the
    fingerprint of params + data; a checkpoint whose fingerprint differs is
    ignored (a fresh run starts).  Written with ``atomic_path``: a kill while
    saving leaves the previous checkpoint intact.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.dir = Path(root) / "last"
        self.fingerprint = fingerprint

    def save(self, model, best_state: dict | None, optimizer, info: dict,
             ema_state: dict | None = None) -> None:
        torch = _torch()
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if best_state is not None:
            tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
        if ema_state is not None:
            tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema_state.items()})
        osd = optimizer.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                tv = v if torch.is_tensor(v) else torch.tensor(v)
                tensors[f"opt.{pid}.{k}"] = tv.detach().cpu().contiguous()
        meta = dict(info)
        meta["fingerprint"] = self.fingerprint
        meta["param_groups"] = osd["param_groups"]
        meta["torch_rng"] = torch.get_rng_state().tolist()
        with atomic_path(self.dir, is_dir=True) as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta, default=_json_default), encoding="utf-8")

    def load(self) -> tuple[dict, dict] | None:
        """(tensors, info) of a compatible checkpoint, or None."""
        from safetensors.torch import load_file

        from safetensors import SafetensorError

        j, s = self.dir / "state.json", self.dir / "state.safetensors"
        if not (j.is_file() and s.is_file()):
            return None
        try:
            info = json.loads(j.read_text(encoding="utf-8"))
            if not isinstance(info, dict):
                raise TypeError(f"expected a JSON object, found {type(info).__name__}")
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint {j} is unreadable ({type(exc).__name__}: {exc}); delete "
                             f"{self.dir} to start afresh") from exc
        if info.get("fingerprint") != self.fingerprint:
            log.info("checkpoint %s is for other params/data: starting afresh", self.dir)
            return None
        try:
            return load_file(str(s)), info
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"checkpoint {s} is unreadable ({type(exc).__name__}: {exc}); delete "
                             f"{self.dir} to start afresh") from exc

    @staticmethod
    def restore(tensors: dict, info: dict, model, optimizer) -> tuple[dict | None, dict | None]:
        """Load model and optimizer state; returns (best state, EMA state)."""
        torch = _torch()
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        torch.set_rng_state(torch.tensor(info["torch_rng"], dtype=torch.uint8))
        return best, ema


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def fingerprint(params: dict, data: Interactions, extra: Any = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in params.items() if not k.startswith("_")},
                        sort_keys=True, default=str).encode())
    d = data.df
    h.update(np.asarray(pd.util.hash_pandas_object(
        d[["uidx", "iidx", TS] + (["fold"] if "fold" in d else [])], index=False)).tobytes())
    h.update(str(data.n_users).encode() + b"/" + str(data.n_items).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- recommender

class EncoderRecommender(Recommender):
    """Transformer user encoder; ``score = [u, 1] . [v_i, b_i]`` (see module docstring).

    Side information is optional: call :meth:`set_side_info` before ``fit``
    with item features per modality and the users table; call
    :meth:`set_run` to checkpoint into a directory and log with dvclive.
    """

    name = "encoder"

    def __init__(self, **params: Any):
        super().__init__(**{**DEFAULTS, **params})
        self._features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._users: pd.DataFrame | None = None
        self._workdir: Path | None = None
        self._live = None
        self.item_vecs_: np.ndarray | None = None
        self.user_vecs_: np.ndarray | None = None
        self.prior_vec_: np.ndarray | None = None
        self.weights_: dict[str, np.ndarray] = {}
        self.member_weights_: list[dict[str, np.ndarray]] = []  # further ensemble members
        self.train_info_: dict = {}
        self._warm: "EncoderRecommender | None" = None
        self._warm_fit: "EncoderRecommender | None | str" = "same"  # see set_warm_start
        self.fit_model_: "EncoderRecommender | None" = None  # see _fit_variant
        self._fit_user_vecs: np.ndarray | None = None

    # ---- configuration ------------------------------------------------
    def set_side_info(self, features: dict[str, tuple[np.ndarray, np.ndarray] | None] | None = None,
                      users: pd.DataFrame | None = None) -> "EncoderRecommender":
        """``features``: {modality: (emb [n_items, d], present [n_items])} in catalogue order."""
        self._features = {m: v for m, v in (features or {}).items() if v is not None}
        self._users = users
        return self

    def set_warm_start(self, previous: "EncoderRecommender | None",
                       fit_previous: "EncoderRecommender | None | str" = "same") -> "EncoderRecommender":
        """Initialise the next ``fit`` from ``previous`` (an earlier fitted encoder), if compatible.

        ``fit_previous``: what the first phase starts from when the data has a ``val`` fold
        (default ``"same"``: ``previous``).  The first phase yields the ``fit`` variant, whose
        scores on the val rows must be honest (the fuse stage learns from them): starting it
        from a model that was trained on every training row, val rows included, would leak
        them.  train_encoder passes the previous ``fit`` variant here (None: a cold first phase).
        """
        self._warm = previous
        self._warm_fit = fit_previous
        return self

    def set_run(self, workdir: str | os.PathLike | None = None, live=None) -> "EncoderRecommender":
        self._workdir = Path(workdir) if workdir is not None else None
        self._live = live
        return self

    # ---- training -----------------------------------------------------
    def _arch(self, data: Interactions) -> dict:
        p = self.params
        spec = attribute_spec(self._users, p)
        mods = [m for m in MODALITIES if m in self._features] + \
               sorted(m for m in self._features if m not in MODALITIES)
        r = data.df[RATING].to_numpy(np.float64) if RATING in data.df and len(data.df) else np.ones(1)
        r = r[np.isfinite(r)] if np.isfinite(r).any() else np.ones(1)
        pool = p["pool"] if p["pool"] != "auto" else ("last" if p["objective"] == "next" else "mean")
        return {
            "d_model": int(p["d_model"]), "n_layers": int(p["n_layers"]), "n_heads": int(p["n_heads"]),
            "d_item": int(p["d_item"] or p["d_model"]), "head_mlp": bool(p["head_mlp"]),
            "ff_mult": int(p["ff_mult"]), "max_len": int(p["max_len"]), "dropout": float(p["dropout"]),
            "n_items": int(data.n_items), "modalities": mods,
            "modality_dims": [int(self._features[m][0].shape[1]) for m in mods],
            "use_time": bool(p["use_time"]),
            "use_rating": bool(p["use_rating"]) and float(r.max()) > float(r.min()),
            "rating_range": [float(r.min()), float(r.max())],
            "attr_spec": spec, "attr_sizes": [len(c["vocab"]) if c["kind"] == "cat" else
                                              len(c["edges"]) + 1 for c in spec],
            "attr_hash_buckets": int(p["attr_hash_buckets"]), "pool": pool,
            "causal": p["objective"] == "next", "bag": bool(p["bag"]) and p["objective"] != "next", "tie": bool(p["tie"]),
        }

    def _fit(self, data: Interactions) -> None:
        torch = _torch()
        prev = torch.are_deterministic_algorithms_enabled()
        try:
            self._train(data)
            has_val = "fold" in data.df and (data.df["fold"] == "val").any()
            self.fit_model_ = self._fit_variant(data) if has_val else None
            if self.params["refit"] and has_val:
                self._refit(data)
            if self.params["cold_member"]:
                self._add_cold_member(data)
        finally:
            torch.use_deterministic_algorithms(prev)

    def _fit_variant(self, data: Interactions) -> "EncoderRecommender":
        """The phase-1 model as it stands on the ``fit`` rows alone: same weights, user vectors
        from each user's fit rows, seen items = fit rows.  It is the encoder's ``fit`` variant
        for the fuse stage (``model_fit/``): its scores on the ``val`` fold are honest, as those
        of the CF ``fit`` models are.  Built before any refit; not trained again."""
        fit_df = data.df[data.df["fold"] != "val"]
        m = EncoderRecommender(**{k: v for k, v in self.params.items() if not k.startswith("_")})
        m.params["_arch"] = self.params["_arch"]
        # the recipe of a model "trained the same way" on other rows (see context_clone)
        info = self.train_info_
        m.params["_recipe"] = {
            "epochs": refit_epochs(info.get("history", []), f"recall@{int(self.params['eval_k'])}",
                                   float(self.params["refit_tolerance"]), int(info["best_epoch"])),
            "train_seconds": float(info["train_seconds"]),
            "epochs_run": int(info["epochs_run"])}
        m.set_side_info(self._features, self._users)
        m.user_ids, m.item_ids = self.user_ids, self.item_ids
        m._seen = Interactions(fit_df.drop(columns="fold"), data.user_ids, data.item_ids).matrix()
        m.user_vecs_, m.item_vecs_, m.prior_vec_ = self._fit_user_vecs, self.item_vecs_, self.prior_vec_
        m.weights_ = dict(self.weights_)
        m.train_info_ = {k: v for k, v in self.train_info_.items() if k != "history"}
        self._fit_user_vecs = None  # handed over
        return m

    def context_clone(self, features: dict | None, users: pd.DataFrame | None,
                      max_seconds: float = 0.0) -> "EncoderRecommender":
        """An unfitted encoder that trains on other rows the way this ``fit`` variant was
        trained (same hyper-parameters, the validated epoch count, no validation fold, no
        refit, ensemble or cold member), e.g. on a cross-fitting fold's context in the fuse
        stage.  Needs the ``_recipe`` that :meth:`_fit_variant` records; ``max_seconds`` > 0
        bounds its training time."""
        recipe = self.params.get("_recipe")
        if not recipe:
            raise ValueError("encoder: this model has no training recipe (only the 'fit' variant "
                             "written by train_encoder has one)")
        p = {k: v for k, v in self.params.items() if not k.startswith("_")}
        p.update(refit=False, ensemble=False, cold_member=False, warm_start=False, patience=0,
                 epochs=int(recipe["epochs"]), max_train_seconds=0)
        if max_seconds > 0:
            p["_time_box"] = float(max_seconds)
        return EncoderRecommender(**p).set_side_info(features, users)

    def recipe_seconds(self) -> float | None:
        """Estimated training seconds of a :meth:`context_clone` (None: no recipe)."""
        r = self.params.get("_recipe")
        if not r:
            return None
        return float(r["train_seconds"]) * int(r["epochs"]) / max(int(r["epochs_run"]), 1)

    def _refit(self, data: Interactions) -> None:
        """Phase 2: a fresh model on every training row (fit + val) for the best epoch count.

        Phase 1 (:meth:`_train` on the ``fit`` rows) early-stopped on the ``val`` fold;
        its epoch count (see :func:`refit_epochs`), schedule and seed are reused, so the
        exported model differs only in having learned from the val rows too (as the CF
        ``full`` models do).  On ML-100K this was worth about +0.01 NDCG@10.
        ``max_train_seconds`` bounds both phases together: this one gets what the first
        left (none left: phase 1's model is exported).
        Checkpoints of this phase go to ``<workdir>/refit/``: a run killed here resumes
        phase 1 from its finished checkpoint (export only) and this phase where it stopped.
        """
        info1 = dict(self.train_info_)
        phase1 = (self.user_vecs_, self.item_vecs_, self.prior_vec_, self.weights_)
        budget = float(self.params.get("_time_box", self.params["max_train_seconds"]))
        left = budget - float(info1["train_seconds"]) if budget > 0 else 0.0
        if budget > 0 and left < 0.1 * budget:  # the time box is spent: export phase 1
            self.train_info_ = {**info1, "refit": {"skipped": f"max_train_seconds {budget:g} spent "
                                                              f"by the first phase"}}
            log.info("refit skipped: max_train_seconds spent by the first phase")
            return
        epochs = refit_epochs(info1.get("history", []), f"recall@{int(self.params['eval_k'])}",
                              float(self.params["refit_tolerance"]), int(info1["best_epoch"]))
        p2 = {k: v for k, v in self.params.items() if not k.startswith("_")}
        p2.update(refit=False, epochs=epochs, patience=0, warm_epochs=epochs, cold_member=False)
        # what is left of the box varies run to run: a "_" key stays out of the checkpoint's
        # fingerprint, so a killed refit resumes (and a retry writes the same checkpoint)
        p2["_time_box"] = left
        sub = EncoderRecommender(**p2).set_side_info(self._features, self._users)
        sub.set_run(self._workdir / "refit" if self._workdir is not None else None)
        sub.set_warm_start(self._warm)
        sub.fit(Interactions(data.df.drop(columns="fold"), data.user_ids, data.item_ids))
        self.user_vecs_, self.item_vecs_, self.prior_vec_ = sub.user_vecs_, sub.item_vecs_, sub.prior_vec_
        self.weights_ = sub.weights_
        self.member_weights_ = []
        self.params["_arch"] = sub.params["_arch"]
        if self.params["ensemble"]:  # score = refit model's + phase-1 model's (both full-history)
            U1, V1, P1, W1 = phase1
            self.user_vecs_ = np.hstack([self.user_vecs_, U1]).astype(np.float32)
            self.item_vecs_ = np.hstack([self.item_vecs_, V1]).astype(np.float32)
            self.prior_vec_ = np.r_[self.prior_vec_, P1].astype(np.float32)
            self.member_weights_ = [W1]
        info2 = sub.train_info_
        self.train_info_ = {**info1, "refit": {
            "epochs": epochs, "train_seconds": info2["train_seconds"],
            "resumed_from_epoch": info2["resumed_from_epoch"], "warm_start": info2["warm_start"],
            "ensemble": bool(self.params["ensemble"])}}

    def _add_cold_member(self, data: Interactions) -> None:
        """Train the cold-user member and append its vectors (see :meth:`score_users`).

        One model for every user learns mostly from long inputs, and on short histories it
        was barely above popularity (ML-100K coldstart, cold users NDCG@10: 0.562 for the
        ensemble, 0.519 popularity, 0.636 item-kNN).  A model trained only on inputs of
        0..``cold_user_max`` items (``cold_train_prob`` 1, no attribute crosses) scored 0.640
        there.  It is the same recipe (phase 1, refit, ensemble) under its own time box.
        """
        cmax = int(self.params["cold_user_max"])
        n = np.diff(self._seen.indptr)
        info = self.train_info_
        spent = _seconds_trained(info)
        budget = float(self.params["max_train_seconds"])
        cap = float(self.params["cold_member_max_seconds"])
        left = min(budget - spent, cap) if budget > 0 else cap
        why = None
        prev = self._warm.cold_view() if self._warm is not None else None
        if not (n <= cmax).any():
            why = f"no user has at most cold_user_max={cmax} training rows"
        elif left < 0.05 * max(cap, 1.0):
            why = "no time left (max_train_seconds / cold_member_max_seconds)"
        elif prev is None and (info.get("warm_start") or {}).get("used"):
            # an incremental run stays incremental: no from-scratch member when the previous
            # (full) run had none (e.g. it spent its time box on the main model)
            why = "warm-started run and the previous model has no cold member"
        if why:
            self.train_info_ = {**info, "cold_member": {"skipped": why}}
            log.info("cold member skipped: %s", why)
            return
        pc = {k: v for k, v in self.params.items() if not k.startswith("_")}
        pc.update(self.params["cold_member_params"] or {})
        pc.update(cold_member=False)
        # the box left varies run to run: a "_" key stays out of the checkpoint fingerprint
        pc["_time_box"] = max(left, 1.0)
        sub = EncoderRecommender(**pc).set_side_info(self._features, self._users)
        sub.set_run(self._workdir / "cold" if self._workdir is not None else None)
        # incremental retraining: the previous model's cold member warm-starts this one
        sub.set_warm_start(prev)
        sub.fit(data)
        dm = self._member_dim()
        if sub._member_dim() != dm:
            raise ValueError(f"encoder: cold_member_params change the vector size "
                             f"({sub._member_dim() - 1} vs {dm - 1}): keep d_model / d_item")
        self.user_vecs_ = np.hstack([self.user_vecs_, sub.user_vecs_]).astype(np.float32)
        self.item_vecs_ = np.hstack([self.item_vecs_, sub.item_vecs_]).astype(np.float32)
        self.prior_vec_ = np.r_[self.prior_vec_, sub.prior_vec_].astype(np.float32)
        self.member_weights_ = [*self.member_weights_, sub.weights_, *sub.member_weights_]
        self.params["_cold_arch"] = sub.params["_arch"]
        self.params["_cold_members"] = 1 + len(sub.member_weights_)
        si = sub.train_info_
        self.train_info_ = {**info, "cold_member": {
            "members": self.params["_cold_members"], "users": int((n <= cmax).sum()),
            "train_seconds": _seconds_trained(si), "best_epoch": si.get("best_epoch"),
            "warm_start": si.get("warm_start"),
            "params": dict(self.params["cold_member_params"] or {})}}

    def _route(self, U: np.ndarray, cold: np.ndarray) -> np.ndarray:
        """User vectors [main members | cold members] with the part not used zeroed: the
        cold members score the rows flagged ``cold``, the main ones the others."""
        nc = int(self.params.get("_cold_members", 0))
        if not nc:
            return U
        cut = U.shape[1] - nc * self._member_dim()
        U = U.copy()
        U[cold, :cut] = 0.0
        U[~cold, cut:] = 0.0
        return U

    def _train(self, data: Interactions) -> None:
        torch = _torch()
        from ..features import autocast, autocast_dtype, select_device, set_threads

        p = self.params
        arch = self._arch(data)
        self.params["_arch"] = arch
        warm_info: dict = {"used": False, "reason": "no previous model"}
        warm, compare = self._warm, data
        if "fold" in data.df.columns and (data.df["fold"] == "val").any() \
                and not isinstance(self._warm_fit, str):
            # the first phase: never from a model that saw the val rows; what changed is
            # then counted on the fit rows, the ones both that model and this phase learn from
            warm = self._warm_fit
            compare = Interactions(data.df[data.df["fold"] != "val"].drop(columns="fold"),
                                   data.user_ids, data.item_ids)
            if warm is None and self._warm is not None:
                warm_info["reason"] = "no previous fit-rows model (the previous full model saw " \
                                      "the val rows)"
        if warm is not None:
            why = warm_incompatibility(warm, arch)
            if why is None:
                p["epochs"] = min(int(p["epochs"]), int(p["warm_epochs"]))
                warm_info = {"used": True}
                changed = changed_users(warm, compare)
            else:
                warm_info = {"used": False, "reason": why}
                log.info("warm start not possible (%s): training from scratch", why)
        dist = _dist_info()
        if dist["world"] > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        if dist["world"] > 1 and torch.cuda.is_available():
            device = torch.device("cuda", dist["local_rank"])
            torch.cuda.set_device(device)
        else:
            device = select_device(p["device"])
        if device.type == "cpu":
            set_threads(int(p["threads"]) or None)
            if p["deterministic"]:
                torch.use_deterministic_algorithms(True)
        amp = autocast_dtype(device, p["precision"])
        is_main = dist["rank"] == 0

        # data: fit rows train, val rows early-stop, all rows for the final vectors
        df = data.df
        if "fold" in df.columns and (df["fold"] == "val").any():
            fit_df, val_df = df[df["fold"] != "val"], df[df["fold"] == "val"]
        else:
            fit_df, val_df = df, df.iloc[:0]
        rr = tuple(arch["rating_range"])
        hist_fit = _Histories.from_df(fit_df, data.n_users, rr)
        hist_all = _Histories.from_df(df, data.n_users, rr)
        codes = attribute_codes(self._users, data.user_ids, arch["attr_spec"])
        cross = cross_codes(codes, arch["attr_hash_buckets"])
        known = np.zeros(data.n_items, np.float32)
        known[np.unique(fit_df["iidx"].to_numpy())] = 1.0

        torch.manual_seed(int(p["seed"]))
        model = build_module(arch)
        self._load_buffers(model, known)
        if warm_info["used"]:
            warm_info.update(warm_load(model, warm, data.item_ids, arch),
                             changed_users=int(changed.sum()))
            log.info("warm start: %s", warm_info)
        if model.cross_emb is not None:  # after warm_load: from this run's users
            active = np.diff(hist_all.offsets) > 0
            counts = np.bincount(cross[active].ravel(), minlength=int(arch["attr_hash_buckets"]))
            with torch.no_grad():
                model.cross_keep.copy_(torch.as_tensor(
                    (counts >= int(p["attr_cross_min_users"])).astype(np.float32)))
        model.to(device)
        train_model = model
        if p["compile"] and device.type == "cuda":
            train_model = torch.compile(model)
        if dist["world"] > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                              find_unused_parameters=True)
        opt = torch.optim.AdamW(model.parameters(), lr=float(p["lr"]),
                                weight_decay=float(p["weight_decay"]))

        ckpt = None
        state = {"epoch": 0, "step": 0, "best_metric": -1.0, "best_epoch": 0, "bad_epochs": 0,
                 "history": [], "done": False, "train_seconds": 0.0}
        best_state = None
        ema = float(p["ema"])
        ema_state = {k: v.detach().clone() for k, v in model.named_parameters()} if ema > 0 else None
        cpu = torch.device("cpu")
        depth = prefetch_depth(p["prefetch_batches"], device)
        eval_model = build_module(arch).to(device) if ema > 0 else model
        resumed_from = 0
        if self._workdir is not None:
            ckpt = Checkpointer(self._workdir / "checkpoints",
                                fingerprint(p, data, {"arch": arch, "world": dist["world"]}))
            loaded = ckpt.load()
            if loaded is not None:
                try:
                    best_state, saved_ema = Checkpointer.restore(loaded[0], loaded[1], model, opt)
                except (KeyError, ValueError, TypeError, RuntimeError) as exc:
                    raise ValueError(f"checkpoint {ckpt.dir / 'state.safetensors'} does not fit the "
                                     f"model ({type(exc).__name__}: {exc}); delete {ckpt.dir} to "
                                     "start afresh") from exc
                if ema_state is not None and saved_ema is not None:
                    ema_state = {k: v.to(device) for k, v in saved_ema.items()}
                for k in state:
                    state[k] = loaded[1].get(k, state[k])
                resumed_from = int(state["epoch"])
                log.info("resumed from checkpoint at epoch %d", resumed_from)

        if ema_state is not None:  # the parameters and their averages, in the same order
            param_list = [v for _, v in model.named_parameters()]
            ema_list = [ema_state[k] for k, _ in model.named_parameters()]
        val_truth = _truth_keys(val_df, data.n_items)
        has_val = len(val_df) > 0
        p_run = dict(p)
        p_run["_pool"] = arch["pool"]
        users_all = np.nonzero(np.diff(hist_fit.offsets) > 0)[0]
        t_start = time.perf_counter() - float(state["train_seconds"])
        live = self._live if is_main else None
        while not state["done"] and state["epoch"] < int(p["epochs"]):
            epoch = int(state["epoch"]) + 1
            rng = np.random.default_rng([int(p["seed"]), epoch])
            torch.manual_seed(int(p["seed"]) * 100_003 + epoch)
            order = np.concatenate([rng.permutation(users_all) for _ in range(int(p["samples_per_user"]))])
            if int(p["max_samples_per_epoch"]) > 0:  # a random subset (each user at most once first)
                order = order[:int(p["max_samples_per_epoch"])]
            if warm_info["used"] and int(p["warm_samples_per_epoch"]) > 0:
                # fine-tune on what changed, with a replay of the other users (no forgetting)
                ch = changed[users_all]
                order = np.concatenate([rng.permutation(users_all[ch]), rng.permutation(users_all[~ch])])
                order = order[:int(p["warm_samples_per_epoch"])]
            if dist["world"] > 1:
                from torch.utils.data import DistributedSampler

                sampler = DistributedSampler(range(len(order)), num_replicas=dist["world"],
                                             rank=dist["rank"], shuffle=False)
                order = order[np.fromiter(iter(sampler), np.int64)]
            model.train()
            losses = []
            bs = int(p["batch_size"])
            for g in opt.param_groups:
                g["lr"] = _lr_at(p, epoch)
            chunks = _length_batches(order, np.diff(hist_fit.offsets), bs, rng)
            make = lambda c: _make_batch(c, hist_fit, codes, cross, rng, p_run,  # noqa: E731
                                         data.n_items, cpu)
            for batch in training_batches(chunks, make, depth, device):
                with autocast(device, amp):
                    loss = train_model(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if float(p["grad_clip"]) > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(p["grad_clip"]))
                opt.step()
                if ema_state is not None:  # warm-up: decay min(ema, (1 + step) / (10 + step))
                    # a warm start continues the previous model's average (no warm-up): with
                    # the warm-up, 2 warm epochs exported nearly raw, noisy weights (ML-100K
                    # rerun: NDCG@10 0.4475 -> 0.4191)
                    decay = ema if warm_info["used"] else \
                        min(ema, (1.0 + state["step"]) / (10.0 + state["step"]))
                    with torch.no_grad():  # one kernel per op for all tensors
                        torch._foreach_mul_(ema_list, decay)
                        torch._foreach_add_(ema_list, param_list, alpha=1.0 - decay)
                state["step"] = int(state["step"]) + 1
                losses.append(loss.detach())  # no host sync per step
            train_loss = float(np.mean(torch.stack(losses).double().cpu().numpy())) if losses \
                else float("nan")
            rec = {"epoch": epoch, "loss": train_loss}
            if is_main:
                if ema_state is not None:  # evaluate (and keep) the moving average of the weights
                    eval_model.load_state_dict(model.state_dict())
                    eval_model.load_state_dict(ema_state, strict=False)
                if has_val:
                    U = self._user_vectors(eval_model, hist_fit, codes, cross, device, amp)
                    V, b = _item_vectors(eval_model, device)
                    rec.update(_val_metrics(U, V, b, hist_fit, val_truth, int(p["eval_k"])))
                    metric = rec[f"recall@{int(p['eval_k'])}"]
                else:
                    metric = -train_loss
                if metric > float(state["best_metric"]) or best_state is None:
                    state.update(best_metric=float(metric), best_epoch=epoch, bad_epochs=0)
                    best_state = {k: v.detach().clone() for k, v in eval_model.state_dict().items()}
                else:
                    state["bad_epochs"] = int(state["bad_epochs"]) + 1
                elapsed = time.perf_counter() - t_start
                rec["seconds"] = round(elapsed, 2)
                state["history"].append(rec)
                stop = (epoch >= int(p["min_epochs"]) and int(p["patience"]) > 0
                        and int(state["bad_epochs"]) >= int(p["patience"]))
                box = float(p.get("_time_box", p["max_train_seconds"]))
                if box > 0 and elapsed >= box:
                    stop = True
                state["epoch"] = epoch
                state["done"] = bool(stop or epoch >= int(p["epochs"]))
                state["train_seconds"] = elapsed
                log.info("epoch %d loss %.4f %s", epoch, train_loss,
                         " ".join(f"{k} {v:.4f}" for k, v in rec.items() if "@" in k))
                if live is not None:
                    live.log_metric("train/loss", train_loss)
                    for k, v in rec.items():
                        if "@" in k:
                            live.log_metric(f"val/{k}", v)
                    live.next_step()
                if ckpt is not None:
                    ckpt.save(model, best_state, opt,
                              {**state, "numpy_rng": rng.bit_generator.state}, ema_state)
            if dist["world"] > 1:
                flag = torch.tensor([1.0 if state["done"] else 0.0, float(state["epoch"])], device=device)
                torch.distributed.broadcast(flag, 0)
                state["done"], state["epoch"] = bool(flag[0].item()), int(flag[1].item())
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        self.user_vecs_ = self._user_vectors(model, hist_all, codes, cross, device, amp)
        # the fit-rows-only variant (see _fit_variant): user vectors from the fit rows alone
        self._fit_user_vecs = (self._user_vectors(model, hist_fit, codes, cross, device, amp)
                               if len(val_df) else None)
        V, b = _item_vectors(model, device)
        self.item_vecs_ = np.concatenate([V, b[:, None]], 1).astype(np.float32)
        unk = np.zeros((1, codes.shape[1]), np.int64)
        self.prior_vec_ = self._user_vectors(model, _Histories.empty(1), unk,
                                             cross_codes(unk, arch["attr_hash_buckets"]), device, amp)[0]
        self.weights_ = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        self.train_info_ = {"epochs_run": int(state["epoch"]), "best_epoch": int(state["best_epoch"]),
                            f"best_val_recall@{int(p['eval_k'])}": float(state["best_metric"]),
                            "resumed_from_epoch": resumed_from, "history": state["history"],
                            "train_seconds": round(float(state["train_seconds"]), 2),
                            "device": str(device), "world_size": dist["world"],
                            "warm_start": warm_info}

    def _load_buffers(self, model, known: np.ndarray) -> None:
        torch = _torch()
        with torch.no_grad():
            model.known[1:] = torch.as_tensor(known)
            for m in model.modalities:
                emb, pres = self._features[m]
                getattr(model, f"feat_{m}")[1:] = torch.as_tensor(_normalise_features(emb, pres))
                getattr(model, f"present_{m}")[1:] = torch.as_tensor(pres.astype(np.float32))

    def _user_vectors(self, model, hist: "_Histories", codes, cross, device, amp,
                      batch_size: int = 256) -> np.ndarray:
        torch = _torch()
        L = int(model.a["max_len"]) - 1
        was = model.training
        model.eval()
        by_len = np.argsort(np.diff(hist.offsets), kind="stable")  # little padding per batch
        # the fused inference fast path is slower than the regular one on CPU (padding masks)
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(device.type == "cuda" and fast)
        try:
            out = self._encode_sorted(model, hist, by_len, codes, cross, device, amp, batch_size, L)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        model.train(was)
        U = np.zeros((len(hist), int(model.a.get("d_item") or model.a["d_model"])), np.float32)
        if out:
            U[by_len] = np.concatenate(out)
        return np.concatenate([U, np.ones((len(U), 1), np.float32)], 1).astype(np.float32)

    @staticmethod
    def _encode_sorted(model, hist, by_len, codes, cross, device, amp, batch_size, L) -> list:
        torch = _torch()
        from ..features import autocast

        out = []
        with torch.no_grad():
            for s in range(0, len(hist), batch_size):
                idx = by_len[s:s + batch_size]
                seqs = [tuple(x[-L:] for x in hist.get(int(u))) for u in idx]
                tok, gap, rat = _pad_sequences(seqs, L)
                t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
                with autocast(device, amp):
                    V, _ = model.item_table(side="in")
                    V_tok = torch.cat([torch.zeros_like(V[:1]), V])[t(tok)]
                    h, pad = model.encode(t(tok), t(gap), t(rat), t(codes[idx]), t(cross[idx]), V_tok,
                                          causal=bool(model.a.get("causal", False)))
                    z = model.pool(h, pad, model.a["pool"])
                out.append(z.float().cpu().numpy())
        return out

    # ---- scoring ------------------------------------------------------
    def score_users(self, uidx: np.ndarray) -> np.ndarray:
        """Scores ``[u] . [v]``; with a cold member, users with at most ``cold_user_max``
        training rows (and unknown users) are scored by it, the others by the main members."""
        uidx = np.asarray(uidx, np.int64)
        U = np.where((uidx >= 0)[:, None], self.user_vecs_[np.maximum(uidx, 0)], self.prior_vec_[None])
        if self.params.get("_cold_members"):
            n = np.diff(self._seen.indptr)[np.maximum(uidx, 0)]
            U = self._route(U, (uidx < 0) | (n <= int(self.params["cold_user_max"])))
        return (U @ self.item_vecs_.T).astype(np.float32)

    def _state(self) -> dict[str, np.ndarray]:
        out = {f"w.{k}": v for k, v in self.weights_.items()}
        for j, w in enumerate(self.member_weights_, start=1):
            out.update({f"m{j}.{k}": v for k, v in w.items()})
        out.update(item_vecs=self.item_vecs_, user_vecs=self.user_vecs_, prior_vec=self.prior_vec_)
        return out

    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        iv, uv, pv = arrays["item_vecs"], arrays["user_vecs"], arrays["prior_vec"]
        nu, ni = len(self.user_ids), len(self.item_ids)
        d = iv.shape[1] if iv.ndim == 2 else -1
        if iv.shape != (ni, d) or uv.shape != (nu, d) or pv.shape != (d,):
            raise ValueError(f"arrays item_vecs {iv.shape}, user_vecs {uv.shape}, prior_vec {pv.shape} "
                             f"do not fit {ni} items x {nu} users")
        weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w.")}
        if not weights:
            raise ValueError("no module weights ('w.*' arrays)")
        members, j = [], 1
        while any(k.startswith(f"m{j}.") for k in arrays):
            members.append({k[len(f"m{j}."):]: v for k, v in arrays.items() if k.startswith(f"m{j}.")})
            j += 1
        if d != self._member_dim() * (1 + len(members)):
            raise ValueError(f"arrays: vectors of size {d} do not fit {1 + len(members)} member(s) "
                             f"of size {self._member_dim()}")
        self.item_vecs_, self.user_vecs_, self.prior_vec_, self.weights_ = iv, uv, pv, weights
        self.member_weights_ = members

    def _member_dim(self) -> int:
        """Size of one ensemble member's vectors: ``d_item`` (or ``d_model``) + the bias / 1."""
        a = self.params["_arch"]
        return int(a.get("d_item") or a["d_model"]) + 1

    def _n_main(self) -> int:
        """Number of main members (the exported model, then the phase-1 model of a refit)."""
        return 1 + len(self.member_weights_) - int(self.params.get("_cold_members", 0))

    def _member_arch(self, j: int) -> dict:
        return self.params["_arch"] if j < self._n_main() else self.params["_cold_arch"]

    def _members_view(self, first: int, stop: int) -> "EncoderRecommender":
        """A model of members ``first .. stop - 1`` alone (vectors and weights), no routing."""
        d = self._member_dim()
        weights = [self.weights_, *self.member_weights_][first:stop]
        m = copy.copy(self)
        m.user_vecs_, m.item_vecs_ = self.user_vecs_[:, first * d:stop * d], \
            self.item_vecs_[:, first * d:stop * d]
        m.prior_vec_ = self.prior_vec_[first * d:stop * d]
        m.weights_, m.member_weights_ = weights[0], list(weights[1:])
        m.params = {k: v for k, v in self.params.items() if k not in ("_cold_members", "_cold_arch")}
        m.params["_arch"] = self._member_arch(first)
        return m

    def cold_view(self) -> "EncoderRecommender | None":
        """The cold member(s) of this model as a model of their own (a warm start for the next
        run's cold member), or None without one."""
        if not self.params.get("_cold_members"):
            return None
        return self._members_view(self._n_main(), 1 + len(self.member_weights_))

    def first_member(self) -> "EncoderRecommender":
        """This model with only its first ensemble member (the exported, refit model); itself
        when it has no other member."""
        return self._members_view(0, 1) if self.member_weights_ else self

    def behaviour_vectors(self) -> np.ndarray:
        """Each user's vector from the exported (first) member, without the constant column:
        the behaviour embedding of the user's profile."""
        return np.asarray(self.user_vecs_[:, :self._member_dim() - 1], np.float32)

    def torch_module(self, member: int = 0):
        """Rebuild a trained torch module from the saved weights (CPU, eval mode); ``member``
        1.. picks a further ensemble member (the phase-1 model of a refit run)."""
        torch = _torch()
        model = build_module(self._member_arch(member))
        weights = self.weights_ if member == 0 else self.member_weights_[member - 1]
        state = {k: torch.as_tensor(v) for k, v in weights.items()}
        if model.cross_emb is not None and "cross_keep" not in state:  # saved before cross_keep
            state["cross_keep"] = torch.ones_like(model.cross_keep)
        model.load_state_dict(state)
        return model.eval()

    def encode_users(self, histories: list[list[str]], users: pd.DataFrame | None = None,
                     user_ids=None) -> np.ndarray:
        """User vectors ``[u, 1]`` for new histories (lists of item ids, time order).

        ``users``/``user_ids`` give their attributes (unknown when omitted).
        """
        torch = _torch()
        item_index = pd.Index(self.item_ids)
        rows = []
        for h in histories:
            ix = item_index.get_indexer(np.asarray(h, dtype=object).astype(str))
            rows.append(ix[ix >= 0])
        n = len(rows)
        offsets = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
        items = np.concatenate(rows).astype(np.int64) if n else np.zeros(0, np.int64)
        ones = np.ones(len(items), np.int64)
        hist = _Histories(items, np.zeros(len(items), np.int64), ones * (N_RATING_BUCKETS - 1), offsets)
        ids = user_ids if user_ids is not None else [f"__new{i}" for i in range(n)]
        parts = []
        for j in range(1 + len(self.member_weights_)):
            a = self._member_arch(j)
            codes = attribute_codes(users, ids, a["attr_spec"])
            parts.append(self._user_vectors(self.torch_module(j), hist, codes,
                                            cross_codes(codes, a["attr_hash_buckets"]),
                                            torch.device("cpu"), None))
        cold = np.diff(offsets) <= int(self.params["cold_user_max"])
        return self._route(np.hstack(parts), cold)


# ---------------------------------------------------------------------------- warm start

_WARM_ARCH_KEYS = ("d_model", "n_layers", "n_heads", "d_item", "head_mlp", "ff_mult", "max_len",
                   "modalities", "modality_dims", "use_time", "use_rating", "attr_hash_buckets",
                   "pool", "causal", "bag", "tie")
_ITEM_TABLES = ("item_emb.weight", "id_bias.weight", "in_item_emb.weight")


def _item_set_digest(m, item_ids) -> np.ndarray:
    """[n_rows] uint64: order-free hash (wrapping sum) of the item ids in each CSR row."""
    h = pd.util.hash_array(np.asarray(item_ids, dtype=object).astype(str)).astype(np.uint64)
    out = np.zeros(m.shape[0], np.uint64)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    np.add.at(out, rows, h[m.indices])
    return out


def changed_users(previous: "EncoderRecommender", data: Interactions) -> np.ndarray:
    """[n_users] bool: users of ``data`` that are new or whose set of interacted items changed
    since ``previous`` was trained (its saved seen-items matrix): a different count, or the same
    count with other items (a row replaced or re-keyed)."""
    m = data.matrix()
    now_n, now_h = np.diff(m.indptr), _item_set_digest(m, data.item_ids)
    before_n = np.zeros(len(now_n), np.int64)
    before_h = np.zeros(len(now_n), np.uint64)
    seen = getattr(previous, "_seen", None)
    if seen is not None and previous.user_ids is not None and previous.item_ids is not None:
        pos = pd.Index(np.asarray(previous.user_ids, dtype=object).astype(str)).get_indexer(
            np.asarray(data.user_ids, dtype=object).astype(str))
        hit = pos >= 0
        before_n[hit] = np.diff(seen.indptr)[pos[hit]]
        before_h[hit] = _item_set_digest(seen, previous.item_ids)[pos[hit]]
    return (now_n != before_n) | (now_h != before_h)


def warm_incompatibility(previous: "EncoderRecommender", arch: dict) -> str | None:
    """Why ``previous`` cannot initialise a model of ``arch`` (None: it can)."""
    old = (previous.params or {}).get("_arch")
    if not old or not previous.weights_ or previous.item_ids is None:
        return "previous model has no saved weights"
    diff = [k for k in _WARM_ARCH_KEYS if old.get(k) != arch.get(k)]
    if diff:
        return "architecture differs in " + ", ".join(f"{k} ({old.get(k)} -> {arch.get(k)})"
                                                      for k in diff)
    return None


def warm_load(model, previous: "EncoderRecommender", item_ids, arch: dict) -> dict:
    """Copy ``previous``'s weights into ``model`` (item rows aligned by id). Returns counts."""
    torch = _torch()
    pos = pd.Index(np.asarray(previous.item_ids, dtype=object).astype(str)).get_indexer(
        np.asarray(item_ids, dtype=object).astype(str))
    hit = pos >= 0
    new_rows = torch.as_tensor(np.nonzero(hit)[0] + 1)  # row 0 = padding
    old_rows = torch.as_tensor(pos[hit] + 1)
    old_spec = previous.params["_arch"].get("attr_spec", [])
    spec = arch.get("attr_spec", [])
    copied, skipped = 0, []
    with torch.no_grad():
        for k, t in model.state_dict().items():  # tensors share storage with the model
            if k in ("known", "cross_keep") or k.startswith(("feat_", "present_")):
                continue  # buffers from this run's data and features
            if k not in previous.weights_:
                skipped.append(k)
                continue
            old = torch.as_tensor(previous.weights_[k])
            if k in _ITEM_TABLES:
                t[new_rows] = old[old_rows].to(t.dtype)
            elif k.startswith("attr_emb."):
                j = int(k.split(".")[1])
                o = old_spec[j] if j < len(old_spec) else None
                if o == spec[j] and old.shape == t.shape:
                    t.copy_(old)
                elif o and o["name"] == spec[j]["name"] and o["kind"] == spec[j]["kind"] == "cat":
                    # a grown vocabulary: rows aligned by value (row 0 = unknown)
                    vpos = pd.Index(o["vocab"]).get_indexer(spec[j]["vocab"])
                    vhit = np.nonzero(vpos >= 0)[0]
                    t[0] = old[0].to(t.dtype)
                    t[torch.as_tensor(vhit + 1)] = old[torch.as_tensor(vpos[vhit] + 1)].to(t.dtype)
                else:
                    skipped.append(k)
                    continue
            elif k.startswith("cross_emb.") and old_spec != spec:
                skipped.append(k)
                continue
            elif tuple(old.shape) == tuple(t.shape):
                t.copy_(old)
            else:
                skipped.append(k)
                continue
            copied += 1
    return {"items_reused": int(hit.sum()), "new_items": int((~hit).sum()),
            "tensors_copied": copied, "tensors_skipped": skipped}


def _item_vectors(model, device) -> tuple[np.ndarray, np.ndarray]:
    torch = _torch()
    was = model.training
    model.eval()
    with torch.no_grad():
        V, b = model.item_table()
    model.train(was)
    return V.float().cpu().numpy(), b.float().cpu().numpy()


def _truth_keys(val_df: pd.DataFrame, n_items: int) -> np.ndarray:
    if len(val_df) == 0:
        return np.zeros(0, np.int64)
    return np.unique(val_df["uidx"].to_numpy(np.int64) * n_items + val_df["iidx"].to_numpy(np.int64))


def _val_metrics(U: np.ndarray, V: np.ndarray, b: np.ndarray, hist_fit: _Histories,
                 truth_keys: np.ndarray, k: int, batch_users: int = 2048) -> dict[str, float]:
    """Recall@k and NDCG@k on the val fold (fit items excluded), vectorised over user batches
    (memory: ``batch_users x n_items`` scores, whatever the number of users)."""
    n_items = len(V)
    users = np.unique(truth_keys // n_items)
    k = min(k, n_items)
    top = np.empty((len(users), k), np.int64)
    for s in range(0, len(users), batch_users):
        bu = users[s:s + batch_users]
        scores = U[bu, :-1] @ V.T + b[None]
        starts = hist_fit.offsets[bu]
        lens = hist_fit.offsets[bu + 1] - starts
        within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        scores[np.repeat(np.arange(len(bu)), lens), hist_fit.items[np.repeat(starts, lens) + within]] = -np.inf
        top[s:s + len(bu)] = topk(scores, k)
    hits = np.isin(users[:, None] * n_items + top, truth_keys)
    n_true = np.bincount(np.searchsorted(users, truth_keys // n_items), minlength=len(users))
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    idcg = np.cumsum(disc)[np.minimum(n_true, k) - 1]
    return {f"recall@{k}": float(np.mean(hits.sum(1) / n_true)),
            f"ndcg@{k}": float(np.mean((hits * disc).sum(1) / idcg))}


def _seconds_trained(info: dict) -> float:
    """Training seconds of both phases (first + refit) recorded in a ``train_info_``."""
    return float(info.get("train_seconds", 0.0)) + float(info.get("refit", {}).get(
        "train_seconds", 0.0))


def refit_epochs(history: list[dict], key: str, tolerance: float, best_epoch: int) -> int:
    """Epochs for the refit: the last epoch whose val ``key`` is within ``tolerance``
    (relative) of the best one.

    Validation curves are flat near their peak (ML-100K, 1 layer: recall@20 0.2866 at
    epoch 5, 0.2856 at epoch 10); the refit has more data, so among epochs that validate
    alike it takes the longest run.  ``tolerance: 0`` gives the last epoch that ties the best.
    """
    vals = [(int(r["epoch"]), float(r[key])) for r in history if key in r]
    if not vals:
        return max(1, int(best_epoch))
    best = max(v for _, v in vals)
    return max(1, max(e for e, v in vals if v >= best * (1.0 - float(tolerance))))


def _lr_at(p: dict, epoch: int) -> float:
    """Learning rate of ``epoch`` (1-based): warm-up, then constant or cosine decay."""
    lr, warm, total = float(p["lr"]), int(p["warmup_epochs"]), max(int(p["epochs"]), 1)
    if warm > 0 and epoch <= warm:
        return lr * epoch / (warm + 1)
    if p["lr_schedule"] == "cosine":
        t = min(max(epoch - 1 - warm, 0) / max(total - 1 - warm, 1), 1.0)
        lo = lr * float(p["lr_min_ratio"])
        return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * t))
    if p["lr_schedule"] != "constant":
        raise ValueError(f"unknown lr_schedule '{p['lr_schedule']}' (constant | cosine)")
    return lr


def _dist_info() -> dict[str, int]:
    return {"world": int(os.environ.get("WORLD_SIZE", "1")), "rank": int(os.environ.get("RANK", "0")),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}


__all__ = ["EncoderRecommender", "DEFAULTS", "load_modality", "attribute_spec", "attribute_codes",
           "build_module", "Checkpointer", "warm_incompatibility", "warm_load", "changed_users"]
