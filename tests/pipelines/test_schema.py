"""Unit tests for the data contract (pipelines/schema.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines import schema
from pipelines.schema import DataContractError


def _write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


RATINGS = "user_id,item_id,rating,timestamp\n1,10,4,881250949\n2,10,3.5,881250950\n2,11,5,881250951\n"
ITEMS = "item_id,title,image\n10,Toy Story,images/10.jpg\n11,Heat,\n"


def _dataset(tmp_path, ratings=RATINGS, items=ITEMS, users=None):
    _write(tmp_path / "ratings.csv", ratings)
    _write(tmp_path / "items.csv", items)
    if users is not None:
        _write(tmp_path / "users.csv", users)
    return tmp_path


# --------------------------------------------------------------------------- read_table

def test_read_table_reads_ids_as_strings(tmp_path):
    df = schema.read_table(_write(tmp_path / "r.csv", "user_id,item_id\n007,1\n,2\n"))
    assert df["user_id"].tolist()[0] == "007"  # leading zeros kept
    assert pd.isna(df["user_id"].iloc[1])  # empty field -> missing, not ''


@pytest.mark.parametrize("content, rule, rows", [
    (b"", "not-empty", []),
    (b"\n\n", "not-empty", []),
    (b"user_id,item_id\n1,2\n3,caf\xe9\n", "utf-8", [2]),
    (b"user_id,item_id\n1,2\x00\n", "no-nul-bytes", [1]),
    (b"user_id,user_id\n1,2\n", "unique-columns", []),
    (b'user_id,item_id\n1,2\n3,4,5,6\n', "csv-syntax", []),
])
def test_read_table_errors_name_file_rule_and_rows(tmp_path, content, rule, rows):
    path = _write(tmp_path / "ratings.csv", content)
    with pytest.raises(DataContractError) as info:
        schema.read_table(path)
    err = info.value
    assert err.rule == rule and err.rows == rows
    assert "ratings.csv" in str(err) and f"rule '{rule}'" in str(err)
    if rows:
        assert f"rows {rows[0]}" in str(err)


def test_read_table_missing_and_directory(tmp_path):
    with pytest.raises(DataContractError, match="file-exists"):
        schema.read_table(tmp_path / "nope.csv")
    with pytest.raises(DataContractError, match="file-exists"):
        schema.read_table(tmp_path)


def test_read_table_bad_parquet(tmp_path):
    path = _write(tmp_path / "ratings.parquet", b"this is not parquet")
    with pytest.raises(DataContractError, match="readable-parquet"):
        schema.read_table(path)


def test_error_message_lists_at_most_five_rows():
    err = DataContractError("x.csv", "rule-x", "bad", rows=list(range(1, 9)), column="c")
    assert str(err) == "x.csv, column 'c', rule 'rule-x': bad (rows 1, 2, 3, 4, 5, ...)"
    assert err.rows == list(range(1, 9)) and err.column == "c"


# --------------------------------------------------------------------------- load_raw

def test_load_raw_missing_table_and_column(tmp_path):
    with pytest.raises(DataContractError, match="dataset-directory"):
        schema.load_raw(tmp_path / "nope")
    _write(tmp_path / "ratings.csv", RATINGS)
    with pytest.raises(DataContractError) as info:
        schema.load_raw(tmp_path)
    assert info.value.rule == "table-exists" and "items" in str(info.value)
    _write(tmp_path / "items.csv", "title\nx\n")
    with pytest.raises(DataContractError) as info:
        schema.load_raw(tmp_path)
    assert info.value.rule == "required-columns" and info.value.column == "item_id"


def test_load_raw_users_optional_and_parquet_preferred(tmp_path):
    ds = schema.load_raw(_dataset(tmp_path))
    assert ds.users is None and set(ds.files) == {"ratings", "items"}
    pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "timestamp": [5, 6]}).to_parquet(
        tmp_path / "ratings.parquet")
    ds = schema.load_raw(tmp_path)
    assert ds.files["ratings"].suffix == ".parquet" and len(ds.ratings) == 2


# --------------------------------------------------------------------------- normalise

def test_normalise_types_and_column_order(tmp_path):
    ds = schema.normalise(schema.load_raw(_dataset(tmp_path, users="user_id,age\n1,20\n2,30\n")))
    r = ds.ratings
    assert list(r.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert r["timestamp"].dtype == np.int64 and r["rating"].dtype == np.float32
    assert r["rating"].tolist() == [4.0, 3.5, 5.0]
    assert r["user_id"].tolist() == ["1", "2", "2"]
    assert ds.items["image"].tolist()[0] == "images/10.jpg"  # media paths stay relative
    assert pd.isna(ds.items["image"].iloc[1])
    assert ds.users["user_id"].tolist() == ["1", "2"]


def test_normalise_implicit_feedback_gets_rating_one(tmp_path):
    ds = schema.normalise(schema.load_raw(_dataset(
        tmp_path, ratings="user_id,item_id,timestamp,extra\n1,10,5,a\n2,11,6,b\n")))
    assert ds.ratings["rating"].tolist() == [1.0, 1.0]
    assert ds.ratings["rating"].dtype == np.float32
    assert list(ds.ratings.columns) == ["user_id", "item_id", "timestamp", "rating", "extra"]


def test_iso_timestamps_become_unix_seconds(tmp_path):
    ds = schema.normalise(schema.load_raw(_dataset(
        tmp_path, ratings="user_id,item_id,timestamp\n1,10,1997-12-04T15:55:49Z\n"
                          "2,10,1970-01-02T00:00:00+00:00\n2,11,881250949\n")))
    assert ds.ratings["timestamp"].tolist() == [881250949, 86400, 881250949]


def test_to_timestamp_seconds_marks_unparseable_as_nan():
    out = schema.to_timestamp_seconds(pd.Series(["10", "yesterday", "1970-01-01T00:01:00Z", None],
                                                dtype="str"))
    assert out.iloc[0] == 10 and np.isnan(out.iloc[1]) and out.iloc[2] == 60 and np.isnan(out.iloc[3])


def test_parquet_input_with_integer_ids_normalises_to_strings(tmp_path):
    pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "rating": [4, 5],
                  "timestamp": [881250949, 881250950]}).to_parquet(tmp_path / "ratings.parquet")
    pd.DataFrame({"item_id": [10, 11], "title": ["a", "b"]}).to_parquet(tmp_path / "items.parquet")
    ds = schema.normalise(schema.load_raw(tmp_path))
    assert ds.ratings["user_id"].tolist() == ["1", "2"]
    assert ds.ratings["item_id"].tolist() == ["10", "11"] and ds.items["item_id"].tolist() == ["10", "11"]
    assert ds.ratings["timestamp"].dtype == np.int64 and ds.ratings["rating"].dtype == np.float32


def test_table_path_and_split_list(tmp_path):
    assert schema.table_path(tmp_path, "items") is None
    _write(tmp_path / "items.csv", ITEMS)
    assert schema.table_path(tmp_path, "items").name == "items.csv"
    assert schema.split_list(" Drama | Comedy||") == ["Drama", "Comedy"]
    assert schema.split_list(None) == [] and schema.split_list(float("nan")) == []
    assert schema.split_list(pd.NA) == []
