"""Great Expectations (1.x) suites for the data contract of :mod:`pipelines.schema`.

Every validation rule of the ``validate`` stage is one GE expectation, run by an
*ephemeral* GE context against the raw pandas tables of a dataset.  Where GE has
no native expectation for a rule (referential integrity, media paths, ISO
timestamps, ...), the rule is computed vectorised in pandas into a helper
column (name starting with ``_``) and that column is checked by a plain GE
expectation, so the GE result (and its Data Docs) lists every rule.

Helper columns:

``_ts_seconds``      timestamp as float Unix seconds (NaN when unparseable)
``_ts_parseable``    False where a non-null timestamp is neither a number nor ISO-8601
``_rating_value``    rating as float (NaN when not numeric)
``_rating_numeric``  False where a non-null rating is not a number
``_user_code``, ``_item_code``, ``_pair_code``  integer codes of the ids / (user, item)
                     pairs: cheap keys for uniqueness and distinct counts
``_item_known``      False where ratings.item_id is not in the items table
``_user_known``      False where ratings.user_id is not in the users table
``_<media>_problem`` text saying what is wrong with a media path, null when fine
``_has_<col>``       True where the item has a non-null ``<col>`` (share checks)

Severity: GE's ``critical`` = hard failure (the stage fails), ``warning`` =
soft finding (reported, run continues).

Row numbers in findings are 1-based data rows as in the file (CSV header = row 0).
"""

from __future__ import annotations

import math
import os
import stat
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.schema import ITEM, MEDIA_COLUMNS, RATING, REQUIRED, TS, USER, to_timestamp_seconds

# Personal-data patterns (searched anywhere in a value for e-mail, whole value for phone).
# Personal-data patterns: e-mail anywhere in a value, phone number as the whole value.
# Written without \s / \d / \b so that pandas runs them in pyarrow (RE2) instead of
# falling back to Python's ``re`` (7x slower on millions of rows).
EMAIL_RE = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# phone: North-American style groups, "+" and 8-15 digits, or international digit groups
# ("06 12 34 56 78", "+33 6 12 34 56 78", "+49 (0)30 1234 5678")
PHONE_RE = (r"^ *(?:(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,4}\)|[0-9]{2,4})[ .-][0-9]{3,4}[ .-]?"
            r"[0-9]{3,5}|\+[0-9]{8,15}"
            r"|\+[0-9]{1,3}[ .-]?(?:\(0\)[ .-]?)?[0-9]{1,4}(?:[ .-][0-9]{2,4}){2,5}"
            r"|[0-9]{1,4}(?:[ .-][0-9]{2,4}){3,5}) *$")
PII_RE = f"{EMAIL_RE}|{PHONE_RE}"  # one GE regex expectation per text column

CRITICAL = "critical"
WARNING = "warning"
N_EXAMPLES = 5
# soft share checks: items column -> params key holding the max allowed share of missing values
SHARE_CHECKS = {"image": "max_missing_image_share", "video": "max_missing_video_share",
                "description": "max_missing_description_share"}
# every helper column add_helper_columns() may add: a raw column must not use these names
HELPER_COLUMNS = frozenset({"_ts_seconds", "_ts_parseable", "_rating_value", "_rating_numeric",
                            "_user_code", "_item_code", "_pair_code", "_item_known", "_user_known"}
                           | {f"_{m}_problem" for m in MEDIA_COLUMNS}
                           | {f"_has_{c}" for c in SHARE_CHECKS})


