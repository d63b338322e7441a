"""Item feature tables shared by the preprocess_text / _image / _video stages.

The contract every consumer reads (one directory per modality)::

    features.parquet  item_id (str), present (bool), reason (str, null when
                      present), embedding (list<float32>, fixed dim, all zeros
                      when missing: consumers MUST use ``present``),
                      content_hash (str), model_id (str), + modality metadata
    meta.json         dim, model_id, n_items, n_present, n_missing,
                      missing_reasons {reason: count}, n_encoded_this_run,
                      n_reused_from_cache, seconds, ...

Every item of the catalogue has exactly one row.  Use :func:`read_features`
to read a table back as arrays.

This module also holds the content-hash cache (outputs persist between DVC
runs, so a stage re-encodes only rows whose content hash or model changed),
device selection and thread settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("mmrec.features")

FEATURES_FILE = "features.parquet"
META_FILE = "meta.json"
BASE_COLUMNS = ("item_id", "present", "reason", "embedding", "content_hash", "model_id")


# --------------------------------------------------------------------------- hashing

def _canonical(params: dict[str, Any] | None) -> bytes:
    return json.dumps(params or {}, sort_keys=True, separators=(",", ":"), default=str).encode()


def content_hash(data: bytes | str, params: dict[str, Any] | None = None) -> str:
    """sha256 of ``data`` plus the preprocessing params that shape its embedding."""
    h = hashlib.sha256()
    h.update(data.encode("utf-8") if isinstance(data, str) else data)
    h.update(b"\x00params:")
    h.update(_canonical(params))
    return h.hexdigest()


def file_hash(path: str | os.PathLike, params: dict[str, Any] | None = None,
              chunk: int = 1 << 20) -> str:
    """Like :func:`content_hash` over a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    h.update(b"\x00params:")
    h.update(_canonical(params))
    return h.hexdigest()


# --------------------------------------------------------------------------- table I/O

def build_table(item_ids: Iterable[str], embeddings: np.ndarray, present: np.ndarray,
                reasons: list[str | None], hashes: list[str], model_id: str,
                extra: dict[str, Any] | None = None) -> pd.DataFrame:
    """Assemble a feature table (validated: one row per item, zeros where missing)."""
    item_ids = np.asarray([str(i) for i in item_ids], dtype=object)
    emb = np.asarray(embeddings, dtype=np.float32)
    present = np.asarray(present, dtype=bool)
    n = len(item_ids)
    if emb.ndim != 2 or emb.shape[0] != n or present.shape != (n,) or len(reasons) != n \
            or len(hashes) != n:
        raise ValueError(f"feature table: inconsistent lengths (items {n}, embeddings {emb.shape}, "
                         f"present {present.shape}, reasons {len(reasons)}, hashes {len(hashes)})")
    if len(set(item_ids.tolist())) != n:
        raise ValueError("feature table: duplicate item_id")
    reasons = [None if p else (r or "unknown") for p, r in zip(present, reasons)]
    emb = emb.copy()
    emb[~present] = 0.0
    if not np.isfinite(emb).all():
        bad = item_ids[~np.isfinite(emb).all(axis=1)].tolist()
        raise ValueError(f"feature table: non-finite embedding for items {bad[:5]}")
    df = pd.DataFrame({
        "item_id": item_ids,
        "present": present,
        "reason": pd.array(reasons, dtype="string"),
        "embedding": list(emb),
        "content_hash": pd.array([h or "" for h in hashes], dtype="string"),
        "model_id": pd.array([model_id] * n, dtype="string"),
    })
    for col, values in (extra or {}).items():
        df[col] = values
    return df


def _arrow_table(df: pd.DataFrame, dim: int) -> pa.Table:
    cols = {}
    for col in df.columns:
        if col == "embedding":
            flat = np.ascontiguousarray(np.stack(df[col].to_numpy()) if len(df) else
                                        np.zeros((0, dim), np.float32), dtype=np.float32)
            offsets = np.arange(0, (len(df) + 1) * dim, dim, dtype=np.int32)
            cols[col] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))
        elif col == "item_id":
            cols[col] = pa.array(df[col].astype(str).tolist(), type=pa.string())
        else:
            cols[col] = pa.Array.from_pandas(df[col])
    return pa.table(cols)


