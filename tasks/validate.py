"""validate stage: check a dataset against the data contract with Great Expectations.

``validate(dataset_dir, params)`` is pure (reads the dataset, writes nothing)
and returns a :class:`ValidationResult`.  The CLI::

    python -m tasks.validate --data DIR --out artifacts/validate \
        --report reports/validate --params params.yaml

writes, when the dataset is valid, the normalised tables (``ratings.parquet``,
``items.parquet``, ``users.parquet`` if present) and ``dataset.json`` into
``--out`` (one atomic directory swap), and always writes ``validation.json``,
``summary.json`` (DVC metrics) and ``index.html`` (with GE Data Docs under
``data_docs/``) into ``--report``.  An invalid dataset exits with code 1,
prints file / column / rule / rows to stderr and leaves ``--out`` untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines import expectations as gxe
from pipelines.expectations import Finding
from pipelines.io import _json_default, atomic_path, load_params
from pipelines.schema import (
    ITEM,
    RATING,
    REQUIRED,
    TABLES,
    TS,
    USER,
    DataContractError,
    Dataset,
    normalise,
    read_table,
    table_path,
)

log = logging.getLogger("mmrec.validate")

DEFAULTS: dict[str, Any] = {
    "rating_min": 0.5,
    "rating_max": 5.0,
    "timestamp_min_year": 1970,
    "timestamp_max_year": 2100,
    "min_ratings": 10,
    "min_items": 2,
    "min_users": 2,
    "text_max_chars": 20000,
    "max_missing_image_share": 0.5,  # warning above
    "max_missing_video_share": 1.0,  # warning above
    "max_missing_description_share": 0.5,  # warning above
    "allow_pii_columns": [],  # "column" or "table.column"
    "pii_share": 0.05,  # hard failure when more values look like e-mail / phone numbers
    "data_docs": True,  # render GE Data Docs into <report>/data_docs
}

__all__ = [
    "DEFAULTS",
    "Finding",
    "ValidationResult",
    "cli",
    "main",
    "merge_params",
    "validate",
    "write_artifact",
    "write_report",
]


@dataclass
class ValidationResult:
    passed: bool
    findings: list[Finding]
    expectations: list[dict]  # every GE expectation result (JSON-ready)
    summary: dict[str, Any]  # flat numbers (summary.json)
    files: dict[str, str]  # table -> input file
    dataset_dir: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    dataset: Dataset | None = field(default=None, repr=False)  # normalised; only when passed
    gx_context: Any = field(default=None, repr=False)  # for Data Docs

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def message(self, limit: int = 20) -> str:
        """Readable multi-line description of the problems (for stderr)."""
        state = "valid" if self.passed else "INVALID"
        head = (f"validate: dataset {self.dataset_dir} is {state} "
                f"({len(self.errors)} error(s), {len(self.warnings)} warning(s))")
        lines = [head]
        for f in self.findings[:limit]:
            lines.append(f"  {'ERROR' if f.severity == 'error' else 'warning'}: {f}")
        if len(self.findings) > limit:
            lines.append(f"  ... and {len(self.findings) - limit} more (see validation.json)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"passed": self.passed, "dataset": self.dataset_dir, "files": self.files,
                "params": self.params, "summary": self.summary,
                "findings": [f.to_dict() for f in self.findings], "expectations": self.expectations}


def merge_params(params: dict | None) -> dict[str, Any]:
    """DEFAULTS overridden by ``params``; unknown keys and bad types are errors."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"params section 'validate': unknown key(s) {unknown}; "
                         f"known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    allow = p["allow_pii_columns"]
    if allow is None:
        allow = []
    if isinstance(allow, str) or not isinstance(allow, (list, tuple)):
        raise TypeError("params 'validate.allow_pii_columns' must be a list of column names")
    p["allow_pii_columns"] = [str(c) for c in allow]
    for key in ("rating_min", "rating_max", "max_missing_image_share", "max_missing_video_share",
                "max_missing_description_share", "pii_share"):
        p[key] = float(p[key])
    for key in ("timestamp_min_year", "timestamp_max_year", "min_ratings", "min_items", "min_users",
                "text_max_chars"):
        p[key] = int(p[key])
    if p["rating_min"] > p["rating_max"]:
        raise ValueError("params 'validate': rating_min > rating_max")
    if p["timestamp_min_year"] > p["timestamp_max_year"]:
        raise ValueError("params 'validate': timestamp_min_year > timestamp_max_year")
    p["data_docs"] = bool(p["data_docs"])
    return p


