"""Property tests: the validator (``python -m pipelines validate``) on hostile datasets.

Each example is a dataset directory whose tables are hostile CSV or parquet
files (see :mod:`tests.hostile`) next to a media folder holding a good file, a
directory, a FIFO and a symlink leaving the dataset.  The command's only
allowed outcomes are exit 0 (valid: the normalised artifact is written) or
exit 1 (invalid: every ERROR line on stderr names a file and a rule, the
report is written as strict JSON, ``--out`` is not touched).  Any other
exception, a traceback, a crash or a hang fails.  Examples are bounded by
hypothesis' deadline, the tests by pytest-timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipelines.__main__ import main as pipelines_main
from tasks import validate as v
from tests import hostile
from tests.fixtures import ROOT

# examples per test (quoted in README "Guarantees")
N_CLI_CSV = 30
N_PARQUET = 25

SETTINGS = dict(deadline=timedelta(seconds=30), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
# lenient row-count minimums so that some hostile datasets pass and the artifact path runs too
PARAMS = {"data_docs": False, "min_ratings": 1, "min_items": 1, "min_users": 1}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module", autouse=True)
def _warm_up():
    """Import Great Expectations once, so the first example is not charged for it."""
    with tempfile.TemporaryDirectory() as d:
        v.validate(Path(d) / "missing", PARAMS)


def _media(root: Path) -> None:
    img = root / "images"
    img.mkdir()
    (img / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 tiny")
    (img / "dir").mkdir()
    os.mkfifo(img / "fifo.jpg")  # stat only: validation must never open (and block on) it
    (root.parent / "outside.jpg").write_bytes(b"secret")
    os.symlink(root.parent / "outside.jpg", img / "link.jpg")


def _table_files(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.is_file()]


def _run_cli(root: Path, work: Path) -> tuple[int, str, Path, Path]:
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump({"validate": PARAMS}), encoding="utf-8")
    out, report = work / "out", work / "report"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = pipelines_main(["validate", "--data", str(root), "--out", str(out), "--report", str(report),
                             "--params", str(params)])
    return rc, err.getvalue(), out, report


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _check_outcome(root: Path, rc: int, err: str, out: Path, report: Path) -> None:
    assert rc in (0, 1), err
    assert "Traceback" not in err, err
    body = json.loads((report / "validation.json").read_text(encoding="utf-8"),
                      parse_constant=_no_constants)  # strict JSON: no NaN / Infinity
    json.loads((report / "summary.json").read_text(encoding="utf-8"), parse_constant=_no_constants)
    assert body["passed"] is (rc == 0)
    if rc == 1:
        assert not out.exists(), "an invalid dataset must not write --out"
        errors = [ln for ln in err.splitlines() if ln.lstrip().startswith("ERROR:")]
        assert errors, err
        names = _table_files(root) + [root.name, "ratings.csv", "items.csv"]
        for line in errors:
            assert re.search(r"rule '[a-z0-9-]+'", line), line
            assert any(n in line for n in names), line
        for f in body["findings"]:
            assert f["file"] and f["rule"]
        event("invalid: " + ",".join(sorted({f["rule"] for f in body["findings"]
                                             if f["severity"] == "error"}))[:60])
    else:
        ratings = pd.read_parquet(out / "ratings.parquet")
        assert list(ratings.columns[:4]) == ["user_id", "item_id", "timestamp", "rating"]
        assert ratings["timestamp"].dtype == "int64" and ratings["rating"].dtype == "float32"
        json.loads((out / "dataset.json").read_text(encoding="utf-8"))
        event("valid")


def _random_csv_dataset():
    """Tables drawn from scratch: headers usually hold the required names, cells often hostile."""
    def table(required, rows):
        return hostile.contract_header(required).flatmap(lambda names: hostile.csv_bytes(names, rows))
    return st.fixed_dictionaries(
        {"ratings": table(("user_id", "item_id", "timestamp", "rating"), 14),
         "items": table(("item_id", "title", "image", "genres"), 6)},
        optional={"users": table(("user_id", "age"), 6)})


@settings(max_examples=N_CLI_CSV, **SETTINGS)
@given(ds=st.one_of(hostile.mutated_dataset(), _random_csv_dataset()))
def test_validate_cli_on_hostile_csv_datasets(ds):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        root.mkdir()
        _media(root)
        for table, data in ds.items():
            (root / f"{table}.csv").write_bytes(data)
        rc, err, out, report = _run_cli(root, Path(d))
        _check_outcome(root, rc, err, out, report)


def _with_media(table: pa.Table, values: list) -> pa.Table:
    col = pa.array([values[i % len(values)] for i in range(table.num_rows)], type=pa.string())
    return table.append_column("image", col)


@settings(max_examples=N_PARQUET, **SETTINGS)
@given(ratings=hostile.arrow_tables(), items=hostile.arrow_tables(required=("item_id", "title")),
       media=st.lists(st.sampled_from(hostile.MEDIA_CELLS), min_size=1, max_size=4),
       users=st.one_of(st.none(), hostile.arrow_tables(required=("user_id", "age"))),
       typed=st.one_of(st.none(), hostile.typed_base_tables()), ratings_as_csv=st.booleans())
def test_validate_cli_on_hostile_parquet_datasets(ratings, items, media, users, typed, ratings_as_csv):
    """Arbitrary Arrow types under the contract's names; or the valid base dataset with a random
    (compatible) type per column, so that the valid path (normalise + artifact) runs too."""
    if typed is not None:
        ratings, items, users = typed["ratings"], typed["items"], typed["users"]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        root.mkdir()
        _media(root)
        if ratings_as_csv and len(set(ratings.column_names)) == ratings.num_columns:
            ratings.to_pandas().to_csv(root / "ratings.csv", index=False)  # text ratings, typed items
        else:
            (root / "ratings.parquet").write_bytes(hostile.parquet_bytes(ratings))
        if "image" not in items.column_names:
            items = _with_media(items, media)
        (root / "items.parquet").write_bytes(hostile.parquet_bytes(items))
        if users is not None:
            (root / "users.parquet").write_bytes(hostile.parquet_bytes(users))
        rc, err, out, report = _run_cli(root, Path(d))
        _check_outcome(root, rc, err, out, report)


# --------------------------------------------------------------------------- fixed cases

def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    df.to_parquet(path, index=False)


def test_nul_byte_in_media_path_is_a_finding_not_a_crash(tmp_path):
    """Found by the property test: a NUL in a parquet media path crashed os.path.realpath."""
    root = tmp_path / "data"
    root.mkdir()
    _media(root)
    _write_parquet(root / "ratings.parquet", pd.DataFrame({
        "user_id": ["1", "2"], "item_id": ["a", "b"], "timestamp": [881250949, 881250950]}))
    _write_parquet(root / "items.parquet", pd.DataFrame({
        "item_id": ["a", "b"], "image": ["images/a.jpg", "images/a.jpg\x00.png"]}))
    res = v.validate(root, PARAMS)
    assert not res.passed
    [f] = res.errors
    assert (f.rule, f.column, f.rows) == ("media-path", "image", [2]) and "NUL byte" in str(f)


def _base_dataset(root: Path) -> Path:
    root.mkdir()
    _media(root)
    for name, rows in hostile.base_tables().items():
        pd.DataFrame(rows[1:], columns=rows[0]).to_csv(root / f"{name}.csv", index=False)
    return root


def test_personal_data_in_an_underscore_column_is_flagged(tmp_path):
    """Found while writing the property tests: columns named "_..." skipped the PII rule."""
    root = _base_dataset(tmp_path / "data")
    users = pd.read_csv(root / "users.csv", dtype=str)
    users["_contact"] = [f"person{i}@example.com" for i in range(len(users))]
    users.to_csv(root / "users.csv", index=False)
    res = v.validate(root, PARAMS)
    assert [(f.rule, f.column) for f in res.errors] == [("pii", "_contact")]
    assert "example.com" not in res.message()


def test_raw_column_named_like_a_helper_is_rejected(tmp_path):
    """A raw "_item_known" column would be silently replaced by the helper of the same name."""
    root = _base_dataset(tmp_path / "data")
    ratings = pd.read_csv(root / "ratings.csv", dtype=str)
    ratings["_item_known"] = "True"
    ratings.to_csv(root / "ratings.csv", index=False)
    res = v.validate(root, PARAMS)
    assert [(f.rule, f.column) for f in res.errors] == [("reserved-column-names", "_item_known")]
    assert "ratings.csv" in str(res.errors[0])


@pytest.mark.parametrize("kind", ["nested-ids", "binary-ids", "ancient-timestamps", "empty-name",
                                  "duplicate-names"])
def test_typed_parquet_problems_are_findings(tmp_path, kind):
    """Crashes the property test found in typed parquet input, each now a finding naming file + rule."""
    root = tmp_path / "data"
    root.mkdir()
    _media(root)
    ratings = pa.table({"user_id": ["1", "2"], "item_id": ["a", "b"], "timestamp": [881250949, 881250950]})
    rule = {"nested-ids": "scalar-values", "binary-ids": "text-not-binary", "ancient-timestamps": None,
            "empty-name": "column-names", "duplicate-names": "unique-columns"}[kind]
    if kind == "nested-ids":
        ratings = ratings.set_column(1, "item_id", pa.array([[1], [2, 3]]))
    elif kind == "binary-ids":
        ratings = ratings.set_column(0, "user_id", pa.array([b"\xb6\x00", b"2"]))
    elif kind == "ancient-timestamps":  # outside pandas' nanosecond range: year 59 and 9999
        ratings = ratings.set_column(2, "timestamp", pa.array(
            [datetime(59, 11, 29), datetime(9999, 1, 1)], type=pa.timestamp("us")))
    elif kind == "empty-name":
        ratings = ratings.append_column("", pa.array([1, 2]))
    else:
        ratings = pa.Table.from_arrays(ratings.columns + [ratings.column(0)],
                                       names=ratings.column_names + ["user_id"])
    (root / "ratings.parquet").write_bytes(hostile.parquet_bytes(ratings))
    pd.DataFrame({"item_id": ["a", "b"], "image": ["images/a.jpg", None]}).to_parquet(
        root / "items.parquet", index=False)
    res = v.validate(root, PARAMS)
    assert not res.passed
    if rule is None:  # converted, then judged implausible (years 1970..2100)
        f = next(f for f in res.errors if f.rule == "timestamp-plausible")
        assert f.rows == [1, 2]
    else:
        f = next(f for f in res.errors if f.rule == rule)
        assert "ratings.parquet" in str(f) and f"rule '{rule}'" in str(f)


def test_cli_subprocess_on_hostile_dataset_exits_1_without_traceback(tmp_path):
    """The real command line (a separate process, hard time limit) on a batch of bad files."""
    root = tmp_path / "data"
    root.mkdir()
    _media(root)
    (root / "ratings.csv").write_bytes(b"user_id,item_id,timestamp,rating\r\n1,a,nan,inf\r\n"
                                       b"1,a,nan,inf\r\n\xef\xbb\xbf2,\"b,3\n")
    _write_parquet(root / "items.parquet", pd.DataFrame({
        "item_id": ["a", "a", None], "image": ["images/link.jpg", "images/fifo.jpg", "../outside.jpg"],
        "title": ["x" * 30_000, "person@example.com", "+1 555-010-1234"]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "pipelines", "validate", "--data", str(root),
                          "--report", str(tmp_path / "report")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert re.search(r"ERROR: .*ratings\.csv.*rule '", res.stderr), res.stderr
