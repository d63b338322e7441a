"""The data contract: one module that says what a dataset is.

A dataset is a directory holding

* ``ratings.csv`` or ``ratings.parquet``: ``user_id, item_id, timestamp``
  required, ``rating`` optional (implicit feedback when absent), extra
  columns allowed;
* ``items.csv``/``.parquet``: ``item_id`` required; optional ``title``,
  ``description``, ``genres`` (``|``-separated), other text or categorical
  columns, ``image`` and ``video`` (paths relative to the dataset directory);
* ``users.csv``/``.parquet`` (optional): ``user_id`` plus any attributes.

Ids are read as strings so that numeric and textual ids behave the same;
timestamps are Unix seconds (int64) or ISO-8601 strings, normalised to int64
seconds.  Loading never silently fixes data: problems raise
:class:`DataContractError` naming file, row and rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

USER = "user_id"
ITEM = "item_id"
TS = "timestamp"
RATING = "rating"

TABLES = ("ratings", "items", "users")
REQUIRED = {
    "ratings": (USER, ITEM, TS),
    "items": (ITEM,),
    "users": (USER,),
}
OPTIONAL_TABLES = {"users"}
TEXT_COLUMNS = ("title", "description", "genres", "director", "writer", "cast")
MEDIA_COLUMNS = ("image", "video")
LIST_SEP = "|"
# the fuse stage's recommendations.parquet, one row per (user, recommended item)
RECOMMENDATION_COLUMNS = (USER, ITEM, "rank", "score", "reason", "sources")


class DataContractError(ValueError):
    """A dataset breaks the contract. The message names file, row(s) and rule."""

    def __init__(self, file: str | Path, rule: str, detail: str = "", rows: list | None = None,
                 column: str | None = None):
        self.file = str(file)
        self.rule = rule
        self.column = column
        self.rows = list(rows or [])
        self.detail = detail
        parts = [f"{self.file}"]
        if column:
            parts.append(f"column '{column}'")
        parts.append(f"rule '{rule}'")
        msg = ": ".join([", ".join(parts), detail]) if detail else ", ".join(parts)
        if self.rows:
            msg += f" (rows {', '.join(str(r) for r in self.rows[:5])}"
            msg += ", ...)" if len(self.rows) > 5 else ")"
        super().__init__(msg)


def table_path(data_dir: str | Path, table: str) -> Path | None:
    """Return the file holding ``table`` (parquet preferred), or None."""
    data_dir = Path(data_dir)
    for ext in (".parquet", ".csv"):
        p = data_dir / f"{table}{ext}"
        if p.exists():
            return p
    return None


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one contract table, with readable errors for unreadable files.

    Row numbers in errors are 1-based data rows (the CSV header is row 0).
    """
    path = Path(path)
    if not path.is_file():
        raise DataContractError(path, "file-exists", "not a regular file")
    if path.stat().st_size == 0:
        raise DataContractError(path, "not-empty", "file is empty")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise DataContractError(path, "unique-columns", f"duplicate column names {dup}")
            df = pd.read_parquet(path)
        except DataContractError:
            raise
        except Exception as exc:  # pyarrow raises many types; re-raise as contract error
            raise DataContractError(path, "readable-parquet", f"{type(exc).__name__}: {exc}") from exc
        for col in df.columns:
            if df[col].dtype == object:
                vals = df[col].to_numpy(dtype=object)
                rows = [i + 1 for i, x in enumerate(vals) if isinstance(x, (bytes, bytearray))]
                if rows:
                    raise DataContractError(path, "text-not-binary", "binary values (parquet BINARY "
                                            "column); ids, text and media paths must be UTF-8 text",
                                            rows=rows, column=str(col))
        return df
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n")
        raise DataContractError(path, "utf-8", f"byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                                "is not valid UTF-8", rows=[line]) from exc
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n")
        raise DataContractError(path, "no-nul-bytes", "NUL byte in CSV text", rows=[line])
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""],
                         encoding="utf-8", engine="c")
    except pd.errors.EmptyDataError as exc:
        raise DataContractError(path, "not-empty", "no header row") from exc
    except (pd.errors.ParserError, ValueError, OverflowError) as exc:
        raise DataContractError(path, "csv-syntax", str(exc).strip()) from exc
    dup = [c for c in df.columns if str(c).endswith(".1") and str(c)[:-2] in df.columns]
    if dup:
        raise DataContractError(path, "unique-columns", f"duplicate column names {dup}")
    return df