def _load_tables(root: Path) -> tuple[dict[str, pd.DataFrame], dict[str, str], list[Finding]]:
    tables: dict[str, pd.DataFrame] = {}
    files: dict[str, str] = {}
    findings: list[Finding] = []
    if not root.is_dir():
        findings.append(Finding(str(root), None, "dataset-directory", "error", "not a directory"))
        return tables, files, findings
    for table in TABLES:
        path = table_path(root, table)
        if path is None:
            if table != "users":
                findings.append(Finding(str(root / f"{table}.csv"), None, "table-exists", "error",
                                        f"required table '{table}' (.csv or .parquet) is missing"))
            continue
        files[table] = str(path)
        try:
            # row numbers in findings are positions: 1-based data rows as in the file
            df = read_table(path).reset_index(drop=True)
        except DataContractError as exc:
            findings.append(Finding(exc.file, exc.column, exc.rule, "error", exc.detail or str(exc),
                                    rows=list(exc.rows)))
            continue
        blank = [i for i, c in enumerate(df.columns) if not str(c).strip()]
        if blank:
            findings.append(Finding(str(path), None, "column-names", "error",
                                    f"empty column name(s) at position(s) {[i + 1 for i in blank]}"))
            continue
        reserved = sorted(str(c) for c in df.columns if c in gxe.HELPER_COLUMNS)
        if reserved:
            findings.append(Finding(str(path), reserved[0], "reserved-column-names", "error",
                                    f"column name(s) {reserved} are reserved for validation helper "
                                    "columns; rename them"))
            continue
        nested = [(col, gxe.non_scalar_rows(df[col])) for col in (*REQUIRED[table], RATING)
                  if col in df.columns and isinstance(df[col], pd.Series)]
        nested = [(col, rows) for col, rows in nested if rows]
        for col, rows in nested:
            findings.append(Finding(str(path), col, "scalar-values", "error",
                                    f"'{col}' must hold plain text or numbers, not lists / structs; "
                                    f"{len(rows)} of {len(df)} values are nested",
                                    rows=[r + 1 for r in rows[:gxe.N_EXAMPLES]], count=len(rows)))
        if not nested:
            tables[table] = df
    return tables, files, findings


def _share(df: pd.DataFrame | None, col: str) -> float | None:
    if df is None or not len(df):
        return None
    return float(df[col].notna().mean()) if col in df.columns else 0.0


def _distinct(frame: pd.DataFrame | None, col: str, code_col: str) -> int | None:
    if frame is None or col not in frame.columns:
        return None
    return int((frame[code_col] if code_col in frame.columns else frame[col]).nunique())


def _summary(tables: dict[str, pd.DataFrame], frames: dict[str, pd.DataFrame], findings: list[Finding],
             expectations: list[dict], passed: bool) -> dict[str, Any]:
    r, items, users = tables.get("ratings"), tables.get("items"), tables.get("users")
    n_users = _distinct(frames.get("ratings"), USER, "_user_code")  # codes: fast on 5M rows
    n_items = _distinct(frames.get("ratings"), ITEM, "_item_code")
    n_ratings = len(r) if r is not None else None
    density = (n_ratings / (n_users * n_items)) if n_ratings and n_users and n_items else None
    return {
        "passed": passed,
        "n_ratings": n_ratings,
        "n_users": n_users,
        "n_items": n_items,
        "n_catalogue_items": len(items) if items is not None else None,
        "n_user_rows": len(users) if users is not None else None,
        "density": density,
        "n_failed": sum(f.severity == "error" for f in findings),
        "n_warnings": sum(f.severity == "warning" for f in findings),
        "n_expectations": len(expectations),
        "n_expectations_failed": sum(not e["success"] for e in expectations),
        "share_items_with_image": _share(items, "image"),
        "share_items_with_video": _share(items, "video"),
        "share_items_with_description": _share(items, "description"),
    }


