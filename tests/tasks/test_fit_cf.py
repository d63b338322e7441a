"""fit_cf: hyper-parameter tuning on the validation fold (``fit_cf.tune``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.data import Split
from pipelines.recommenders import Recommender
from tasks import fit_cf
from tests.fixtures import split_frames

N_BLOCKS, BLOCK = 4, 10


def write_blocks(path: Path, n_users: int = 64, seed: int = 0, test_items=None) -> Path:
    """Four disjoint taste blocks of 10 items; per user 6 fit, 2 val and 2 test rows in its block.

    A one-factor ALS cannot tell four blocks apart, an eight-factor one can: the tuning has a
    right answer.  ``test_items``: replaces every test row's item (to show tuning never reads them).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        b = u % N_BLOCKS
        for j, i in enumerate(rng.choice(BLOCK, 10, replace=False)):
            rows.append((f"u{u}", f"i{b * BLOCK + i}", 1_600_000_000 + u * 1000 + j * 60, 4.0))
    train, test = split_frames(rows, n_train=8, n_fit=6)
    if test_items is not None:
        test["item_id"] = test_items(len(test))
    path.mkdir(parents=True, exist_ok=True)
    train.to_parquet(path / "train.parquet", index=False)
    test.to_parquet(path / "test.parquet", index=False)
    pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)]}).to_parquet(path / "users.parquet",
                                                                            index=False)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(N_BLOCKS * BLOCK)],
                  "title": [f"Film {i}" for i in range(N_BLOCKS * BLOCK)]}).to_parquet(
        path / "items.parquet", index=False)
    (path / "slices.json").write_text(json.dumps({"cold_users": [], "cold_items": []}))
    return path


ALS = {"factors": 8, "regularization": 0.05, "alpha": 5.0, "iterations": 10, "num_threads": 1,
       "random_state": 0}