@dataclass
class Finding:
    """One violated rule: where (file, column), which rule, how bad, and examples."""

    file: str
    column: str | None
    rule: str
    severity: str  # "error" (hard failure) or "warning" (soft finding)
    message: str
    rows: list[int] = field(default_factory=list)  # 1-based data rows as in the file
    values: list[Any] = field(default_factory=list)
    count: int | None = None  # number of offending rows (None for table-level rules)
    expectation: str | None = None  # GE expectation type, None for file-level problems

    def __str__(self) -> str:
        where = f"{self.file}" + (f", column '{self.column}'" if self.column else "")
        text = f"{where}, rule '{self.rule}': {self.message}"
        if self.rows:
            more = ", ..." if self.count and self.count > len(self.rows) else ""
            text += f"; rows {', '.join(str(r) for r in self.rows)}{more}"
        if self.values:
            text += f"; values {', '.join(_short(v) for v in self.values)}"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Check:
    """Bookkeeping for one expectation: which rule it implements and how to explain it."""

    id: str
    table: str
    rule: str
    column: str | None  # column named in messages (source column, not the helper)
    severity: str
    explain: str  # human sentence: what is required
    example_columns: tuple[str, ...] = ()  # take example values from these source columns
    redact: bool = False  # never copy offending values (personal data)


@dataclass
class SuiteRun:
    """The GE result of one table's suite plus our bookkeeping."""

    table: str
    file: str
    n_rows: int
    result: Any  # great_expectations ExpectationSuiteValidationResult
    checks: dict[str, Check]


# --------------------------------------------------------------------------- GE context

_gx_module = None


def _gx():
    """Import great_expectations lazily (the import alone takes seconds)."""
    global _gx_module
    if _gx_module is None:
        import great_expectations as gx

        _gx_module = gx
    return _gx_module


# GE fingerprints every pandas batch below this many bytes by hashing the whole frame
# (pd.util.hash_pandas_object): ~10 s for 5M string rows, and the fingerprint is only
# a batch marker (metadata).  Frames above this size are validated without it.
FINGERPRINT_MAX_BYTES = 64 * 2**20


def new_context():
    """A fresh ephemeral GE context (cheap once GE is imported), progress bars off."""
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.execution_engine import pandas_execution_engine as pee

    if getattr(pee, "HASH_THRESHOLD", 0) > FINGERPRINT_MAX_BYTES:
        pee.HASH_THRESHOLD = FINGERPRINT_MAX_BYTES

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


class Runner:
    """An ephemeral GE context with one pandas data source and a whole-frame batch per table.

    Use a fresh one per validation: re-using a context across runs makes every
    later run slower (GE accumulates state), and Data Docs would show old runs.
    """

    def __init__(self, ctx=None):
        self.ctx = ctx if ctx is not None else new_context()
        self.source = self.ctx.data_sources.add_pandas("mmrec")
        self._batch_defs: dict[str, Any] = {}

    def batch_definition(self, table: str):
        if table not in self._batch_defs:
            asset = self.source.add_dataframe_asset(table)
            self._batch_defs[table] = asset.add_batch_definition_whole_dataframe("whole")
        return self._batch_defs[table]



# --------------------------------------------------------------------------- helpers (pandas)

def _year_bounds(params: dict) -> tuple[float, float]:
    lo = datetime(int(params["timestamp_min_year"]), 1, 1, tzinfo=UTC).timestamp()
    hi = datetime(int(params["timestamp_max_year"]) + 1, 1, 1, tzinfo=UTC).timestamp() - 1
    return lo, hi


def _keys(s: pd.Series) -> pd.Series:
    """Ids compared as strings, the way :func:`pipelines.schema.normalise` stores them."""
    return s if pd.api.types.is_string_dtype(s) and s.dtype != object else s.astype("str")


def _arrow_strings(s: pd.Series):
    """The column as one pyarrow string array when it is pyarrow-backed text, else None."""
    if not isinstance(s.dtype, pd.StringDtype) or s.dtype.storage != "pyarrow":
        return None
    import pyarrow as pa

    arr = pa.array(s)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _arrow_float(s: pd.Series) -> pd.Series | None:
    """pyarrow cast of clean numeric text to float64; None if not arrow text or any value fails."""
    arr = _arrow_strings(s)
    if arr is None:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # some value is not a plain number: the caller's exact path decides
    return pd.Series(values, index=s.index, dtype="float64")