def validate(dataset_dir: str | Path, params: dict | None = None) -> ValidationResult:
    """Validate a dataset directory; pure (writes nothing). See module docstring."""
    p = merge_params(params)
    root = Path(dataset_dir)
    tables, files, findings = _load_tables(root)
    expectations: list[dict] = []
    ctx = None
    frames: dict[str, pd.DataFrame] = {}
    if tables:
        frames = gxe.add_helper_columns(tables, root, p)
        suites = gxe.build_suites(frames, files, p)
        runner = gxe.Runner()
        ctx = runner.ctx
        runs = gxe.run_suites(runner, frames, suites, files, store=p["data_docs"])
        findings += gxe.findings_from_runs(runs, tables)
        expectations = gxe.results_json(runs)
    order = {"error": 0, "warning": 1}
    findings.sort(key=lambda f: (order.get(f.severity, 2), f.file))
    passed = not any(f.severity == "error" for f in findings) and {"ratings", "items"} <= set(tables)
    dataset = None
    if passed:
        # hand normalise() the already-parsed numbers (same values, no second text parse)
        ratings = tables["ratings"].assign(**{TS: frames["ratings"]["_ts_seconds"]})
        if RATING in ratings.columns:
            ratings[RATING] = frames["ratings"]["_rating_value"]
        dataset = normalise(Dataset(root, ratings, tables["items"], tables.get("users"),
                                    {k: Path(v) for k, v in files.items()}))
    summary = _summary(tables, frames, findings, expectations, passed)
    return ValidationResult(passed, findings, expectations, summary, files, str(root), p, dataset, ctx)


