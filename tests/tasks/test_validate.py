"""Tests for the validate stage (tasks/validate.py + pipelines/expectations.py).

Every bad input must: exit 1, print file + column/rule + offending row to
stderr (not a bare traceback), write the report, and leave a previously written
good ``--out`` artifact byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks import validate as v

REPO = Path(__file__).resolve().parents[2]
ML100K = Path(os.environ.get("MMREC_ML100K", REPO / "../shared/datasets/ml100k-mm"))

N_USERS, N_ITEMS = 4, 4


# --------------------------------------------------------------------------- fixtures

def _ratings_rows() -> list[dict]:
    rows, t = [], 881250000
    for u in range(1, N_USERS + 1):
        for i in range(1, N_ITEMS + 1):
            if (u + i) % 4:  # 12 of 16 pairs
                rows.append({"user_id": str(u), "item_id": str(i), "rating": str(1 + (u * i) % 5),
                             "timestamp": str(t)})
                t += 3600
    return rows


def write_dataset(root: Path, *, ratings=None, items=None, users=None, images=True) -> Path:
    """A tiny valid dataset (12 ratings, 4 items with images, 4 users) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ratings = pd.DataFrame(_ratings_rows()) if ratings is None else ratings
    if items is None:
        items = pd.DataFrame({"item_id": [str(i) for i in range(1, N_ITEMS + 1)],
                              "title": [f"Movie {i} ({1990 + i})" for i in range(1, N_ITEMS + 1)],
                              "description": [f"A film about thing number {i}." for i in
                                              range(1, N_ITEMS + 1)],
                              "genres": ["Drama|Comedy", "Action", "Drama", "Animation|Children's"],
                              "image": [f"images/{i}.jpg" for i in range(1, N_ITEMS + 1)]})
    if users is None:
        users = pd.DataFrame({"user_id": [str(u) for u in range(1, N_USERS + 1)],
                              "age": ["24", "53", "23", "33"], "zip_code": ["85711", "94043", "32067",
                                                                          "43537"]})
    ratings.to_csv(root / "ratings.csv", index=False)
    items.to_csv(root / "items.csv", index=False)
    if users is not False:
        users.to_csv(root / "users.csv", index=False)
    if images:
        (root / "images").mkdir(exist_ok=True)
        for i in range(1, N_ITEMS + 1):
            (root / "images" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0fakejpeg" + bytes([i]))
    return root


def write_params(path: Path, **overrides) -> Path:
    section = {"data_docs": False, **overrides}
    path.write_text(yaml.safe_dump({"validate": section, "other_stage": {"x": 1}}), encoding="utf-8")
    return path


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def good_artifact(tmp_path_factory) -> Path:
    """A good ``--out`` artifact written once by the CLI; tests copy it."""
    base = tmp_path_factory.mktemp("good")
    data = write_dataset(base / "data")
    params = write_params(base / "params.yaml")
    rc = v.main(["--data", str(data), "--out", str(base / "out"), "--report", str(base / "report"),
                 "--params", str(params)])
    assert rc == 0
    return base / "out"


@pytest.fixture
def run_cli(tmp_path, good_artifact, capsys):
    """Run the CLI on a dataset with a copy of the good artifact as --out.

    Returns (rc, stderr, out_dir, report_dir, out_hash_before)."""

    def run(data: Path, **params):
        out = tmp_path / "artifacts" / "validate"
        if not out.exists():
            shutil.copytree(good_artifact, out)
        before = tree_hash(out)
        report = tmp_path / "reports" / "validate"
        pfile = write_params(tmp_path / "params.yaml", **params)
        capsys.readouterr()
        rc = v.main(["--data", str(data), "--out", str(out), "--report", str(report),
                     "--params", str(pfile)])
        err = capsys.readouterr().err
        return rc, err, out, report, before

    return run


# --------------------------------------------------------------------------- valid data

def test_valid_dataset_passes_and_writes_outputs(tmp_path, good_artifact, capsys):
    data = write_dataset(tmp_path / "data")
    out, report = tmp_path / "out", tmp_path / "report"
    rc = v.main(["--data", str(data), "--out", str(out), "--report", str(report),
                 "--params", str(write_params(tmp_path / "p.yaml"))])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "items.parquet",
                                                      "ratings.parquet", "users.parquet"]
    ratings = pd.read_parquet(out / "ratings.parquet")
    assert list(ratings.columns[:4]) == ["user_id", "item_id", "timestamp", "rating"]
    assert len(ratings) == 12 and ratings["timestamp"].dtype == "int64"
    assert str(ratings["rating"].dtype) == "float32"
    assert ratings["timestamp"].iloc[0] == 881250000
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["n_ratings"] == 12 and meta["n_users"] == 4 and meta["n_items"] == 4
    assert meta["files"]["ratings"]["sha256"] == hashlib.sha256(
        (data / "ratings.csv").read_bytes()).hexdigest()
    assert meta["content_hash"] == json.loads((good_artifact / "dataset.json").read_text())["content_hash"]
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_ratings"] == 12 and summary["n_failed"] == 0
    assert summary["share_items_with_image"] == 1.0 and summary["share_items_with_video"] == 0.0
    assert all(isinstance(x, (int, float, bool)) for x in summary.values() if x is not None)
    body = json.loads((report / "validation.json").read_text())
    assert body["passed"] is True and body["findings"] == []
    rules = {e["rule"] for e in body["expectations"]}
    # every rule of the contract is a GE expectation in the result
    assert {"required-columns", "not-null", "timestamp-parseable", "timestamp-plausible",
            "rating-numeric", "rating-range", "known-item", "known-user", "duplicate-interaction",
            "unique-key", "media-path", "missing-share", "text-length", "pii",
            "min-rows", "min-users", "min-items"} <= rules
    assert all(e["expectation"].startswith("expect_") for e in body["expectations"])
    assert "PASSED" in (report / "index.html").read_text()


