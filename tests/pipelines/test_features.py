"""Feature-table contract, content-hash cache, device selection."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.features import (
    FeatureCache,
    build_table,
    cell_float,
    cell_str,
    content_hash,
    file_hash,
    l2_normalise,
    load_items,
    read_features,
    read_meta,
    select_device,
    set_threads,
    summarise,
    write_features,
)
from pipelines.io import atomic_path


def _table(n=4, d=3, seed=0, model_id="m1"):
    rng = np.random.default_rng(seed)
    emb = l2_normalise(rng.standard_normal((n, d)))
    present = np.array([True, False] * (n // 2))
    reasons = [None if p else "no-text" for p in present]
    hashes = [f"h{i}" for i in range(n)]
    return build_table([str(i) for i in range(n)], emb, present, reasons, hashes, model_id,
                       extra={"width": np.arange(n)}), emb, present


def test_content_hash_depends_on_data_and_params():
    a = content_hash("some text", {"max_length": 256})
    assert a == content_hash("some text", {"max_length": 256})
    assert a == content_hash(b"some text", {"max_length": 256})
    assert a != content_hash("some text!", {"max_length": 256})
    assert a != content_hash("some text", {"max_length": 128})
    # param order does not matter
    assert content_hash("x", {"a": 1, "b": 2}) == content_hash("x", {"b": 2, "a": 1})


def test_file_hash_matches_content_hash(tmp_path):
    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    assert file_hash(p, {"k": 1}, chunk=1000) == content_hash(data, {"k": 1})


def test_build_table_zeroes_missing_rows_and_sets_reasons():
    table, emb, present = _table()
    got = np.stack(table["embedding"].to_numpy())
    assert (got[~present] == 0).all()
    np.testing.assert_allclose(got[present], emb[present])
    assert table["reason"].isna().tolist() == present.tolist()
    assert (table.loc[~present, "reason"] == "no-text").all()
    assert list(table.columns[:6]) == ["item_id", "present", "reason", "embedding",
                                       "content_hash", "model_id"]


@pytest.mark.parametrize("bad", ["dup", "len", "nan"])
def test_build_table_rejects_inconsistent_input(bad):
    ids, emb = ["a", "b"], np.ones((2, 3), np.float32)
    present, reasons, hashes = np.array([True, True]), [None, None], ["", ""]
    if bad == "dup":
        ids = ["a", "a"]
    elif bad == "len":
        emb = np.ones((3, 3), np.float32)
    else:
        emb[1, 0] = np.nan
    with pytest.raises(ValueError):
        build_table(ids, emb, present, reasons, hashes, "m")


def test_write_read_roundtrip(tmp_path):
    table, emb, present = _table(n=6, d=5)
    meta = summarise(table, dim=5, model_id="m1", n_encoded=3, n_reused=0, seconds=0.5)
    with atomic_path(tmp_path / "out", is_dir=True) as tmp:
        write_features(tmp, table, meta)
    ids, got, pres, t2 = read_features(tmp_path / "out")
    assert ids.tolist() == [str(i) for i in range(6)] and all(isinstance(i, str) for i in ids)
    assert got.dtype == np.float32 and got.shape == (6, 5)
    np.testing.assert_array_equal(pres, present)
    np.testing.assert_allclose(got[present], emb[present])
    assert (got[~present] == 0).all()
    assert t2["width"].tolist() == list(range(6))
    schema = pq.read_schema(tmp_path / "out" / "features.parquet")
    assert str(schema.field("embedding").type) in ("list<item: float>", "list<element: float>")
    assert str(schema.field("item_id").type) == "string"
    m = read_meta(tmp_path / "out")
    assert m == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (m["n_items"], m["n_present"], m["n_missing"], m["dim"]) == (6, 3, 3, 5)
    assert m["missing_reasons"] == {"no-text": 3}


def test_cache_reuses_only_same_hash_and_model(tmp_path):
    table, emb, _present = _table(n=4, d=3, model_id="m1")
    with atomic_path(tmp_path / "out", is_dir=True) as tmp:
        write_features(tmp, table, summarise(table, dim=3, model_id="m1", n_encoded=4,
                                             n_reused=0, seconds=0))
    cache = FeatureCache.load(tmp_path / "out")
    assert len(cache) == 2  # only present rows
    rec = cache.get("h0", "m1")
    np.testing.assert_allclose(rec["embedding"], emb[0])
    assert rec["width"] == 0
    assert cache.get("h0", "m2") is None  # other model
    assert cache.get("h1", "m1") is None  # was missing
    assert cache.get("hX", "m1") is None
    assert cache.get("h0", "m1", dim=7) is None  # other dimension
    assert len(FeatureCache.load(tmp_path / "out", enabled=False)) == 0
    assert len(FeatureCache.load(tmp_path / "nothing-here")) == 0


def test_cache_ignores_unreadable_previous_table(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "features.parquet").write_bytes(b"garbage, not parquet")
    assert len(FeatureCache.load(tmp_path / "out")) == 0


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            select_device("cuda")


def test_set_threads_restores():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) >= 1
    finally:
        torch.set_num_threads(before)


def test_load_items_reads_csv_or_parquet_with_str_ids(tmp_path):
    df = pd.DataFrame({"item_id": [1, 2], "title": ["a", None]})
    df.to_parquet(tmp_path / "items.parquet", index=False)
    got = load_items(tmp_path)
    assert got["item_id"].tolist() == ["1", "2"]
    pd.DataFrame({"item_id": [1, 1]}).to_parquet(tmp_path / "items.parquet", index=False)
    with pytest.raises(ValueError, match="duplicate"):
        load_items(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_items(tmp_path / "none")


def test_cell_helpers():
    assert cell_str(None) == "" and cell_str(pd.NA) == "" and cell_str(float("nan")) == ""
    assert cell_str(3) == "3"
    assert np.isnan(cell_float(pd.NA)) and cell_float("2.5") == 2.5


def test_prepare_cpu_runtime_defaults_and_respects_user_env():
    import os
    import subprocess
    import sys

    code = ("import os; from pipelines.features import prepare_cpu_runtime; prepare_cpu_runtime(); "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=root)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "ACTIVE"