# --------------------------------------------------------------------------- writers

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(result: ValidationResult, out: str | Path) -> None:
    """Normalised tables + dataset.json into ``out`` (atomic directory swap)."""
    if not result.passed or result.dataset is None:
        raise ValueError("refusing to write the artifact of an invalid dataset")
    ds = result.dataset
    file_info = {}
    for table, f in sorted(result.files.items()):
        path = Path(f)
        file_info[table] = {"name": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
    content = hashlib.sha256("".join(f"{t}:{i['name']}:{i['sha256']}\n"
                                     for t, i in sorted(file_info.items())).encode()).hexdigest()
    meta = {
        "dataset": result.dataset_dir,
        "content_hash": content,
        "files": file_info,
        "n_ratings": len(ds.ratings),
        "n_users": result.summary["n_users"],
        "n_items": result.summary["n_items"],
        "n_catalogue_items": len(ds.items),
        "n_user_rows": len(ds.users) if ds.users is not None else None,
        "n_warnings": len(result.warnings),
    }
    with atomic_path(out, is_dir=True) as tmp:
        ds.ratings.to_parquet(tmp / "ratings.parquet", index=False)
        ds.items.to_parquet(tmp / "items.parquet", index=False)
        if ds.users is not None:
            ds.users.to_parquet(tmp / "users.parquet", index=False)
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")


def write_report(result: ValidationResult, report: str | Path) -> Path:
    """validation.json, summary.json, index.html (+ GE Data Docs) into ``report`` (atomic swap)."""
    def dump(obj) -> str:
        return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"

    with atomic_path(report, is_dir=True) as tmp:
        docs_note = None
        docs = None
        if result.gx_context is not None and result.params.get("data_docs", True):
            try:
                docs = gxe.build_data_docs(result.gx_context, tmp / "data_docs")
            except Exception as exc:  # noqa: BLE001 - rendering must not decide validity; reported below
                docs_note = f"GE Data Docs could not be rendered: {type(exc).__name__}: {exc}"
                log.warning(docs_note)
        body = result.to_json()
        body["data_docs"] = "data_docs/index.html" if docs else None
        if docs_note:
            body["data_docs_error"] = docs_note
        (tmp / "validation.json").write_text(dump(body), encoding="utf-8")
        (tmp / "summary.json").write_text(dump(result.summary), encoding="utf-8")
        (tmp / "index.html").write_text(render_html(result, docs is not None, docs_note),
                                        encoding="utf-8")
    return Path(report)


def render_html(result: ValidationResult, has_docs: bool, docs_note: str | None = None) -> str:
    e = html.escape
    state = "PASSED" if result.passed else "FAILED"
    color = "#1a7f37" if result.passed else "#cf222e"
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>mmrec validate: "
            f"{e(state)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}th{background:#f3f3f3}"
            ".error{color:#cf222e}.warning{color:#9a6700}.ok{color:#1a7f37}</style></head><body>")
    parts = [
        head,
        f"<h1>Dataset validation: <span style='color:{color}'>{state}</span></h1>",
        f"<p>Dataset: <code>{e(result.dataset_dir)}</code></p>",
    ]
    if has_docs:
        parts.append("<p>Great Expectations Data Docs: <a href='data_docs/index.html'>"
                     "data_docs/index.html</a></p>")
    elif docs_note:
        parts.append(f"<p>{e(docs_note)}</p>")
    parts.append("<h2>Summary</h2><table>")
    for k, v in result.summary.items():
        parts.append(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>")
    parts.append("</table><h2>Findings</h2>")
    if result.findings:
        parts.append("<table><tr><th>severity</th><th>file</th><th>column</th><th>rule</th>"
                     "<th>message</th><th>rows</th><th>values</th></tr>")
        for f in result.findings:
            parts.append(f"<tr class='{e(f.severity)}'><td>{e(f.severity)}</td><td>{e(f.file)}</td>"
                         f"<td>{e(str(f.column or ''))}</td><td>{e(f.rule)}</td><td>{e(f.message)}</td>"
                         f"<td>{e(', '.join(map(str, f.rows)))}</td>"
                         f"<td>{e(', '.join(map(repr, f.values)))}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='ok'>No findings.</p>")
    parts.append("<h2>Expectations</h2><table><tr><th>table</th><th>expectation</th><th>column</th>"
                 "<th>rule</th><th>severity</th><th>result</th><th>details</th></tr>")
    for x in result.expectations:
        res = x["result"] or {}
        detail = ""
        if "unexpected_count" in res:
            detail = f"{res['unexpected_count']} of {res.get('element_count')} unexpected"
        elif "observed_value" in res:
            detail = f"observed {res['observed_value']}"
        if x.get("exception"):
            detail = f"exception: {x['exception']}"
        cls, txt = ("ok", "success") if x["success"] else (
            ("error", "FAILED") if x["severity"] == "error" else ("warning", "warning"))
        parts.append(f"<tr><td>{e(x['table'])}</td><td>{e(x['expectation'])}</td>"
                     f"<td>{e(str(x['column'] or ''))}</td><td>{e(x['rule'])}</td>"
                     f"<td>{e(x['severity'])}</td><td class='{cls}'>{txt}</td><td>{e(detail)}</td></tr>")
    parts.append("</table></body></html>\n")
    return "".join(parts)


# --------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tasks.validate", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="dataset directory (ratings, items[, users])")
    ap.add_argument("--out", default=None,
                    help="artifact directory for the normalised tables (written only when valid)")
    ap.add_argument("--report", default=None,
                    help="report directory (default: a new temporary directory)")
    ap.add_argument("--params", default=None,
                    help="params file; reads section 'validate' (default: built-in DEFAULTS)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit 0 valid, 1 invalid, 2 bad arguments / params."""
    args = _parser().parse_args(argv)
    try:
        params: dict = {}
        if args.params is not None:
            try:
                params = load_params("validate", args.params)
            except KeyError:
                print(f"validate: {args.params} has no section 'validate'; using defaults",
                      file=sys.stderr)
        merge_params(params)
    except (OSError, TypeError, ValueError) as exc:
        print(f"validate: bad params: {exc}", file=sys.stderr)
        return 2
    result = validate(args.data, params)
    report = Path(args.report) if args.report else Path(tempfile.mkdtemp(prefix="mmrec-validate-"))
    write_report(result, report)
    if not result.passed:
        print(result.message(), file=sys.stderr)
        print(f"report: {report / 'index.html'}", file=sys.stderr)
        if args.out:
            print(f"{args.out} left unchanged", file=sys.stderr)
        return 1
    if args.out:
        write_artifact(result, args.out)
    print(result.message(), file=sys.stderr)
    print(f"report: {report / 'index.html'}" + (f"; artifact: {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """For ``python -m pipelines validate --data DIR``: same as :func:`main`."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