def test_pure_function_returns_result_and_writes_nothing(tmp_path):
    data = write_dataset(tmp_path / "data")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = v.validate(data, {"min_ratings": 12})
    assert res.passed and res.findings == [] and res.dataset is not None
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not v.validate(data, {"min_ratings": 13}).passed  # min row count is enforced


def test_iso_timestamps_and_implicit_feedback_pass(tmp_path):
    r = pd.DataFrame(_ratings_rows()).drop(columns="rating")
    r["timestamp"] = pd.to_datetime(r["timestamp"].astype(int), unit="s", utc=True).dt.strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    res = v.validate(write_dataset(tmp_path / "d", ratings=r), {})
    assert res.passed, res.message()
    assert (res.dataset.ratings["rating"] == 1.0).all()
    assert res.dataset.ratings["timestamp"].iloc[0] == 881250000


def test_soft_findings_warn_but_pass(tmp_path, run_cli):
    data = write_dataset(tmp_path / "d")
    items = pd.read_csv(data / "items.csv", dtype=str)
    items.loc[1:, "image"] = None  # 3 of 4 items without image
    items["description"] = None
    items.to_csv(data / "items.csv", index=False)
    rc, err, out, report, before = run_cli(data)
    assert rc == 0
    assert tree_hash(out) != before  # new artifact written
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_warnings"] == 2 and summary["n_failed"] == 0
    assert summary["share_items_with_image"] == 0.25
    assert "warning" in err and "'image'" in err and "missing-share" in err


def test_data_docs_rendered_for_failed_run_without_personal_data(tmp_path, run_cli):
    data = write_dataset(tmp_path / "d")
    _emails(data)
    rc, _err, _out, report, _ = run_cli(data, data_docs=True)
    assert rc == 1
    pages = list((report / "data_docs" / "validations").rglob("*.html"))
    assert (report / "data_docs" / "index.html").is_file() and len(pages) == 3  # one per table
    assert "data_docs/index.html" in (report / "index.html").read_text()
    assert json.loads((report / "validation.json").read_text())["data_docs"] == "data_docs/index.html"
    for page in report.rglob("*.html"):
        assert "example.com" not in page.read_text(encoding="utf-8", errors="replace")


def test_cli_with_only_data(tmp_path, monkeypatch, capsys):
    data = write_dataset(tmp_path / "d")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert v.cli(["--data", str(data)]) == 0
    reports = list(tmp_path.glob("mmrec-validate-*/summary.json"))
    assert len(reports) == 1
    assert (reports[0].parent / "data_docs" / "index.html").is_file()  # Data Docs on by default
    assert "valid" in capsys.readouterr().err


def test_bad_params_exit_2(tmp_path, capsys):
    data = write_dataset(tmp_path / "d")
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"validate": {"rating_mx": 3}}), encoding="utf-8")
    assert v.main(["--data", str(data), "--params", str(p)]) == 2
    assert "rating_mx" in capsys.readouterr().err
    with pytest.raises(TypeError, match="allow_pii_columns"):
        v.merge_params({"allow_pii_columns": "email"})


# --------------------------------------------------------------------------- bad inputs

def _edit_csv(path: Path, fn) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)