def write_features(dir_path: str | os.PathLike, table: pd.DataFrame, meta: dict[str, Any]) -> None:
    """Write ``features.parquet`` + ``meta.json`` into an (already temporary) directory.

    Callers build the whole new directory inside ``pipelines.io.atomic_path(out,
    is_dir=True)`` so that readers never see a half-written table.
    """
    d = Path(dir_path)
    d.mkdir(parents=True, exist_ok=True)
    dim = int(meta["dim"])
    pq.write_table(_arrow_table(table, dim), d / FEATURES_FILE)
    (d / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default)
                               + "\n", encoding="utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def embeddings_of(table: pd.DataFrame) -> np.ndarray:
    """The ``embedding`` column as a float32 [n, d] array."""
    if len(table) == 0:
        return np.zeros((0, 0), np.float32)
    return np.stack([np.asarray(v, dtype=np.float32) for v in table["embedding"].to_numpy()])


def read_table(dir_path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_parquet(Path(dir_path) / FEATURES_FILE)


def read_features(dir_path: str | os.PathLike
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Read one modality's features.

    Returns ``(item_ids, emb, present, table)``: ``item_ids`` a str array [n],
    ``emb`` float32 [n, d] (zeros where missing), ``present`` bool [n] and the
    whole table (metadata columns included).
    """
    d = Path(dir_path)
    table = read_table(d)
    item_ids = table["item_id"].astype(str).to_numpy(dtype=object)
    col = pq.read_table(d / FEATURES_FILE, columns=["embedding"]).column("embedding")
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(table)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if n:
        lengths = np.diff(col.offsets.to_numpy())
        if (lengths != lengths[0]).any():
            raise ValueError(f"{d / FEATURES_FILE}: embedding lengths differ between rows")
        emb = values.reshape(n, int(lengths[0]))
    else:
        dim = 0
        meta_path = d / META_FILE
        if meta_path.exists():
            dim = int(json.loads(meta_path.read_text(encoding="utf-8")).get("dim", 0))
        emb = np.zeros((0, dim), np.float32)
    present = table["present"].to_numpy(dtype=bool)
    return item_ids, np.ascontiguousarray(emb), present, table


def read_meta(dir_path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(dir_path) / META_FILE).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- cache

class FeatureCache:
    """Previous run's present rows, keyed by (content_hash, model_id).

    Reading the previous table is best effort: an absent, unreadable or
    differently shaped table only means "nothing to reuse".
    """

    def __init__(self, rows: dict[tuple[str, str], dict[str, Any]] | None = None,
                 dim: int | None = None):
        self.rows = rows or {}
        self.dim = dim

    @classmethod
    def load(cls, out_dir: str | os.PathLike | None, enabled: bool = True) -> FeatureCache:
        if not enabled or out_dir is None:
            return cls()
        path = Path(out_dir) / FEATURES_FILE
        if not path.is_file():
            return cls()
        try:
            _ids, emb, present, table = read_features(out_dir)
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            log.warning("cache: ignoring unreadable previous table %s (%s)", path, exc)
            return cls()
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        meta_cols = [c for c in table.columns if c not in BASE_COLUMNS]
        for i in np.nonzero(present)[0]:
            h, m = table["content_hash"].iat[i], table["model_id"].iat[i]
            if pd.isna(h) or not h or pd.isna(m):
                continue
            rec = {c: table[c].iat[i] for c in meta_cols}
            rec["embedding"] = emb[i]
            rows[(str(h), str(m))] = rec
        return cls(rows, emb.shape[1] if emb.ndim == 2 else None)

    def get(self, chash: str | None, model_id: str, dim: int | None = None) -> dict[str, Any] | None:
        if not chash:
            return None
        rec = self.rows.get((chash, model_id))
        if rec is None:
            return None
        if dim is not None and rec["embedding"].shape[0] != dim:
            return None
        return rec

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------- meta

def summarise(table: pd.DataFrame, *, dim: int, model_id: str, n_encoded: int, n_reused: int,
              seconds: float, **extra: Any) -> dict[str, Any]:
    present = table["present"].to_numpy(dtype=bool)
    reasons = Counter(str(r) for r in table.loc[~present, "reason"].tolist())
    meta = {
        "dim": int(dim),
        "model_id": model_id,
        "n_items": len(table),
        "n_present": int(present.sum()),
        "n_missing": int((~present).sum()),
        "missing_reasons": dict(sorted(reasons.items())),
        "n_encoded_this_run": int(n_encoded),
        "n_reused_from_cache": int(n_reused),
        "seconds": round(float(seconds), 3),
    }
    meta.update(extra)
    return meta


# --------------------------------------------------------------------------- runtime

def select_device(pref: str = "auto"):
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    import torch

    pref = (pref or "auto").lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{pref}' requested but CUDA is not available")
        return torch.device(pref)
    raise ValueError(f"unknown device '{pref}' (expected auto, cpu or cuda)")


def autocast_dtype(device, precision: str = "auto"):
    """The autocast dtype to use on ``device`` (None = plain fp32)."""
    import torch

    precision = (precision or "auto").lower()
    if precision == "fp32" or device.type != "cuda":
        if precision in ("bf16", "fp16") and device.type != "cuda":
            log.info("precision %s ignored on %s (fp32)", precision, device)
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision '{precision}' (auto, fp32, bf16, fp16)")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device, dtype) -> Iterator[None]:
    import torch

    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def prepare_cpu_runtime() -> None:
    """Process-level CPU inference settings; call first thing in a stage ``main``.

    * idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``
      unless already set; only effective before torch is imported).  On a CPU
      shared with other jobs, spinning made 2-thread inference 3-5x slower than
      1 thread.
    * glibc malloc keeps freed activation buffers (mmap threshold 32 MiB, trim
      threshold 256 MiB) instead of returning them to the OS after every layer:
      measured on 500 posters, system time 6.2 s -> 2.4-3.7 s, wall -20-30 %.
      Same effect as ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``; a no-op
      where the C library has no ``mallopt``.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return  # the user tuned malloc already
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 256 * 1024 * 1024)


