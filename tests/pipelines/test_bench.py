"""pipelines.bench: protocol overrides, result shape and the printed table."""

from __future__ import annotations

import pytest

from pipelines import bench


def test_protocols_follow_the_published_settings():
    st, cs = bench.PROTOCOLS["stratified"]["split"], bench.PROTOCOLS["coldstart"]["split"]
    assert (st["ratio"], st["seed"], st["cold_item_fraction"], st["cold_user_fraction"]) == (0.75, 42, 0.0, 0.0)
    assert (cs["cold_item_fraction"], cs["cold_user_max"]) == (0.1, 5)


def test_merge_overrides_nested_keys_only():
    base = {"split": {"ratio": 0.8, "seed": 1, "val_ratio": 0.1}, "fuse": {"k": 10}}
    out = bench._merge(base, {"split": {"ratio": 0.75}})
    assert out == {"split": {"ratio": 0.75, "seed": 1, "val_ratio": 0.1}, "fuse": {"k": 10}}
    assert base["split"]["ratio"] == 0.8  # input untouched


def test_table_lists_models_by_ndcg_and_stage_seconds():
    row = lambda x, n: {"ndcg@10": x, "precision@10": x / 2, "recall@10": x / 3, "map@10": x / 4, "n_users": n}
    result = {
        "stratified": {"ease": {"all": row(0.48, 943)}, "hybrid": {"all": row(0.50, 943)},
                       "popularity": {"all": row(0.25, 943), "cold_users": row(0.1, 0)}},
        "seconds": {"fit_cf": 12.5, "split": 3.0},
        "seconds_by_protocol": {"stratified": {"split": 1.0, "fit_cf": 5.0},
                                "coldstart": {"split": 2.0, "fit_cf": 7.5}},
        "peak_rss_mb": {"stratified": {"split": 100.0, "fit_cf": 900.0},
                        "coldstart": {"split": 120.0, "fit_cf": 800.0}},
        "machine": {"cpu_count": 2},
    }
    text = bench.table(result)
    lines = text.splitlines()
    order = [ln.split("|")[1].strip() for ln in lines if ln.startswith("| ") and "| all |" in ln]
    assert order == ["hybrid", "ease", "popularity"]
    assert "| hybrid | all | 943 | 0.5000 |" in text
    assert not any("cold_users" in ln for ln in lines)  # empty slice left out
    assert "| fit_cf | 5.0 | 7.5 | 12.5 | 900 |" in text
    assert "machine" not in text and "seconds_by_protocol" not in text


def test_stage_rows_follow_the_graph_order():
    result = {"seconds": {"fuse": 1.0, "validate": 2.0, "evaluate": 3.0},
              "seconds_by_protocol": {"p": {"fuse": 1.0, "validate": 2.0, "evaluate": 3.0}},
              "peak_rss_mb": {"p": {"fuse": 1.0, "validate": 1.0, "evaluate": 1.0}}}
    rows = [ln.split("|")[1].strip() for ln in bench.table(result).splitlines() if ln.startswith("| ")]
    assert rows[1:] == ["validate", "fuse", "evaluate"]


@pytest.mark.parametrize("reuse", [False, True])
def test_each_protocol_runs_in_an_empty_workdir_unless_reuse_is_asked(tmp_path, monkeypatch, reuse):
    seen = {}

    def fake_run(data, name, overrides, workdir, params_file):
        seen[name] = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else None
        return {"metrics": {}, "seconds": {"fuse": 1.0}, "peak_rss_mb": {"fuse": 1}, "cpu_seconds": {}}

    monkeypatch.setattr(bench, "run_protocol", fake_run)
    (tmp_path / "data").mkdir()
    for name in bench.PROTOCOLS:  # what an earlier run persisted there (caches, models)
        (tmp_path / "runs" / name / "artifacts").mkdir(parents=True)
    argv = ["--data", str(tmp_path / "data"), "--workdir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "bench.json")] + (["--reuse-workdir"] if reuse else [])
    assert bench.main(argv) == 0
    assert seen == {name: (["artifacts"] if reuse else None) for name in bench.PROTOCOLS}
