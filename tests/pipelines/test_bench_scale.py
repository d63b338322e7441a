"""Scale benchmark helpers: catalogue sizing, the +5% increment cut, table and plot."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines import bench_scale, demo


def test_catalogue_grows_users_linearly_and_items_sublinearly():
    a, b = bench_scale.catalogue(1_000_000), bench_scale.catalogue(5_000_000)
    assert a["users"] == 20_000 and b["users"] == 100_000
    assert a["items"] == 3000 and 3000 < b["items"] < 5 * 3000
    assert a["images"] and not a["videos"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    demo.generate(root / "full", n_users=200, n_items=80, interactions_per_user=20, with_videos=False,
                  image_size=32, fmt="parquet")
    return root


def test_split_increment_holds_out_new_users_items_and_the_latest_rows(dataset):
    full, base = dataset / "full", dataset / "base"
    info = bench_scale.split_increment(full, base, share=0.05, new_share=0.02)
    r_full = pd.read_parquet(full / "ratings.parquet")
    r_base = pd.read_parquet(base / "ratings.parquet")
    assert info["n_base"] == len(r_base) and info["n_base"] + info["n_increment"] == len(r_full)
    assert abs(info["increment_share"] - 0.05) < 0.01
    items_full = pd.read_parquet(full / "items.parquet")
    items_base = pd.read_parquet(base / "items.parquet")
    users_base = pd.read_parquet(base / "users.parquet")
    new_items = set(items_full["item_id"]) - set(items_base["item_id"])
    new_users = set(pd.read_parquet(full / "users.parquet")["user_id"]) - set(users_base["user_id"])
    assert len(new_items) == info["new_items"] == 1 and len(new_users) == info["new_users"] == 4
    assert not r_base["item_id"].isin(new_items).any() and not r_base["user_id"].isin(new_users).any()
    # the rest of the increment is the most recent interactions of the other users and items
    old = r_full[~r_full["item_id"].isin(new_items) & ~r_full["user_id"].isin(new_users)]
    held = old.merge(r_base, how="left", indicator=True)
    held = held[held["_merge"] == "left_only"]
    assert len(held) > 0 and held["timestamp"].min() >= r_base["timestamp"].max()
    # base images: every base item's poster, hard-linked, none of the new items'
    for rel in items_base["image"].dropna():
        assert (base / rel).is_file() and not (base / rel).is_symlink()
    for rel in items_full.loc[items_full["item_id"].isin(new_items), "image"].dropna():
        assert not (base / rel).exists()


def _fake(sizes, totals, inc_total=None):
    out = {}
    for s, t in zip(sizes, totals):
        out[str(s)] = {"seconds": {"split": t * 0.25, "fit_cf": t * 0.75},
                       "cpu_seconds": {"split": t * 0.2, "fit_cf": t * 0.6},
                       "peak_rss_mb": {"split": 100.0, "fit_cf": 300.0}, "total_seconds": t,
                       "total_cpu_seconds": t * 0.8, "peak_rss_mb_max": 300.0}
        if inc_total is not None:
            out[str(s)]["incremental"] = {"seconds": {"split": 1.0, "fit_cf": inc_total - 1.0},
                                          "n_base": int(s * 0.95), "n_increment": s - int(s * 0.95),
                                          "total_seconds": inc_total, "ratio": inc_total / t,
                                          "total_cpu_seconds": inc_total, "cpu_ratio": inc_total / t}
    return out


def test_table_and_plot(tmp_path):
    res = _fake([1000, 5000], [10.0, 40.0], inc_total=3.0)
    res["machine"] = {"cpu_count": 2}
    text = bench_scale.table(res)
    assert "| fit_cf | 7.5 | 6.0 | 300 | 30.0 | 24.0 | 300 |" in text
    assert "time(5,000) / time(1,000) = 4.00 wall" in text
    three = _fake([1000, 5000, 20000], [10.0, 40.0, 100.0], inc_total=3.0)
    text3 = bench_scale.table(three)
    assert "time(20,000) / time(5,000) = 2.50 wall" in text3  # each size against the next
    assert "time(20,000) / time(1,000) = 10.00 wall" in text3
    assert "| 1,000 | 10 (8) | 3 (3) | 0.30 (0.30)" in text
    png = tmp_path / "b.png"
    assert bench_scale.plot(res, png) == ("log", "log")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(res)  # what main() writes


def test_reuse_reads_what_the_stages_write(tmp_path):
    """The rerun's reuse record comes from the stages' own outputs (feature meta, warm starts)."""
    from pipelines.io import write_json

    a = tmp_path / "artifacts"
    write_json(a / "preprocess_text" / "meta.json",
               {"n_items": 10, "n_encoded_this_run": 1, "n_reused_from_cache": 9, "dim": 4})
    write_json(a / "train_encoder" / "metrics.json",
               {"warm_start": {"used": True, "changed_users": 3}, "epochs_run": 2, "train_seconds": 1.5})
    write_json(a / "fit_cf" / "summary.json", {"warm_start": {"full/als": {"used": True}}})
    r = bench_scale._reuse(tmp_path)
    assert r["preprocess_text"] == {"n_items": 10, "n_encoded_this_run": 1, "n_reused_from_cache": 9}
    assert r["train_encoder"]["warm_start"]["used"] and r["train_encoder"]["epochs_run"] == 2
    assert r["fit_cf"] == {"full/als": {"used": True}}
    assert "preprocess_image" not in r


def test_detail_keeps_the_cold_runs_tuning_and_fuse_phases(tmp_path):
    """The cold run's inside figures are read before the rerun overwrites its outputs."""
    from pipelines.io import write_json

    a = tmp_path / "artifacts"
    assert bench_scale._detail(tmp_path) == {}
    write_json(a / "fit_cf" / "summary.json", {
        "seconds": {"full/als": 2.0}, "warm_start": {},
        "tuning": {"als": {"key": "k", "chosen": {"factors": 8}, "seconds": 3.5, "reused": False,
                           "results": [{"params": {"factors": 8}, "ndcg@10": 0.2}]}}})
    write_json(a / "fuse" / "summary.json", {"seconds": {"train_ranker": 9.0, "total": 20.0}, "k": 50})
    d = bench_scale._detail(tmp_path)
    assert d["fit_cf"]["seconds"] == {"full/als": 2.0}
    assert d["fit_cf"]["tuning"]["als"]["chosen"] == {"factors": 8}
    assert "key" not in d["fit_cf"]["tuning"]["als"]
    assert d["fuse"] == {"seconds": {"train_ranker": 9.0, "total": 20.0}}


