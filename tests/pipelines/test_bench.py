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


def test_summarise_seeds_gives_values_in_seed_order_with_mean_min_max():
    runs = {42: ({"all": {"ndcg@10": 0.50, "recall@10": 0.20, "n_users": 9},
                  "cold_items": {"ndcg@10": float("nan")}}, None),
            1: ({"all": {"ndcg@10": 0.47, "recall@10": 0.22, "n_users": 9},
                 "cold_items": {"ndcg@10": float("nan")}}, 12.5),
            2: ({"all": {"ndcg@10": 0.53, "recall@10": 0.21, "n_users": 9},
                 "cold_items": {"ndcg@10": float("nan")}}, 13.0)}
    s = bench.summarise_seeds(runs)
    assert s["seeds"] == [42, 1, 2] and s["seconds"] == [None, 12.5, 13.0]
    nd = s["hybrid"]["all"]["ndcg@10"]
    assert nd["values"] == [0.50, 0.47, 0.53]
    assert nd["mean"] == pytest.approx(0.50) and (nd["min"], nd["max"]) == (0.47, 0.53)
    assert "n_users" not in s["hybrid"]["all"] and "cold_items" not in s["hybrid"]  # empty slice
    text = "\n".join(bench.seed_lines({"stratified": s}))
    assert "hybrid over fuse seeds 42 / 1 / 2" in text
    assert "| all | ndcg@10 | 0.5000 / 0.4700 / 0.5300 | 0.5000 | 0.0600 |" in text


def _protocol_dir(tmp_path, seed=42):
    import json

    import yaml

    wd = tmp_path / "stratified"
    (wd / "reports/evaluate").mkdir(parents=True)
    params = {"split": {"seed": 42}, "fuse": {"seed": seed, "k": 50}, "evaluate": {"ks": [10]}}
    (wd / "params.yaml").write_text(yaml.safe_dump(params))
    (wd / "reports/evaluate/metrics.json").write_text(
        json.dumps({"hybrid": {"all": {"ndcg@10": 0.5, "n_users": 3}}, "als": {}}))
    return wd, params


def test_fuse_seed_runs_rerun_fuse_and_evaluate_cold_with_only_the_seed_changed(tmp_path, monkeypatch):
    import json
    import shlex

    import yaml

    wd, params = _protocol_dir(tmp_path)
    stale = wd / "artifacts/fuse_seed7"
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text("{}")  # an earlier run's ranker: must not be reused
    calls = []

    def fake_run_stage(cmd, cwd, log):
        argv = shlex.split(cmd)
        opts = {argv[i][2:]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
        p = yaml.safe_load((cwd / opts["params"]).read_text())
        calls.append((argv[2], opts, p))
        if argv[2] == "tasks.fuse":
            assert not (cwd / opts["out"] / "summary.json").exists()
        if argv[2] == "tasks.evaluate":
            out = cwd / opts["out"]
            out.mkdir(parents=True)
            seed = p["fuse"]["seed"]
            (out / "metrics.json").write_text(json.dumps({"hybrid": {"all": {"ndcg@10": seed / 100}}}))
        return 1.5, 10.0, 0

    monkeypatch.setattr(bench, "run_stage", fake_run_stage)
    s = bench.fuse_seed_runs(wd, [42, 7, 9], "stratified")
    assert s["seeds"] == [42, 7, 9]  # the protocol's own seed first, not run again
    assert s["hybrid"]["all"]["ndcg@10"]["values"] == [0.5, 0.07, 0.09]
    assert s["seconds"] == [None, 3.0, 3.0]
    assert [c[0] for c in calls] == ["tasks.fuse", "tasks.evaluate"] * 2
    fuse7, eval7 = calls[0][1], calls[1][1]
    assert (fuse7["out"], fuse7["report"], fuse7["params"]) == \
        ("artifacts/fuse_seed7", "reports/fuse_seed7", "params_fuse_seed7.yaml")
    assert fuse7["split"] == "artifacts/split" and fuse7["cf"] == "artifacts/fit_cf"  # same inputs
    assert eval7["recs"] == "hybrid=artifacts/fuse_seed7/recommendations.parquet"
    assert eval7["out"] == "reports/evaluate_seed7"
    for _, _, p in calls:  # the protocol's params, fuse.seed aside
        assert {k: v for k, v in p.items() if k != "fuse"} == {k: v for k, v in params.items() if k != "fuse"}
        assert p["fuse"]["k"] == 50 and p["fuse"]["seed"] in (7, 9)


def test_fuse_seed_runs_name_the_failing_stage_and_seed(tmp_path, monkeypatch):
    wd, _ = _protocol_dir(tmp_path)
    monkeypatch.setattr(bench, "run_stage", lambda cmd, cwd, log: (0.1, 1.0, 3))
    with pytest.raises(RuntimeError, match=r"fuse at fuse.seed 5 failed \(exit 3\)"):
        bench.fuse_seed_runs(wd, [5], "stratified")


def test_main_adds_fuse_seeds_only_when_asked(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setattr(bench, "run_protocol", lambda data, name, overrides, workdir, params_file: {
        "metrics": {}, "seconds": {"fuse": 1.0}, "peak_rss_mb": {"fuse": 1}, "cpu_seconds": {}})
    asked = []

    def fake_seeds(wd, seeds, name):
        asked.append((wd.name, list(seeds)))
        return bench.summarise_seeds({42: ({"all": {"ndcg@10": 0.5}}, None),
                                      1: ({"all": {"ndcg@10": 0.4}}, 2.0)})

    monkeypatch.setattr(bench, "fuse_seed_runs", fake_seeds)
    (tmp_path / "data").mkdir()
    base = ["--data", str(tmp_path / "data"), "--workdir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "b.json"), "--protocols", "stratified"]
    assert bench.main(base) == 0
    assert asked == [] and "fuse_seeds" not in json.loads((tmp_path / "b.json").read_text())
    assert bench.main(base + ["--fuse-seeds", "1"]) == 0
    assert asked == [("stratified", [1])]
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["fuse_seeds"]["stratified"]["hybrid"]["all"]["ndcg@10"]["values"] == [0.5, 0.4]
    assert "hybrid over fuse seeds 42 / 1" in capsys.readouterr().out
