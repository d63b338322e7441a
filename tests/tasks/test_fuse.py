import json
import logging

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines import fusion
from pipelines.features import build_table, write_features
from tasks import evaluate as ev
from tasks import fit_cf, fuse
from tasks import split as split_stage
from tests.fixtures import write_blocks_dataset

FUSE = {"k": 5, "n_estimators": 20, "num_threads": 1, "min_child_samples": 2,
        "early_stopping_rounds": 10, "memory_mb": 64, "cold_user_max": 2, "n_bags": 2}


@pytest.fixture()
def workdir(tmp_path):
    """split/ + fit_cf/ + a text feature dir + params.yaml, built through the real stages."""
    d = write_blocks_dataset(tmp_path / "ds", n_users=40, n_items=30, per_user=10)
    ratings = pd.read_csv(d / "ratings.csv", dtype={"user_id": str, "item_id": str})
    items = pd.read_csv(d / "items.csv", dtype={"item_id": str})
    users = pd.read_csv(d / "users.csv", dtype={"user_id": str})
    res = split_stage.split(ratings, items, {"ratio": 0.7, "seed": 0, "val_ratio": 0.3,
                                             "cold_item_fraction": 0.1})
    sdir = tmp_path / "split"
    sdir.mkdir()
    res["train"].to_parquet(sdir / "train.parquet")
    res["test"].to_parquet(sdir / "test.parquet")
    items.to_parquet(sdir / "items.parquet")
    users.to_parquet(sdir / "users.parquet")
    (sdir / "slices.json").write_text(json.dumps(res["slices"]))
    params = {"fit_cf": {"folds": ["fit", "full"],
                         "models": {"popularity": {}, "itemknn": {"neighbors": 10}}},
              "evaluate": {"ks": [5], "curve_ks": [5]},
              "fuse": FUSE}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    assert fit_cf.main(["--split", str(sdir), "--out", str(tmp_path / "cf"), "--params", str(pfile)]) == 0
    # text features: block direction + noise; one item missing
    rng = np.random.default_rng(0)
    ids = items["item_id"].astype(str).to_numpy()
    emb = rng.normal(0, 0.1, (len(ids), 8)).astype(np.float32)
    emb[np.array([int(i[1:]) < 15 for i in ids]), 0] += 1
    present = ids != "i2"
    table = build_table(ids, emb, present, [None if p else "no_text" for p in present],
                        ["h"] * len(ids), "test-model")
    write_features(tmp_path / "text", table, {"dim": 8, "model_id": "test-model"})
    return tmp_path


def run_fuse(w, *extra, out="fuse", report="report"):
    return fuse.main(["--split", str(w / "split"), "--cf", str(w / "cf"), "--text", str(w / "text"),
                      "--image", str(w / "no_image"), "--encoder", str(w / "no_encoder"),
                      "--profiles", str(w / "no_profiles"), "--out", str(w / out),
                      "--report", str(w / report), "--params", str(w / "params.yaml"), *extra])