def set_threads(n: int | None) -> int:
    """torch intra-op threads: ``n`` or all cores visible to this process."""
    import torch

    if not n:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:
            n = os.cpu_count() or 1
    n = max(1, int(n))
    torch.set_num_threads(n)
    return n


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True):
    """tqdm progress bar on stderr (a no-op wrapper when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=not enabled,
                mininterval=2.0, unit="item", dynamic_ncols=True)


def media_cells(items: pd.DataFrame, col: str, reasons: list, *, desc: str,
                show_progress: bool = True):
    """Yield ``(row, relative path)`` for each item whose ``col`` names a media file.

    Items with an empty cell get the reason ``no-<col>`` in ``reasons`` (one slot per row of
    ``items``); without the column every item gets ``no-<col>-column`` and nothing is yielded.
    """
    if col not in items.columns:
        reasons[:] = [f"no-{col}-column"] * len(items)
        log.info("items table has no '%s' column: every item is missing", col)
        return
    cells = items[col].tolist()
    for i in progress(range(len(cells)), desc=desc, enabled=show_progress):
        rel = cell_str(cells[i]).strip()
        if not rel:
            reasons[i] = f"no-{col}"
            continue
        yield i, rel


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def load_items(data_dir: str | os.PathLike) -> pd.DataFrame:
    """The validated items table (``items.parquet``, or ``items.csv``), item_id as str."""
    from .schema import ITEM, table_path
    from .schema import read_table as read_contract_table

    p = table_path(data_dir, "items")
    if p is None:
        raise FileNotFoundError(f"{data_dir}: no items.parquet or items.csv")
    items = read_contract_table(p)
    if ITEM not in items.columns:
        raise ValueError(f"{p}: no column '{ITEM}'")
    items = items.copy()
    items[ITEM] = items[ITEM].astype(str)
    if items[ITEM].duplicated().any():
        dup = items.loc[items[ITEM].duplicated(), ITEM].tolist()[:5]
        raise ValueError(f"{p}: duplicate item_id {dup}")
    return items.reset_index(drop=True)


def cell_str(value) -> str:
    """A table cell as text ('' for null / NaN)."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float) and np.isnan(value):
        return ""
    return str(value)


def cell_float(value) -> float:
    """A possibly-null numeric cell as float (NaN for null)."""
    s = cell_str(value)
    return float(s) if s else float("nan")


def nullable_ints(values: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """Float values (NaN = unknown) as a nullable ``Int32`` column."""
    return pd.array([None if np.isnan(v) else int(v) for v in values], dtype="Int32")


def stack_vectors(n: int, dim: int, vectors: dict[int, np.ndarray]) -> np.ndarray:
    """``[n, dim]`` float32 embeddings: row ``i`` = ``vectors[i]``, zeros where absent."""
    emb = np.zeros((n, dim), np.float32)
    for i, v in vectors.items():
        emb[i] = v
    return emb