def run(split: Path, out: Path, params_file: Path, **section) -> dict:
    cfg = {"folds": ["fit", "full"], "models": {"als": dict(ALS), "popularity": {}},
           "tune": {"als": {"factors": [1, 8]}}, "warm_iterations": {"als": 2}, **section}
    params_file.write_text(yaml.safe_dump({"fit_cf": cfg}))
    assert fit_cf.main(["--split", str(split), "--out", str(out), "--params", str(params_file)]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("order", [[1, 8], [8, 1]])
def test_tuning_picks_the_grid_point_that_ranks_the_validation_rows_best(tmp_path, order):
    split = write_blocks(tmp_path / "split")
    s = run(split, tmp_path / "cf", tmp_path / "p.yaml", tune={"als": {"factors": order}})
    t = s["tuning"]["als"]
    assert t["chosen"] == {"factors": 8} and t["reused"] is False
    assert t["users"] == 64 and t["metric"] == "ndcg@10"
    by = {r["params"]["factors"]: r["ndcg@10"] for r in t["results"]}
    assert [r["params"]["factors"] for r in t["results"]] == order  # grid order kept
    assert by[8] > by[1] + 0.2  # one factor cannot separate four blocks
    for fold in ("fit", "full"):
        m = Recommender.load(tmp_path / "cf" / fold / "als")
        assert m.params["factors"] == 8 and m.params["regularization"] == ALS["regularization"]
    # the fit-fold model is the tuning's winner, fitted on the fit fold only
    fit_model = Recommender.load(tmp_path / "cf" / "fit" / "als")
    val = Split.load(split).val()
    seen = fit_model._seen
    vu = fit_model.user_index(val["user_id"].to_numpy())
    vi = pd.Index(fit_model.item_ids).get_indexer(val["item_id"].to_numpy())
    assert seen[vu, vi].sum() == 0
    assert s["seconds"]["fit/als"] == 0.0 and s["warm_start"]["fit/als"]["reason"] == "tuned in this run"


@pytest.mark.parametrize("min_gain, chosen", [(0.0, 8), (100.0, 1)])
def test_the_configured_value_stands_unless_beaten_by_the_minimum_gain(tmp_path, min_gain, chosen):
    split = write_blocks(tmp_path / "split")
    s = run(split, tmp_path / "cf", tmp_path / "p.yaml", tune_min_gain=min_gain,
            models={"als": {**ALS, "factors": 1}})
    t = s["tuning"]["als"]
    by = {r["params"]["factors"]: r["ndcg@10"] for r in t["results"]}
    assert by[8] > by[1] * 1.2  # 8 factors is clearly better on validation...
    assert t["configured"] == {"factors": 1} and t["min_gain"] == min_gain
    assert t["chosen"] == {"factors": chosen} and t["kept_configured"] is (chosen == 1)
    assert Recommender.load(tmp_path / "cf" / "full" / "als").params["factors"] == chosen


def test_without_the_configured_value_in_the_grid_the_best_point_is_taken(tmp_path):
    split = write_blocks(tmp_path / "split")
    s = run(split, tmp_path / "cf", tmp_path / "p.yaml", tune_min_gain=100.0,
            models={"als": {**ALS, "factors": 2}})
    t = s["tuning"]["als"]
    assert t["configured"] is None and t["chosen"] == {"factors": 8} and t["kept_configured"] is False


def test_tuning_never_reads_the_test_rows(tmp_path):
    a = write_blocks(tmp_path / "a")
    rng = np.random.default_rng(7)
    b = write_blocks(tmp_path / "b", test_items=lambda n: [f"i{x}" for x in rng.integers(0, 40, n)])
    assert not pd.read_parquet(a / "test.parquet").equals(pd.read_parquet(b / "test.parquet"))
    ra = run(a, tmp_path / "cfa", tmp_path / "pa.yaml")["tuning"]["als"]
    rb = run(b, tmp_path / "cfb", tmp_path / "pb.yaml")["tuning"]["als"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ra["results"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rb["results"]]


def test_a_warm_run_reuses_the_previous_choice_until_the_grid_changes(tmp_path):
    split = write_blocks(tmp_path / "split")
    out = tmp_path / "cf"
    first = run(split, out, tmp_path / "p.yaml")
    assert first["tuning"]["als"]["reused"] is False

    second = run(split, out, tmp_path / "p.yaml")
    t = second["tuning"]["als"]
    assert t["reused"] is True and t["chosen"] == {"factors": 8}
    # the previous 8-factor models warm-start both folds (no tuning fit this time)
    assert second["warm_start"]["fit/als"]["used"] is True
    assert second["warm_start"]["full/als"]["used"] is True

    third = run(split, out, tmp_path / "p.yaml", tune={"als": {"factors": [1, 8], "alpha": [5.0, 1.0]}})
    assert third["tuning"]["als"]["reused"] is False
    assert len(third["tuning"]["als"]["results"]) == 4

    # warm_start off: tuned again even with the same grid
    fourth = run(split, out, tmp_path / "p.yaml", warm_start=False)
    assert fourth["tuning"]["als"]["reused"] is False

    # another tuning setting is another question: tuned again
    fifth = run(split, out, tmp_path / "p.yaml", tune_min_gain=0.5)
    assert fifth["tuning"]["als"]["reused"] is False


def test_no_validation_rows_keeps_the_configured_values(tmp_path):
    split = write_blocks(tmp_path / "split")
    train = pd.read_parquet(split / "train.parquet")
    train["fold"] = "fit"
    train.to_parquet(split / "train.parquet", index=False)
    s = run(split, tmp_path / "cf", tmp_path / "p.yaml", tune={"als": {"factors": [1, 4]}})
    assert s["tuning"]["als"]["chosen"] is None and "no validation rows" in s["tuning"]["als"]["reason"]
    assert Recommender.load(tmp_path / "cf" / "full" / "als").params["factors"] == ALS["factors"]


@pytest.mark.parametrize("section, message", [
    ({"tune": {"ease": {"lambda_": [1.0]}}}, "does not have: ['ease']"),
    ({"tune": {"als": {"factors": 8}}}, "fit_cf.tune.als.factors: expected a non-empty list"),
    ({"tune": {"als": {"factors": []}}}, "fit_cf.tune.als.factors: expected a non-empty list"),
    ({"tune": {"als": [8]}}, "fit_cf.tune.als: expected a mapping"),
    ({"tune_metric": "auc@10"}, "fit_cf.tune_metric: 'auc@10'"),
    ({"tune_metric": "ndcg"}, "fit_cf.tune_metric: 'ndcg'"),
])
def test_a_malformed_tuning_section_fails_before_any_fit_naming_the_key(tmp_path, section, message):
    split = write_blocks(tmp_path / "split")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fit_cf.fit_all(Split.load(split), {"models": {"als": dict(ALS)},
                                           "tune": {"als": {"factors": [1, 8]}}, **section})