@pytest.mark.parametrize("incremental", [False, True])
def test_the_cold_run_starts_from_an_empty_workspace(tmp_path, monkeypatch, incremental):
    """A workspace left by an earlier run (feature caches, warm-start models) must not serve the
    cold run; the incremental rerun does start from the cold run's workspace."""
    from pipelines import bench

    seen = []

    def fake_run(data_dir, name, proto, wd, params):
        seen.append((name, sorted(p.name for p in wd.iterdir()) if wd.exists() else None))
        wd.mkdir(parents=True, exist_ok=True)
        (wd / f"left-by-{name}").write_text("x")
        return {"seconds": {"fuse": 1.0}, "peak_rss_mb": {"fuse": 1}, "cpu_seconds": {"fuse": 1.0},
                "metrics": {}}

    monkeypatch.setattr(bench, "run_protocol", fake_run)
    monkeypatch.setattr(bench_scale, "generate", lambda size, out, log: {"generate_seconds": 0})
    monkeypatch.setattr(bench_scale, "split_increment", lambda full, base: {"n_base": 1})
    monkeypatch.setattr(bench_scale, "_reuse", lambda wd: {})
    data = tmp_path / "data-1000"
    data.mkdir()
    pd.DataFrame({"user_id": ["u"], "item_id": ["i"]}).to_parquet(data / "ratings.parquet")
    for stale in ("run-1000", "inc-1000"):
        (tmp_path / stale / "artifacts").mkdir(parents=True)
    bench_scale.run_size(1000, tmp_path, tmp_path / "params.yaml", incremental, log=None)
    if incremental:
        assert seen == [("1000-base", None), ("1000-incremental", ["left-by-1000-base"])]
    else:
        assert seen == [("1000", None)]