def _set(table: str, row: int, col: str, value):
    """Set data row ``row`` (1-based as in the file) of ``table`` column ``col``."""

    def mutate(root: Path):
        def fn(df):
            df.loc[row - 1, col] = value
            return df
        _edit_csv(root / f"{table}.csv", fn)
    return mutate


def _drop_column(table, col):
    return lambda root: _edit_csv(root / f"{table}.csv", lambda df: df.drop(columns=col))


def _dup_row(table, row):
    def mutate(root):
        _edit_csv(root / f"{table}.csv",
                  lambda df: pd.concat([df, df.iloc[[row - 1]]], ignore_index=True))
    return mutate


def _empty(root):
    (root / "items.csv").write_bytes(b"")


def _header_only(root):
    (root / "ratings.csv").write_text("user_id,item_id,rating,timestamp\n", encoding="utf-8")


def _latin1(root):
    text = (root / "items.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    text[2] = text[2].replace("A film", "A caf\xe9 film")
    (root / "items.csv").write_bytes("".join(text[:2]).encode() + text[2].encode("latin-1")
                                     + "".join(text[3:]).encode())


def _media_dir(root):
    (root / "images" / "adir").mkdir()
    _set("items", 2, "image", "images/adir")(root)


def _symlink_out(root):
    outside = root.parent / "outside.jpg"
    outside.write_bytes(b"\xff\xd8secret")
    (root / "images" / "link.jpg").symlink_to(outside)
    _set("items", 4, "image", "images/link.jpg")(root)


def _emails(root):
    _edit_csv(root / "users.csv", lambda df: df.assign(email=[f"person{i}@example.com"
                                                                for i in range(len(df))]))


def _phones(root):
    _edit_csv(root / "users.csv", lambda df: df.assign(phone=[f"+1 555-010-{1000 + i}"
                                                                for i in range(len(df))]))


# name -> (mutation, file, column, rule, row or None, value or None)
BAD = {
    "missing_column": (_drop_column("ratings", "timestamp"), "ratings.csv", "timestamp",
                       "required-columns", None, None),
    "non_numeric_rating": (_set("ratings", 3, "rating", "abc"), "ratings.csv", "rating",
                           "rating-numeric", 3, "abc"),
    "negative_rating": (_set("ratings", 2, "rating", "-1"), "ratings.csv", "rating", "rating-range", 2,
                        "-1"),
    "rating_above_max": (_set("ratings", 7, "rating", "7.5"), "ratings.csv", "rating", "rating-range",
                         7, "7.5"),
    "null_user_id": (_set("ratings", 4, "user_id", ""), "ratings.csv", "user_id", "not-null", 4, None),
    "unknown_item": (_set("ratings", 5, "item_id", "999"), "ratings.csv", "item_id", "known-item", 5,
                     "999"),
    "unknown_user": (_set("ratings", 6, "user_id", "u-42"), "ratings.csv", "user_id", "known-user", 6,
                     "u-42"),
    "duplicate_item_key": (_set("items", 3, "item_id", "1"), "items.csv", "item_id", "unique-key", 3,
                           "1"),
    "duplicate_interaction": (_dup_row("ratings", 2), "ratings.csv", "user_id,item_id,timestamp",
                              "duplicate-interaction", 13, None),
    "empty_file": (_empty, "items.csv", None, "not-empty", None, None),
    "header_only": (_header_only, "ratings.csv", None, "min-rows", None, None),
    "non_utf8": (_latin1, "items.csv", None, "utf-8", 2, None),
    "path_traversal": (_set("items", 2, "image", "../x.jpg"), "items.csv", "image", "media-path", 2,
                       "'..'"),
    "absolute_media_path": (_set("items", 3, "image", "/etc/hostname"), "items.csv", "image",
                            "media-path", 3, "absolute"),
    "missing_media_file": (_set("items", 1, "image", "images/nope.jpg"), "items.csv", "image",
                           "media-path", 1, "does not exist"),
    "media_is_directory": (_media_dir, "items.csv", "image", "media-path", 2, "directory"),
    "symlink_leaves_dataset": (_symlink_out, "items.csv", "image", "media-path", 4, "outside"),
    "huge_text": (_set("items", 2, "description", "x" * 20001), "items.csv", "description",
                  "text-length", 2, None),
    "implausible_timestamp": (_set("ratings", 8, "timestamp", "99999999999"), "ratings.csv",
                              "timestamp", "timestamp-plausible", 8, "99999999999"),
    "ancient_iso_timestamp": (_set("ratings", 9, "timestamp", "1850-01-01T00:00:00Z"), "ratings.csv",
                              "timestamp", "timestamp-plausible", 9, "1850"),
    "unparseable_timestamp": (_set("ratings", 1, "timestamp", "yesterday"), "ratings.csv", "timestamp",
                              "timestamp-parseable", 1, "yesterday"),
    "email_column": (_emails, "users.csv", "email", "pii", 1, "e-mail addresses"),
    "phone_column": (_phones, "users.csv", "phone", "pii", 1, "phone numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_and_keeps_last_good_artifact(case, tmp_path, run_cli):
    mutate, file, column, rule, row, value = BAD[case]
    data = write_dataset(tmp_path / "data")
    mutate(data)
    rc, err, out, report, before = run_cli(data)
    assert rc == 1, err
    assert tree_hash(out) == before, "a failed run must not touch --out"
    assert "Traceback" not in err
    line = next((ln for ln in err.splitlines() if f"rule '{rule}'" in ln and "ERROR" in ln), None)
    assert line is not None, f"no ERROR line for rule {rule!r}:\n{err}"
    assert file in line
    if column:
        assert f"column '{column}'" in line
    if row is not None:
        assert re.search(rf"rows? (\d+, )*{row}\b", line), line
    if value is not None:
        assert value in line
    # the report is still written and names the failure
    body = json.loads((report / "validation.json").read_text())
    assert body["passed"] is False
    assert any(f["rule"] == rule and f["severity"] == "error" for f in body["findings"])
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_failed"] >= 1 and summary["passed"] is False
    assert "FAILED" in (report / "index.html").read_text()
    if rule == "pii":  # personal data never leaks into messages or reports
        for text in (err, (report / "validation.json").read_text(),
                     (report / "index.html").read_text()):
            assert "example.com" not in text and "555-010" not in text
    if body["expectations"] and rule not in ("utf-8", "not-empty"):
        # GE-checked rules show up as a failed expectation in the GE result
        assert any(e["rule"] == rule and not e["success"] for e in body["expectations"])


def test_pii_allow_list_passes(tmp_path, run_cli):
    data = write_dataset(tmp_path / "data")
    _emails(data)
    rc, err, out, _report, before = run_cli(data, allow_pii_columns=["users.email"])
    assert rc == 0, err
    assert tree_hash(out) != before
    rc, err, *_ = run_cli(data, allow_pii_columns=["email"])
    assert rc == 0, err


def test_pii_below_share_passes(tmp_path):
    r = pd.DataFrame(_ratings_rows() * 3)
    r["timestamp"] = [str(881250000 + k) for k in range(len(r))]
    r["note"] = ["ok"] * len(r)
    r.loc[0, "note"] = "mail me: a@b.org"  # 1 of 36 rows < 5 %
    res = v.validate(write_dataset(tmp_path / "d", ratings=r), {})
    assert res.passed, res.message()
    res = v.validate(tmp_path / "d", {"pii_share": 0.01})
    assert not res.passed and res.errors[0].rule == "pii"


def test_missing_table_and_directory(tmp_path):
    res = v.validate(tmp_path / "nope", {})
    assert not res.passed and res.errors[0].rule == "dataset-directory"
    data = write_dataset(tmp_path / "d")
    (data / "items.csv").unlink()
    res = v.validate(data, {})
    assert not res.passed and any(f.rule == "table-exists" and "items" in f.file for f in res.errors)


def test_users_table_optional(tmp_path):
    res = v.validate(write_dataset(tmp_path / "d", users=False), {})
    assert res.passed, res.message()
    assert res.dataset.users is None
    assert not any(e["rule"] == "known-user" for e in res.expectations)


def test_parquet_input_with_integer_ids(tmp_path):
    data = write_dataset(tmp_path / "d")
    r = pd.read_csv(data / "ratings.csv")  # ints
    r.to_parquet(data / "ratings.parquet", index=False)
    (data / "ratings.csv").unlink()
    res = v.validate(data, {})
    assert res.passed, res.message()
    assert res.dataset.ratings["user_id"].iloc[0] == "1"
    r.loc[2, "item_id"] = 999
    r.to_parquet(data / "ratings.parquet", index=False)
    res = v.validate(data, {})
    assert [(f.rule, f.rows) for f in res.errors] == [("known-item", [3])]


# --------------------------------------------------------------------------- real data

@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not (ML100K / "ratings.csv").exists(), reason="ml100k-mm dataset not present")
def test_ml100k_mm_passes(tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "report"
    rc = v.main(["--data", str(ML100K), "--out", str(out), "--report", str(report)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_ratings"] == 100000 and summary["n_failed"] == 0
    assert 0.5 < summary["share_items_with_image"] <= 1.0
    assert summary["share_items_with_video"] == 0.0
    assert len(pd.read_parquet(out / "ratings.parquet")) == 100000