def to_float(s: pd.Series) -> pd.Series:
    """``pd.to_numeric(s, errors='coerce')`` as float64; fast (pyarrow) for clean numeric text."""
    fast = _arrow_float(s)
    if fast is not None:
        return fast
    out = pd.to_numeric(s, errors="coerce")
    return out if out.dtype == "float64" else out.astype("float64")


def timestamp_seconds(s: pd.Series) -> pd.Series:
    """:func:`pipelines.schema.to_timestamp_seconds` as float64; fast for plain numeric text."""
    fast = _arrow_float(s)
    return fast if fast is not None else to_timestamp_seconds(s).astype("float64")


def codes(s: pd.Series) -> pd.Series:
    """Integer codes of a column's values (float64, NaN for null): cheap keys for GE."""
    arr = _arrow_strings(s)
    if arr is not None:
        import pyarrow.compute as pc

        idx = pc.dictionary_encode(arr).indices.to_numpy(zero_copy_only=False)
        return pd.Series(idx, index=s.index).astype("float64")
    c, _uniques = pd.factorize(s, use_na_sentinel=True)
    out = c.astype("float64")
    out[c < 0] = np.nan
    return pd.Series(out, index=s.index)


def _is_text(s: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(s) or s.dtype == object


def non_scalar_rows(s: pd.Series) -> list[int]:
    """0-based rows of ``s`` holding lists, arrays, dicts or sets (parquet nested types).

    Ids, timestamps and ratings must be scalars: such values cannot be compared or
    hashed (pandas' factorize raises on them), so the table is rejected before any
    expectation runs.
    """
    if s.dtype != object:
        return []
    arr = s.to_numpy(dtype=object)
    nested = (list, tuple, dict, set, frozenset, np.ndarray)
    return [i for i, x in enumerate(arr) if isinstance(x, nested)]


def media_problems(values: pd.Series, root: Path) -> pd.Series:
    """Per value: None when the media path is a regular file inside ``root``, else why not.

    Rejected: absolute paths, ``..`` components, paths (or symlinks) resolving
    outside the dataset directory, missing files, directories / special files.
    """
    root_real = os.path.realpath(root)
    out = np.full(len(values), None, dtype=object)
    arr = values.to_numpy(dtype=object, na_value=None)
    cache: dict[str, str | None] = {}
    for i, v in enumerate(arr):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        v = str(v)
        if v in cache:
            out[i] = cache[v]
            continue
        cache[v] = out[i] = _media_problem(v, root, root_real)
    return pd.Series(out, index=values.index, dtype=object)


def _path_repr(v: str, n: int = 120) -> str:
    """repr() of a media path (control characters escaped), shortened for messages."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 4] + "...'"


def _media_problem(v: str, root: Path, root_real: str) -> str | None:
    if not v.strip():
        return f"{_path_repr(v)}: empty path"
    if "\x00" in v:  # os.path / os.stat raise ValueError on it
        return f"{_path_repr(v)}: NUL byte in path"
    norm = v.replace("\\", "/")
    if os.path.isabs(v) or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return f"{_path_repr(v)}: absolute path (must be relative to the dataset directory)"
    if ".." in norm.split("/"):
        return f"{_path_repr(v)}: '..' path component (path traversal)"
    full = os.path.join(root, norm)
    real = os.path.realpath(full)
    if os.path.commonpath([real, root_real]) != root_real:
        return f"{_path_repr(v)}: resolves outside the dataset directory (via a symlink, to {real})"
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return f"{_path_repr(v)}: file does not exist"
    except OSError as exc:
        return f"{_path_repr(v)}: cannot stat ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        return f"{_path_repr(v)}: is {kind}"
    return None


def add_helper_columns(tables: dict[str, pd.DataFrame], root: Path, params: dict) -> dict[str, pd.DataFrame]:
    """Copies of the raw tables with the ``_``-helper columns the suites check."""
    out: dict[str, pd.DataFrame] = {}
    items = tables.get("items")
    users = tables.get("users")
    if (r := tables.get("ratings")) is not None:
        r = r.copy(deep=False)
        helpers: dict[str, pd.Series] = {}
        if TS in r.columns:
            secs = timestamp_seconds(r[TS])
            helpers["_ts_seconds"] = secs
            helpers["_ts_parseable"] = r[TS].isna() | secs.notna()
        if RATING in r.columns:
            val = to_float(r[RATING])
            helpers["_rating_value"] = val
            helpers["_rating_numeric"] = r[RATING].isna() | val.notna()
        for col, name in ((USER, "_user_code"), (ITEM, "_item_code")):
            if col in r.columns:
                helpers[name] = codes(r[col])
        if "_user_code" in helpers and "_item_code" in helpers:  # one key per (user, item) pair
            n_item_codes = float(np.nanmax(helpers["_item_code"].to_numpy(), initial=-1.0)) + 1.0
            helpers["_pair_code"] = helpers["_user_code"] * n_item_codes + helpers["_item_code"]
        if ITEM in r.columns and items is not None and ITEM in items.columns:
            helpers["_item_known"] = r[ITEM].isna() | _keys(r[ITEM]).isin(_keys(items[ITEM].dropna()))
        if USER in r.columns and users is not None and USER in users.columns:
            helpers["_user_known"] = r[USER].isna() | _keys(r[USER]).isin(_keys(users[USER].dropna()))
        out["ratings"] = r.assign(**helpers)
    if items is not None:
        it = items.copy(deep=False)
        helpers = {}
        for col in MEDIA_COLUMNS:
            if col in it.columns:
                helpers[f"_{col}_problem"] = media_problems(it[col], root)
        for col in SHARE_CHECKS:
            helpers[f"_has_{col}"] = (it[col].notna() if col in it.columns
                                      else pd.Series(False, index=it.index))
        out["items"] = it.assign(**helpers)
    if users is not None:
        out["users"] = users
    return out


# --------------------------------------------------------------------------- suites

def build_suites(frames: dict[str, pd.DataFrame], files: dict[str, str], params: dict
                 ) -> dict[str, list[tuple[Any, Check]]]:
    """Expectations (with their :class:`Check`) per table, for the columns present."""
    return {table: _table_suite(table, df, files, params) for table, df in frames.items()}


def _table_suite(table: str, df: pd.DataFrame, files: dict[str, str], params: dict
                 ) -> list[tuple[Any, Check]]:
    gxe = _gx().expectations
    allow = {str(c) for c in params.get("allow_pii_columns") or []}

    cols = set(df.columns)
    exps: list[tuple[Any, Check]] = []

    def add(exp_cls, check: Check, **kwargs):
        sev = CRITICAL if check.severity == "error" else WARNING
        note = f"**{check.rule}** ({check.severity}): {check.explain}"
        exps.append((exp_cls(severity=sev, notes=note, meta={"check_id": check.id}, **kwargs), check))

    def ck(rule, column, explain, severity="error", examples=(), redact=False) -> Check:
        return Check(f"{table}:{rule}:{column}:{len(exps)}", table, rule, column, severity, explain,
                     tuple(examples), redact)

    # required columns present
    for col in REQUIRED[table]:
        add(gxe.ExpectColumnToExist, ck("required-columns", col, f"column '{col}' must exist"),
            column=col)
    # keys / ids non-null
    for col in REQUIRED[table]:
        if col in cols and col != TS:
            add(gxe.ExpectColumnValuesToNotBeNull, ck("not-null", col, f"'{col}' must not be empty",
                                                      examples=[col]), column=col)
    # minimum row counts
    min_rows = {"ratings": params["min_ratings"], "items": params["min_items"],
                "users": params["min_users"]}[table]
    add(gxe.ExpectTableRowCountToBeBetween,
        ck("min-rows", None, f"at least {min_rows} data rows"), min_value=int(min_rows))

    if table == "ratings":
        if TS in cols:
            add(gxe.ExpectColumnValuesToNotBeNull, ck("not-null", TS, "timestamp must not be empty",
                                                      examples=[TS]), column=TS)
            add(gxe.ExpectColumnValuesToBeInSet,
                ck("timestamp-parseable", TS, "timestamp must be Unix seconds or ISO-8601",
                   examples=[TS]), column="_ts_parseable", value_set=[True])
            lo, hi = _year_bounds(params)
            add(gxe.ExpectColumnValuesToBeBetween,
                ck("timestamp-plausible", TS,
                   f"timestamp must fall in years {params['timestamp_min_year']}.."
                   f"{params['timestamp_max_year']}", examples=[TS]),
                column="_ts_seconds", min_value=lo, max_value=hi)
        if RATING in cols:
            add(gxe.ExpectColumnValuesToNotBeNull, ck("not-null", RATING, "rating must not be empty",
                                                      examples=[RATING]), column=RATING)
            add(gxe.ExpectColumnValuesToBeInSet,
                ck("rating-numeric", RATING, "rating must be a number", examples=[RATING]),
                column="_rating_numeric", value_set=[True])
            add(gxe.ExpectColumnValuesToBeBetween,
                ck("rating-range", RATING,
                   f"rating must be within [{params['rating_min']}, {params['rating_max']}]",
                   examples=[RATING]),
                column="_rating_value", min_value=float(params["rating_min"]),
                max_value=float(params["rating_max"]))
        if "_item_known" in cols:
            add(gxe.ExpectColumnValuesToBeInSet,
                ck("known-item", ITEM, f"every rated item_id must exist in {files.get('items')}",
                   examples=[ITEM]), column="_item_known", value_set=[True])
        if "_user_known" in cols:
            add(gxe.ExpectColumnValuesToBeInSet,
                ck("known-user", USER, f"every rating's user_id must exist in {files.get('users')}",
                   examples=[USER]), column="_user_known", value_set=[True])
        if {"_pair_code", "_ts_seconds"} <= cols:
            add(gxe.ExpectCompoundColumnsToBeUnique,
                ck("duplicate-interaction", f"{USER},{ITEM},{TS}",
                   "no two ratings with the same (user_id, item_id, timestamp)",
                   examples=[USER, ITEM, TS]), column_list=["_pair_code", "_ts_seconds"])
        if USER in cols:
            add(gxe.ExpectColumnUniqueValueCountToBeBetween,
                ck("min-users", USER, f"at least {params['min_users']} distinct users rate"),
                column="_user_code", min_value=int(params["min_users"]))
        if ITEM in cols:
            add(gxe.ExpectColumnUniqueValueCountToBeBetween,
                ck("min-items", ITEM, f"at least {params['min_items']} distinct items are rated"),
                column="_item_code", min_value=int(params["min_items"]))
    else:
        key = ITEM if table == "items" else USER
        if key in cols:
            add(gxe.ExpectColumnValuesToBeUnique, ck("unique-key", key, f"'{key}' must be unique",
                                                     examples=[key]), column=key)
    if table == "items":
        for col in MEDIA_COLUMNS:
            if f"_{col}_problem" in cols:
                add(gxe.ExpectColumnValuesToBeNull,
                    ck("media-path", col, f"'{col}' must be a relative path to a regular file inside "
                       "the dataset directory"), column=f"_{col}_problem")
        if len(df):
            for col, key in SHARE_CHECKS.items():
                share = float(params[key])
                if share >= 1.0:
                    continue  # can never fail
                add(gxe.ExpectColumnMeanToBeBetween,
                    ck("missing-share", col, f"at most {share:.0%} of items without '{col}'",
                       severity="warning"),
                    column=f"_has_{col}", min_value=max(0.0, 1.0 - share), max_value=1.0)

    # text length bounds and personal data, on every text column of the raw table
    for col in df.columns:
        if col in HELPER_COLUMNS or not _is_text(df[col]):  # raw "_x" columns are checked too
            continue
        if table == "ratings" and col in (TS, RATING):
            continue  # must parse as numbers / timestamps: stricter rules above
        if table == "ratings" and ((col == ITEM and "_item_known" in cols)
                                   or (col == USER and "_user_known" in cols)):
            continue  # must be a key of items / users, whose columns are checked there
        max_chars = int(params["text_max_chars"])
        add(gxe.ExpectColumnValueLengthsToBeBetween,
            ck("text-length", col, f"at most {max_chars} characters", examples=[col]),
            column=col, max_value=max_chars)
        if col in allow or f"{table}.{col}" in allow:
            continue
        share = float(params["pii_share"])
        add(gxe.ExpectColumnValuesToNotMatchRegex,
            ck("pii", col, f"at most {share:.0%} of values may look like personal data (e-mail "
               "addresses, phone numbers); list the column in validate.allow_pii_columns if "
               "intended", examples=[col], redact=True),
            column=col, regex=PII_RE, mostly=1.0 - share)
    return exps



# --------------------------------------------------------------------------- run

def run_suites(runner: Runner, frames: dict[str, pd.DataFrame],
               suites: dict[str, list[tuple[Any, Check]]], files: dict[str, str], *,
               store: bool = True) -> list[SuiteRun]:
    """Run each table's suite on its frame with the runner's GE context.

    With ``store=True`` the suites and the (redacted) results are also kept in
    the context's stores, which is what GE Data Docs are rendered from.
    """
    gx = _gx()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )
    from great_expectations.validator.v1_validator import Validator

    ctx = runner.ctx
    run_id = RunIdentifier(run_name="validate", run_time=datetime.now(UTC))
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": N_EXAMPLES}
    runs = []
    for table, exps in suites.items():
        batch_def = runner.batch_definition(table)
        suite = gx.ExpectationSuite(name=table)
        for exp, _check in exps:
            suite.add_expectation(exp)
        # the same validator ValidationDefinition.run() uses, minus its store round-trips
        validator = Validator(batch_definition=batch_def, batch_parameters={"dataframe": frames[table]},
                              result_format=result_format)
        res = validator.validate_expectation_suite(suite)
        checks = {c.id: c for _e, c in exps}
        _redact(res, checks)
        if store:
            suite_id = ExpectationSuiteIdentifier(name=suite.name)
            ctx.suites.add(suite)
            res.meta["run_id"] = run_id
            res.meta["validation_time"] = run_id.run_time
            key = ValidationResultIdentifier(batch_identifier=validator.active_batch_id,
                                             expectation_suite_identifier=suite_id, run_id=run_id)
            ctx.validation_results_store.store_validation_results(res, key, suite_id)
        runs.append(SuiteRun(table, files[table], len(frames[table]), res, checks))
    return runs


def _redact(res, checks: dict[str, Check]) -> None:
    """Drop offending values of personal-data rules from the GE result (reports, Data Docs)."""
    for r in res.results:
        check = checks.get((r.expectation_config.meta or {}).get("check_id"))
        if check and check.redact and r.result:
            for key in ("partial_unexpected_list", "partial_unexpected_counts", "unexpected_list"):
                if key in r.result:
                    r.result[key] = []


# --------------------------------------------------------------------------- findings

def findings_from_runs(runs: list[SuiteRun], raw: dict[str, pd.DataFrame]) -> list[Finding]:
    """One :class:`Finding` per failed expectation (critical -> error, warning -> warning)."""
    findings = []
    for run in runs:
        for r in run.result.results:
            if r.success:
                continue
            check = run.checks[(r.expectation_config.meta or {})["check_id"]]
            findings.append(_finding(run, check, r, raw.get(run.table)))
    order = {"error": 0, "warning": 1}
    findings.sort(key=lambda f: (order.get(f.severity, 2), f.file))
    return findings


def _finding(run: SuiteRun, check: Check, r, source: pd.DataFrame | None) -> Finding:
    res = r.result or {}
    exc = r.exception_info or {}
    if exc.get("raised_exception"):
        msg = f"could not be checked: {exc.get('exception_message')}"
        return Finding(run.file, check.column, check.rule, check.severity, msg,
                       expectation=r.expectation_config.type)
    n_bad = res.get("unexpected_count")
    idx = [int(i) for i in res.get("partial_unexpected_index_list") or [] if _is_int(i)]
    rows = [i + 1 for i in idx[:N_EXAMPLES]]
    values: list[Any] = []
    kinds = ""
    if check.redact:
        values = ["<redacted>"] * min(len(rows), 2)
        if source is not None and idx and check.column in source.columns:
            seen = source[check.column].iloc[idx[:N_EXAMPLES]].astype(str)
            found = [name for name, rx in (("e-mail addresses", EMAIL_RE), ("phone numbers", PHONE_RE))
                     if seen.str.contains(rx, regex=True).any()]
            kinds = f"; offending values look like {' and '.join(found)}" if found else ""
    elif check.example_columns and source is not None and idx:
        cols = [c for c in check.example_columns if c in source.columns]
        sub = source.iloc[idx[:N_EXAMPLES]][cols]
        if len(cols) == 1:
            values = [_jsonable(v) for v in sub[cols[0]].tolist()]
        else:
            values = ["(" + ", ".join(f"{c}={_jsonable(v)}" for c, v in zip(cols, row, strict=True)) + ")"
                      for row in sub.itertuples(index=False)]
    else:
        values = [_jsonable(v) for v in (res.get("partial_unexpected_list") or [])[:N_EXAMPLES]]
    if n_bad is not None:
        pct = res.get("unexpected_percent")
        msg = f"{check.explain}; {n_bad} of {res.get('element_count', run.n_rows)} values violate"
        if pct is not None and check.redact:
            msg += f" ({pct:.1f}%){kinds}"
    elif r.expectation_config.type == "expect_column_to_exist":
        found = list(source.columns) if source is not None else []
        msg = f"{check.explain}; it is missing (columns found: {', '.join(map(str, found))})"
    else:
        observed = res.get("observed_value")
        if isinstance(observed, float):
            observed = round(observed, 4)
        msg = f"{check.explain}; observed {observed}"
        if check.rule == "missing-share" and isinstance(observed, float):
            msg = f"{check.explain}; {1 - observed:.1%} of items have none"
    return Finding(run.file, check.column, check.rule, check.severity, msg, rows, values, n_bad,
                   r.expectation_config.type)


# --------------------------------------------------------------------------- serialising

def results_json(runs: list[SuiteRun]) -> list[dict]:
    """Every expectation result of every table, JSON-ready (for validation.json)."""
    out = []
    for run in runs:
        for r in run.result.results:
            cfg = r.expectation_config
            check = run.checks[(cfg.meta or {})["check_id"]]
            kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
            exc = r.exception_info or {}
            out.append({
                "table": run.table, "file": run.file, "expectation": cfg.type, "kwargs": _jsonable(kwargs),
                "rule": check.rule, "column": check.column, "severity": check.severity,
                "explain": check.explain, "success": bool(r.success),
                "result": _jsonable(dict(r.result or {})),
                "exception": exc.get("exception_message") if exc.get("raised_exception") else None,
            })
    out.sort(key=lambda d: (d["table"], d["success"], d["rule"], str(d["column"])))
    return out


def build_data_docs(ctx, site_dir: Path) -> Path | None:
    """Render GE Data Docs of the context's validation results into ``site_dir``."""
    name = f"mmrec-{uuid.uuid4().hex[:8]}"
    ctx.add_data_docs_site(name, {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(Path(site_dir).resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    ctx.build_data_docs(site_names=[name])
    index = Path(site_dir) / "index.html"
    return index if index.exists() else None


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    if v is pd.NA or v is pd.NaT or v is None:
        return None
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _short(v: Any, n: int = 120) -> str:
    s = repr(v) if not isinstance(v, str) else "'" + v + "'"
    return s if len(s) <= n else s[: n - 4] + "...'"