@dataclass
class Dataset:
    """The three contract tables of one dataset, raw (strings for CSV)."""

    root: Path
    ratings: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None
    files: dict[str, Path] = field(default_factory=dict)


def load_raw(data_dir: str | Path) -> Dataset:
    """Load a dataset directory as-is (no coercion); raises on missing tables."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataContractError(data_dir, "dataset-directory", "not a directory")
    frames: dict[str, pd.DataFrame | None] = {}
    files: dict[str, Path] = {}
    for table in TABLES:
        p = table_path(data_dir, table)
        if p is None:
            if table in OPTIONAL_TABLES:
                frames[table] = None
                continue
            raise DataContractError(data_dir / f"{table}.csv", "table-exists",
                                    f"required table '{table}' (.csv or .parquet) is missing")
        files[table] = p
        frames[table] = read_table(p)
        missing = [c for c in REQUIRED[table] if c not in frames[table].columns]
        if missing:
            raise DataContractError(p, "required-columns", f"missing required column(s) {missing}; "
                                    f"found {list(frames[table].columns)}", column=missing[0])
    return Dataset(data_dir, frames["ratings"], frames["items"], frames["users"], files)


def _epoch_seconds(dt: pd.Series) -> pd.Series:
    """Datetimes (any unit, naive = UTC, or tz-aware) as float Unix seconds, NaN for NaT.

    Computed in numpy ``datetime64[s]``, so dates outside pandas' nanosecond range
    (year 59, year 9999) convert instead of raising ``OutOfBoundsDatetime``.
    """
    if isinstance(dt.dtype, pd.DatetimeTZDtype):
        dt = dt.dt.tz_convert("UTC").dt.tz_localize(None)
    arr = dt.to_numpy().astype("datetime64[s]")
    out = arr.astype("int64").astype("float64")
    out[np.isnat(arr)] = np.nan
    return pd.Series(out, index=dt.index)


def to_timestamp_seconds(values: pd.Series) -> pd.Series:
    """Convert Unix seconds or ISO-8601 strings to int64 seconds (NaN -> error upstream)."""
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values):
        return _epoch_seconds(values)
    num = pd.to_numeric(values, errors="coerce").astype("float64")
    if num.notna().all():
        return num
    parsed = pd.to_datetime(values.where(num.isna()), errors="coerce", utc=True, format="ISO8601")
    return num.where(num.notna(), _epoch_seconds(parsed))


def normalise(ds: Dataset) -> Dataset:
    """Typed copy of a dataset that passed validation.

    ids -> str, timestamp -> int64 seconds, rating -> float32 (1.0 when the
    column is absent: implicit feedback), media paths kept relative.
    """
    r = ds.ratings.copy()
    r[USER] = r[USER].astype(str)
    r[ITEM] = r[ITEM].astype(str)
    r[TS] = to_timestamp_seconds(r[TS]).astype("int64")
    if RATING in r.columns:
        r[RATING] = pd.to_numeric(r[RATING]).astype("float32")
    else:
        r[RATING] = np.float32(1.0)
    r = r[[USER, ITEM, TS, RATING] + [c for c in r.columns if c not in (USER, ITEM, TS, RATING)]]
    items = ds.items.copy()
    items[ITEM] = items[ITEM].astype(str)
    for col in items.columns:
        if col != ITEM and items[col].dtype == object:
            items[col] = items[col].astype("string")
    users = None
    if ds.users is not None:
        users = ds.users.copy()
        users[USER] = users[USER].astype(str)
    return Dataset(ds.root, r.reset_index(drop=True), items.reset_index(drop=True), users, ds.files)


def split_list(value) -> list[str]:
    """Split a ``|``-separated field into clean tokens ('' / NA -> [])."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return []
    return [t.strip() for t in str(value).split(LIST_SEP) if t.strip()]


def mostly_numeric(values: pd.Series, share: float = 0.95) -> tuple[bool, pd.Series]:
    """Whether a column holds numbers (also numbers stored as text, as CSV tables are read):
    a numeric dtype, or at least ``share`` of the filled cells parse.  Returns the verdict and
    the parsed values (NaN where a cell does not parse)."""
    num = pd.to_numeric(values, errors="coerce")
    if pd.api.types.is_numeric_dtype(values):
        return True, num
    filled = int(values.notna().sum())
    return bool(filled) and int(num.notna().sum()) >= share * filled, num