def test_cli_writes_recommendations_model_and_reports(workdir, caplog):
    caplog.set_level(logging.INFO)
    assert run_fuse(workdir) == 0
    out = workdir / "fuse"
    recs = pd.read_parquet(out / "recommendations.parquet")
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score", "reason", "sources"]
    users = pd.read_parquet(workdir / "split" / "users.parquet")
    assert set(recs.user_id) == set(users.user_id)
    assert recs.groupby("user_id")["rank"].max().le(5).all()
    assert recs.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    train = pd.read_parquet(workdir / "split" / "train.parquet")
    assert not set(zip(train.user_id, train.item_id)) & set(zip(recs.user_id, recs.item_id))
    assert recs.reason.str.match(r"^(because you liked|matches your interest in|popular with users "
                                 r"like you|new item)").all()
    # model: LightGBM text file + feature list, reloadable
    assert (out / "model.txt").read_text().startswith("tree")
    feats = json.loads((out / "features.json").read_text())
    ranker = fusion.Ranker.load(out)
    assert ranker.features == feats["features"] and ranker.kind == "lightgbm"
    imp = json.loads((out / "feature_importance.json").read_text())
    assert set(imp) == set(feats["features"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 5 and summary["modalities"] == ["text"]
    assert 0 < summary["training"]["candidate_recall"] <= 1
    assert summary["test"]["candidates_per_user"]["mean"] > 5
    assert {"load", "total", "train_ranker", "recommend"} <= set(summary["seconds"])
    assert (workdir / "report" / "feature_importance.png").stat().st_size > 1000
    assert json.loads((workdir / "report" / "feature_importance.json").read_text()) == imp
    # missing optional inputs are skipped with a log line
    text = caplog.text
    assert "no_image" in text and "no_encoder" in text and "no_profiles" in text
    # the evaluate stage reads the table
    res = ev.main(["--split", str(workdir / "split"), "--models", str(workdir / "cf"),
                   "--recs", f"hybrid={out / 'recommendations.parquet'}",
                   "--out", str(workdir / "eval"), "--params", str(workdir / "params.yaml")])
    assert res == 0
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert metrics["hybrid"]["all"]["ndcg@5"] > metrics["popularity"]["all"]["ndcg@5"]


def test_cli_is_deterministic(workdir):
    assert run_fuse(workdir, out="a", report="ra") == 0
    assert run_fuse(workdir, out="b", report="rb") == 0
    a = pd.read_parquet(workdir / "a" / "recommendations.parquet")
    b = pd.read_parquet(workdir / "b" / "recommendations.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert (workdir / "a" / "model.txt").read_text() == (workdir / "b" / "model.txt").read_text()


def test_encoder_and_profiles_are_used_when_present(workdir):
    from pipelines.data import Split
    from pipelines.recommenders import ItemKNN

    split = Split.load(workdir / "split")
    enc = workdir / "enc"
    # any Recommender stands in for the sequence encoder: model_fit/ + model/
    ItemKNN(neighbors=5).fit(split.interactions("fit")).save(enc / "model_fit")
    ItemKNN(neighbors=5).fit(split.interactions()).save(enc / "model")
    prof = workdir / "prof"
    prof.mkdir()
    pd.DataFrame({"user_id": split.users.user_id, "segment": "night owls",
                  "n_interactions": 3}).to_parquet(prof / "profiles.parquet")
    with pytest.raises(ValueError, match="both in"):  # same name as the cf itemknn
        fuse.load_sources(workdir / "cf", enc)
    rc = fuse.main(["--split", str(workdir / "split"), "--cf", str(workdir / "cf"), "--encoder", str(enc),
                    "--profiles", str(prof), "--out", str(workdir / "out"), "--params",
                    str(workdir / "params.yaml")])
    assert rc == 1  # readable failure, no artifact
    assert not (workdir / "out").exists()
    # a genuinely different name is added as a source
    pop_fit = workdir / "cf" / "fit" / "popularity"
    enc2 = workdir / "enc2"
    import shutil

    shutil.copytree(enc / "model_fit", enc2 / "model_fit")
    shutil.copytree(enc / "model", enc2 / "model")
    shutil.rmtree(workdir / "cf" / "fit" / "itemknn")  # itemknn now only from the encoder dir
    fit, full = fuse.load_sources(workdir / "cf", enc2)
    assert set(fit) == {"popularity", "itemknn"} and pop_fit.exists()
    rc = fuse.main(["--split", str(workdir / "split"), "--cf", str(workdir / "cf"), "--encoder", str(enc2),
                    "--profiles", str(prof), "--out", str(workdir / "out"), "--params",
                    str(workdir / "params.yaml")])
    assert rc == 0
    recs = pd.read_parquet(workdir / "out" / "recommendations.parquet")
    seg = recs[recs.reason.str.startswith("popular with users like you")]
    assert seg.empty or seg.reason.str.contains("night owls").all()


def test_encoder_without_fit_variant_is_skipped(workdir, caplog):
    from pipelines.data import Split
    from pipelines.recommenders import Popularity

    caplog.set_level(logging.INFO)
    split = Split.load(workdir / "split")
    Popularity().fit(split.interactions()).save(workdir / "enc" / "model")
    fit, full = fuse.load_sources(workdir / "cf", workdir / "enc")
    assert set(fit) == set(full) == {"popularity", "itemknn"}
    assert "no fit + full model pair" in caplog.text


def test_failed_run_keeps_the_previous_artifact(workdir):
    assert run_fuse(workdir) == 0
    before = (workdir / "fuse" / "recommendations.parquet").read_bytes()
    bad = yaml.safe_load((workdir / "params.yaml").read_text())
    bad["fuse"]["ranker"] = "nope"
    (workdir / "params.yaml").write_text(yaml.safe_dump(bad))
    assert run_fuse(workdir) == 1
    assert (workdir / "fuse" / "recommendations.parquet").read_bytes() == before
    assert fuse.main(["--split", str(workdir / "split"), "--cf", str(workdir / "missing"),
                      "--out", str(workdir / "fuse"), "--params", str(workdir / "params.yaml")]) == 1


def test_sklearn_ranker_through_the_cli(workdir):
    p = yaml.safe_load((workdir / "params.yaml").read_text())
    p["fuse"]["ranker"] = "sklearn"
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    assert run_fuse(workdir) == 0
    out = workdir / "fuse"
    assert (out / "model.json").exists() and not (out / "model.txt").exists()
    assert json.loads((out / "summary.json").read_text())["model_file"] == "model.json"
    assert fusion.Ranker.load(out).kind == "sklearn"


def test_cross_fitting_and_refitted_sources_through_the_cli(workdir):
    p = yaml.safe_load((workdir / "params.yaml").read_text())
    p["fuse"].update({"cv_folds": 2, "refit_sources": True, "model_cold_users": True})
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    assert run_fuse(workdir) == 0
    summary = json.loads((workdir / "fuse" / "summary.json").read_text())
    folds = summary["training"]["simulation"]["cross_folds"]
    assert [f["fold"] for f in folds] == [1] and folds[0]["label_rows"] > 0
    # the stage's training-set time covers the extra folds (not the feature builder's own time)
    assert summary["seconds"]["training_set"] >= folds[0]["seconds"]
    # two folds of labelled users: more groups than users with a val row
    train = pd.read_parquet(workdir / "split" / "train.parquet")
    assert summary["training"]["n_groups"] > train[train.fold == "val"].user_id.nunique()
    recs = pd.read_parquet(workdir / "fuse" / "recommendations.parquet")
    assert not set(zip(train.user_id, train.item_id)) & set(zip(recs.user_id, recs.item_id))
    # the sequence encoder cannot be re-fitted inside the stage: a readable refusal
    pytest.importorskip("torch")
    from pipelines.recommenders.encoder import EncoderRecommender

    with pytest.raises(ValueError, match="cannot be re-fitted inside the fuse stage"):
        fusion.clone_model(EncoderRecommender())


# --------------------------------------------------------------------------- incremental reuse

def _resplit(w, extra: pd.DataFrame | None = None, new_users: pd.DataFrame | None = None):
    """Rewrite split/ from the fixture's dataset plus ``extra`` rows, refit cf/ (same params)."""
    d = w / "ds"
    ratings = pd.read_csv(d / "ratings.csv", dtype={"user_id": str, "item_id": str})
    items = pd.read_csv(d / "items.csv", dtype={"item_id": str})
    users = pd.read_csv(d / "users.csv", dtype={"user_id": str})
    if extra is not None:
        ratings = pd.concat([ratings, extra], ignore_index=True)
    if new_users is not None:
        users = pd.concat([users, new_users], ignore_index=True)
    res = split_stage.split(ratings, items, {"ratio": 0.7, "seed": 0, "val_ratio": 0.3,
                                             "cold_item_fraction": 0.1})
    s = w / "split"
    res["train"].to_parquet(s / "train.parquet")
    res["test"].to_parquet(s / "test.parquet")
    users.to_parquet(s / "users.parquet")
    (s / "slices.json").write_text(json.dumps(res["slices"]))
    assert fit_cf.main(["--split", str(s), "--out", str(w / "cf"), "--params", str(w / "params.yaml")]) == 0
    return res


def _set_fuse(w, **kw):
    p = yaml.safe_load((w / "params.yaml").read_text())
    p["fuse"].update(kw)
    (w / "params.yaml").write_text(yaml.safe_dump(p))


def _increment(w):
    """New rows for u0..u2 (unrated items of their own block) and a new user u99."""
    r = pd.read_csv(w / "ds" / "ratings.csv", dtype={"user_id": str, "item_id": str})
    rows = []
    for u, block, n in (("u0", range(15), 2), ("u1", range(15, 30), 2), ("u2", range(15), 1)):
        seen = set(r[r.user_id == u].item_id)
        new = [f"i{i}" for i in block if f"i{i}" not in seen][:n]
        rows += [(u, i, 1_700_000_000 + len(rows), 5) for i in new]
    rows += [("u99", f"i{i}", 1_700_100_000 + i, 4) for i in range(6)]
    return (pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"]),
            pd.DataFrame({"user_id": ["u99"], "age": [33], "gender": ["F"]}))


def test_warm_rerun_reuses_the_ranker_and_rescores_only_changed_users(workdir):
    _set_fuse(workdir, warm_start=True, warm_max_growth=0.5)
    _resplit(workdir)  # users.parquet of the same shape as the later run's
    assert run_fuse(workdir) == 0
    out = workdir / "fuse"
    s0 = json.loads((out / "summary.json").read_text())
    assert s0["warm_start"]["used"] is False and "no previous output" in s0["warm_start"]["reason"]
    model0 = (out / "model.txt").read_text()
    train0 = pd.read_parquet(workdir / "split" / "train.parquet")
    recs0 = pd.read_parquet(out / "recommendations.parquet")
    state0 = pd.read_parquet(out / "user_state.parquet")

    extra, new_user = _increment(workdir)
    res = _resplit(workdir, extra, new_user)
    assert run_fuse(workdir) == 0
    s1 = json.loads((out / "summary.json").read_text())
    w = s1["warm_start"]
    assert w["used"] is True and w["reuses"] == 1 and "grew" in w["reason"]
    assert (out / "model.txt").read_text() == model0  # the same ranker, not retrained
    assert "train_ranker" not in s1["seconds"]
    state1 = pd.read_parquet(out / "user_state.parquet")
    changed = set(state1.user_id) - set(state0.merge(state1, on=["user_id", "digest"]).user_id)
    # exactly the users whose training rows differ (the stable split kept everyone else's rows;
    # a new row that the split put in test changes nothing)
    cols = ["user_id", "item_id", "timestamp", "rating"]
    rows0 = set(map(tuple, train0[cols].astype(str).to_numpy()))
    rows1 = set(map(tuple, res["train"][cols].astype(str).to_numpy()))
    assert changed == {r[0] for r in rows0 ^ rows1}
    assert {"u0", "u1", "u99"} <= changed <= {"u0", "u1", "u2", "u99"}
    assert w["rescored_users"] == len(changed) and w["kept_users"] == len(state1) - len(changed)
    recs1 = pd.read_parquet(out / "recommendations.parquet")
    assert set(recs1.user_id) == set(state1.user_id)
    # kept and rescored lists merged in catalogue user order (as a full run writes them)
    assert list(dict.fromkeys(recs1.user_id)) == [u for u in state1.user_id if u in set(recs1.user_id)]
    # unchanged users keep their lists exactly; the changed ones were recomputed
    keep = ~recs0.user_id.isin(changed)
    pd.testing.assert_frame_equal(
        recs0[keep].sort_values(["user_id", "rank"]).reset_index(drop=True),
        recs1[~recs1.user_id.isin(changed)].sort_values(["user_id", "rank"]).reset_index(drop=True))
    train = res["train"]
    assert not set(zip(train.user_id, train.item_id)) & set(zip(recs1.user_id, recs1.item_id))
    assert (recs1[recs1.user_id == "u99"]["rank"].to_numpy() == np.arange(1, 6)).all()

    # rescore: all -> every user is recomputed with the reused ranker
    _set_fuse(workdir, rescore="all")
    assert run_fuse(workdir) == 0
    s2 = json.loads((out / "summary.json").read_text())["warm_start"]
    assert s2["used"] and s2["rescored_users"] == len(state1) and s2["reuses"] == 2


def test_warm_rerun_retrains_when_data_grew_params_changed_or_reuses_ran_out(workdir):
    _set_fuse(workdir, warm_start=True, warm_max_growth=0.01, warm_max_reuses=1)
    _resplit(workdir)
    assert run_fuse(workdir) == 0
    out = workdir / "fuse"
    extra, new_user = _increment(workdir)
    _resplit(workdir, extra, new_user)
    assert run_fuse(workdir) == 0  # about 2% more training rows > 1%
    w = json.loads((out / "summary.json").read_text())["warm_start"]
    assert w["used"] is False and "warm_max_growth" in w["reason"]
    assert json.loads((out / "summary.json").read_text())["seconds"]["train_ranker"] > 0

    _set_fuse(workdir, warm_max_growth=0.5)  # a warm knob: does not invalidate the ranker
    assert run_fuse(workdir) == 0
    assert json.loads((out / "summary.json").read_text())["warm_start"]["used"] is True
    assert run_fuse(workdir) == 0  # warm_max_reuses 1: the second reuse in a row retrains
    w = json.loads((out / "summary.json").read_text())["warm_start"]
    assert w["used"] is False and "warm_max_reuses" in w["reason"]

    _set_fuse(workdir, num_leaves=7)  # a ranker param: retrain
    assert run_fuse(workdir) == 0
    w = json.loads((out / "summary.json").read_text())["warm_start"]
    assert w["used"] is False and "params or source models changed" in w["reason"]
    assert run_fuse(workdir) == 0  # (reused once again: warm_max_reuses 1 counts from here)
    assert json.loads((out / "summary.json").read_text())["warm_start"]["used"] is True

    p = yaml.safe_load((workdir / "params.yaml").read_text())  # a source's configuration
    p["fit_cf"]["models"]["itemknn"]["neighbors"] = 5
    p["fuse"]["warm_max_reuses"] = 5
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    assert fit_cf.main(["--split", str(workdir / "split"), "--out", str(workdir / "cf"),
                        "--params", str(workdir / "params.yaml")]) == 0
    assert run_fuse(workdir) == 0
    w = json.loads((out / "summary.json").read_text())["warm_start"]
    assert w["used"] is False and "source models changed" in w["reason"]


def test_a_reused_ranker_never_loads_the_fit_models(workdir):
    _set_fuse(workdir, warm_start=True)
    _resplit(workdir)
    assert run_fuse(workdir) == 0
    previous, why = fuse.load_previous(workdir / "fuse")
    assert why == "ok"
    _fit, full = fuse.load_sources(workdir / "cf", None)
    params = yaml.safe_load((workdir / "params.yaml").read_text())["fuse"]
    feats = fuse.load_item_features({"text": str(workdir / "text")})
    from pipelines.data import Split

    split = Split.load(workdir / "split")

    def refuse():
        raise AssertionError("fit models loaded although the ranker is reused")

    res = fusion.fuse(split, refuse, full, feats, None, params, previous=previous)
    assert res["summary"]["warm_start"]["used"] and res["summary"]["warm_start"]["rescored_users"] == 0
    # nothing changed: the very same frame, rows in the same order as the full run wrote them
    pd.testing.assert_frame_equal(res["recommendations"], previous["recommendations"])
    # a previous output without its user state is not reused, and says so
    (workdir / "fuse" / "user_state.parquet").unlink()
    prev, why = fuse.load_previous(workdir / "fuse")
    assert prev is None and "user_state.parquet missing" in why


def test_cold_ranker_is_saved_and_reused_by_a_warm_rerun(workdir):
    s = workdir / "split"
    res = split_stage.split(pd.read_csv(workdir / "ds" / "ratings.csv", dtype={"user_id": str, "item_id": str}),
                            pd.read_parquet(s / "items.parquet"),
                            {"ratio": 0.7, "seed": 0, "val_ratio": 0.3, "cold_user_fraction": 0.3,
                             "cold_user_max": 2})
    res["train"].to_parquet(s / "train.parquet")
    res["test"].to_parquet(s / "test.parquet")
    (s / "slices.json").write_text(json.dumps(res["slices"]))
    assert fit_cf.main(["--split", str(s), "--out", str(workdir / "cf"), "--params",
                        str(workdir / "params.yaml")]) == 0
    _set_fuse(workdir, warm_start=True, cold_user_simulation=0.3, refit_sources=True,
              model_cold_users=True, cold_ranker_min_users=3)
    assert run_fuse(workdir) == 0
    out = workdir / "fuse"
    s0 = json.loads((out / "summary.json").read_text())
    assert s0["cold_ranker"]["used"] and s0["cold_ranker"]["model_file"] == "cold_model.txt"
    assert fusion.Ranker.load(out, prefix="cold_").features == fusion.Ranker.load(out).features
    recs0 = (out / "recommendations.parquet").read_bytes()
    # nothing changed: both rankers are reused and the output is byte-identical
    assert run_fuse(workdir) == 0
    s1 = json.loads((out / "summary.json").read_text())
    assert s1["warm_start"]["used"] and s1["cold_ranker"]["used"]
    assert s1["test"]["users_ranked_by_cold_ranker"] == 0  # every list kept: nobody rescored
    assert (out / "recommendations.parquet").read_bytes() == recs0
    _set_fuse(workdir, rescore="all")
    assert run_fuse(workdir) == 0
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["warm_start"]["used"]
    assert s2["test"]["users_ranked_by_cold_ranker"] == len(res["slices"]["cold_users"]) > 0
    # a previous output whose cold ranker is missing is not reused (the ranker is retrained)
    (out / "cold_model.txt").unlink()
    assert run_fuse(workdir) == 0
    s3 = json.loads((out / "summary.json").read_text())
    assert not s3["warm_start"]["used"] and "cold_model.txt" in s3["warm_start"]["reason"]
    assert (out / "cold_model.txt").is_file()


def test_the_encoder_is_trained_again_on_each_cross_fitting_fold(workdir):
    """The encoder's fit variant learned from the rows an extra cross-fitting fold takes as
    labels: the fuse trains a clone on the fold's context (the fit variant's recipe) instead of
    leaving the encoder out of that fold, unless that is expected to take too long."""
    from pipelines.recommenders import Recommender
    from tasks import train_encoder
    from tests.tasks.test_train_encoder import TINY

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train_encoder"] = {**TINY, "epochs": 3, "patience": 2, "refit": True,
                               "cold_member": False}
    params["fuse"] = {**params["fuse"], "cv_folds": 2}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    assert train_encoder.main(["--split", str(workdir / "split"), "--text", str(workdir / "text"),
                               "--out", str(workdir / "enc"), "--params",
                               str(workdir / "params.yaml")]) == 0
    fit_variant = Recommender.load(workdir / "enc" / "model_fit")
    recipe = fit_variant.params["_recipe"]
    assert 1 <= recipe["epochs"] <= 3 and recipe["train_seconds"] > 0

    def fuse_with(**over):
        params["fuse"] = {**params["fuse"], **over}
        (workdir / "params.yaml").write_text(yaml.safe_dump(params))
        assert fuse.main(["--split", str(workdir / "split"), "--cf", str(workdir / "cf"),
                          "--encoder", str(workdir / "enc"), "--text", str(workdir / "text"),
                          "--out", str(workdir / "out"), "--params", str(workdir / "params.yaml")]) == 0
        sim = json.loads((workdir / "out" / "summary.json").read_text())["training"]["simulation"]
        return sim["fixed_sources"]["encoder"], sim["cross_folds"][0]

    why, fold = fuse_with(warm_start=False, refit_fixed_sources=True)
    assert why.startswith("re-fitted per fold")
    assert fold["absent"] == [] and fold["seconds_fit_fixed"] > 0
    why, fold = fuse_with(fixed_refit_max_seconds=1e-9)
    assert "fixed_refit_max_seconds" in why and fold["absent"] == ["encoder"]
    why, fold = fuse_with(refit_fixed_sources=False)
    assert why == "refit_fixed_sources off" and fold["absent"] == ["encoder"]


def test_encoder_context_clone_trains_on_the_given_rows_with_the_recipe(workdir):
    from pipelines.data import Interactions, Split
    from pipelines.recommenders.encoder import EncoderRecommender
    from tests.tasks.test_train_encoder import TINY

    split = Split.load(workdir / "split")
    m = EncoderRecommender(**{**TINY, "epochs": 3, "patience": 2, "cold_member": False})
    m.fit(split.interactions())
    fv = m.fit_model_
    assert fv.params["_recipe"]["epochs_run"] == m.train_info_["epochs_run"]
    rows = split.train[split.train["fold"] == "fit"].drop(columns="fold")
    inter = Interactions.build(rows.iloc[: len(rows) // 2], split.user_ids, split.item_ids)
    clone = fv.context_clone({}, split.users).fit(inter)
    assert clone.train_info_["epochs_run"] == fv.params["_recipe"]["epochs"]
    assert (clone._seen != inter.matrix()).nnz == 0  # it learned from these rows only
    assert "refit" not in clone.train_info_ and clone.params.get("_cold_members", 0) == 0
    with pytest.raises(ValueError, match="recipe"):
        m.context_clone({}, split.users)  # the full model has none
