"""The one recommender interface: ``fit / recommend / save / load``.

Every model (popularity, kNN, EASE, ALS/BPR, the sequence encoder, the hybrid)
subclasses :class:`Recommender`.  Subclasses implement ``fit``,
``score_users`` (dense scores for a batch of user indices over the whole
catalogue) and ``_save_state``/``_load_state``; the base class provides
batched top-K with seen-item exclusion, and safe persistence: arrays in
safetensors/npz, config in JSON; never pickle.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..data import Interactions
from ..io import atomic_path

REGISTRY: dict[str, type["Recommender"]] = {}
# models whose module is imported only when a saved one is loaded (torch is slow to import)
LAZY_MODULES = {"encoder": "pipelines.recommenders.encoder"}


class Recommender(ABC):
    """Base class. ``name`` is the key used in metrics and the registry."""

    name: ClassVar[str] = "base"
    batch_size: int = 1024

    def __init__(self, **params: Any):
        self.params = dict(params)
        self.user_ids: np.ndarray | None = None
        self.item_ids: np.ndarray | None = None
        self._seen: sp.csr_matrix | None = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name != "base":
            REGISTRY[cls.name] = cls

    # ---- to implement -------------------------------------------------
    @abstractmethod
    def _fit(self, data: Interactions) -> None: ...

    @abstractmethod
    def score_users(self, uidx: np.ndarray) -> np.ndarray:
        """Float32 scores [len(uidx), n_items]; -inf where the model cannot score."""

    @abstractmethod
    def _state(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _set_state(self, arrays: dict[str, np.ndarray]) -> None: ...

    # ---- provided -----------------------------------------------------
    def fit(self, data: Interactions) -> "Recommender":
        self.user_ids = np.asarray(data.user_ids, dtype=object)
        self.item_ids = np.asarray(data.item_ids, dtype=object)
        self._seen = data.matrix()
        self._fit(data)
        return self

    def recommend(self, user_ids, k: int = 10, exclude_seen: bool = True,
                  return_scores: bool = False):
        """Top-``k`` external item ids per external user id.

        Unknown users get the model's scores for an empty history (row of
        zeros), which most models turn into popularity or -inf.  Returns an
        object array [n_users, k] (None where fewer than k items can be
        scored) and, optionally, the float32 scores.
        """
        uidx = self.user_index(user_ids)
        idx, scores = self.recommend_idx(uidx, k, exclude_seen)
        items = np.full(idx.shape, None, dtype=object)
        ok = idx >= 0
        items[ok] = self.item_ids[idx[ok]]
        return (items, scores) if return_scores else items

    def user_index(self, user_ids) -> np.ndarray:
        import pandas as pd

        return pd.Index(self.user_ids).get_indexer(np.asarray(user_ids, dtype=object).astype(str))

    def recommend_idx(self, uidx: np.ndarray, k: int, exclude_seen: bool = True):
        """Top-k item indices [n, k] (-1 padded) and scores for user indices (-1 = unknown)."""
        uidx = np.asarray(uidx, dtype=np.int64)
        n_items = len(self.item_ids)
        k_eff = min(k, n_items)
        out_idx = np.full((len(uidx), k), -1, dtype=np.int64)
        out_sc = np.full((len(uidx), k), -np.inf, dtype=np.float32)
        for start in range(0, len(uidx), self.batch_size):
            batch = uidx[start:start + self.batch_size]
            scores = np.asarray(self.score_users(batch), dtype=np.float32).copy()
            if exclude_seen and self._seen is not None:
                known = batch >= 0
                seen = self._seen[batch[known]]
                rows = np.repeat(np.nonzero(known)[0], np.diff(seen.indptr))
                scores[rows, seen.indices] = -np.inf
            top = topk(scores, k_eff)
            top_sc = np.take_along_axis(scores, top, axis=1)
            top = np.where(np.isfinite(top_sc), top, -1)
            out_idx[start:start + len(batch), :k_eff] = top
            out_sc[start:start + len(batch), :k_eff] = top_sc
        return out_idx, out_sc

    def save(self, path: str | Path) -> None:
        """Write ``path/`` = config.json + arrays.safetensors (+ seen.npz), atomically."""
        with atomic_path(path, is_dir=True) as tmp:
            meta = {"model": self.name, "params": self.params,
                    "user_ids": [str(u) for u in self.user_ids],
                    "item_ids": [str(i) for i in self.item_ids]}
            (tmp / "config.json").write_text(json.dumps(meta), encoding="utf-8")
            arrays = {k: np.ascontiguousarray(v) for k, v in self._state().items()}
            save_file(arrays, str(tmp / "arrays.safetensors"))
            sp.save_npz(tmp / "seen.npz", self._seen.tocsr(), compressed=True)

    @classmethod
    def load(cls, path: str | Path) -> "Recommender":
        """Load a model saved by :meth:`save`; never unpickles anything.

        Every file is checked (config structure and types, ``seen.npz`` a valid CSR
        matrix of shape users x items, arrays consistent with the ids); any problem,
        tampering included, raises ``ValueError`` naming the file.
        """
        path = Path(path)
        current = path / "config.json"
        try:
            meta = json.loads(current.read_text(encoding="utf-8"))
            _check_config(meta)
            if meta["model"] in LAZY_MODULES and meta["model"] not in REGISTRY:
                import importlib

                importlib.import_module(LAZY_MODULES[meta["model"]])
            if meta["model"] not in REGISTRY:
                raise ValueError(f"unknown model '{meta['model']}' (known: {sorted(REGISTRY)})")
            model_cls = REGISTRY[meta["model"]] if cls is Recommender else cls
            if meta["model"] != model_cls.name:
                raise ValueError(f"saved model is '{meta['model']}', not '{model_cls.name}'")
            obj = model_cls(**meta["params"])
            obj.user_ids = np.asarray(meta["user_ids"], dtype=object)
            obj.item_ids = np.asarray(meta["item_ids"], dtype=object)
            current = path / "seen.npz"
            obj._seen = _load_seen(current, (len(obj.user_ids), len(obj.item_ids)), path / "config.json")
            current = path / "arrays.safetensors"
            obj._set_state(load_file(str(current)))
        except (OSError, KeyError, ValueError, TypeError, IndexError, EOFError, zlib.error,
                SafetensorError, zipfile.BadZipFile) as exc:  # json/Unicode errors are ValueErrors
            raise ValueError(f"cannot load model from {current}: {type(exc).__name__}: {exc}") from exc
        return obj


def _check_config(meta) -> None:
    """Types of a saved config.json (a tampered one must not reach the constructors)."""
    if not isinstance(meta, dict):
        raise TypeError(f"expected a JSON object, found {type(meta).__name__}")
    missing = [k for k in ("model", "params", "user_ids", "item_ids") if k not in meta]
    if missing:
        raise KeyError(f"missing key(s) {missing}")
    if not isinstance(meta["model"], str):
        raise TypeError("'model' must be a string")
    if not isinstance(meta["params"], dict):
        raise TypeError("'params' must be an object")
    for key in ("user_ids", "item_ids"):
        ids = meta[key]
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise TypeError(f"'{key}' must be a list of strings")
        if len(set(ids)) != len(ids):
            raise ValueError(f"'{key}' has duplicates")


def _load_seen(path: Path, shape: tuple[int, int], config: Path) -> sp.csr_matrix:
    """``seen.npz``: a CSR matrix users x items (``allow_pickle=False`` inside scipy)."""
    seen = sp.load_npz(path)
    if not sp.issparse(seen):
        raise ValueError("not a sparse matrix")
    seen = seen.tocsr()
    if seen.shape != shape:
        raise ValueError(f"shape {seen.shape} does not match {config} ({shape[0]} user_ids x "
                         f"{shape[1]} item_ids)")
    seen.check_format(full_check=True)  # index ranges, monotonic indptr
    return seen


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, sorted descending; equal scores by ascending index.

    The result depends on the values alone, not on the machine: NumPy's partition and sort
    kernels differ between CPUs (its AVX-512 ones order equal keys differently from the
    AVX2 ones), so ties are settled here explicitly.  NaN ranks below every number.
    """
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"topk expects a 2-d array, got shape {s.shape}")
    B, n = s.shape
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros((B, 0), dtype=np.int64)
    if s.dtype.kind == "f" and np.isnan(s).any():
        s = np.where(np.isnan(s), -np.inf, s)
    if k == n:
        part = np.broadcast_to(np.arange(n, dtype=np.int64), (B, n))
    else:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k].astype(np.int64, copy=False)
        kth = np.take_along_axis(s, part, axis=1).min(axis=1)
        # rows where more than k items reach the k-th value: the partition chose among equals
        # in a machine-dependent way; keep the smallest indices among them
        amb = np.nonzero((s >= kth[:, None]).sum(axis=1) > k)[0]
        if amb.size:
            sa, ka = s[amb], kth[amb][:, None]
            ra, ca = np.nonzero(sa > ka)
            rt, ct = np.nonzero(sa == ka)  # row-major: each row's equals by ascending index
            need = k - np.bincount(ra, minlength=len(amb))
            nth = np.arange(len(rt)) - np.searchsorted(rt, rt)  # position among the row's equals
            keep = nth < need[rt]
            rows = np.concatenate([ra, rt[keep]])
            cols = np.concatenate([ca, ct[keep]])
            order = np.lexsort((cols, rows))
            part = part.copy()
            part[amb] = cols[order].reshape(len(amb), k)
    vals = np.take_along_axis(s, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)  # score descending, then index ascending
    return np.take_along_axis(part, order, axis=1)
