"""Incremental retraining: fit_cf (ALS) and train_encoder warm-start from the previous output.

A base split is trained, then the full split (new users, new items, more interactions)
is retrained in the same output directory, as ``dvc repro`` does with ``persist`` outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("torch")

from pipelines.data import Split  # noqa: E402
from pipelines.metrics import recall  # noqa: E402
from pipelines.recommenders import Recommender  # noqa: E402
from tasks import fit_cf, train_encoder  # noqa: E402
from tests.tasks.test_train_encoder import TINY, write_modality, write_split  # noqa: E402

NEW_USERS = [f"u{u}" for u in range(40, 48)]
NEW_ITEMS = ["i0", "i12"]


def base_and_full(tmp_path: Path) -> tuple[Path, Path]:
    """``full``: 48 users, 24 items; ``base``: without 8 users, 2 items and their rows."""
    full = write_split(tmp_path / "full", n_users=48, n_items=24, per_user=10)
    base = tmp_path / "base"
    base.mkdir()
    for name in ("train", "test"):
        df = pd.read_parquet(full / f"{name}.parquet")
        keep = ~df["user_id"].isin(NEW_USERS) & ~df["item_id"].isin(NEW_ITEMS)
        df[keep].to_parquet(base / f"{name}.parquet", index=False)
    items = pd.read_parquet(full / "items.parquet")
    items[~items["item_id"].isin(NEW_ITEMS)].to_parquet(base / "items.parquet", index=False)
    users = pd.read_parquet(full / "users.parquet")
    users[~users["user_id"].isin(NEW_USERS)].to_parquet(base / "users.parquet", index=False)
    (base / "slices.json").write_text((full / "slices.json").read_text())
    return base, full


def _test_recall(model, split_dir: Path, k: int = 5) -> float:
    test = pd.read_parquet(split_dir / "test.parquet")
    users = sorted(test["user_id"].unique())
    truth = [set(g) for _, g in test.groupby("user_id")["item_id"]]
    reco = model.recommend(users, k=k)
    return float(np.mean(recall(reco, truth, k)))


# ---------------------------------------------------------------------------- fit_cf


def _fit_cf(split: Path, out: Path, params_file: Path, **section) -> dict:
    cfg = {"folds": ["full"], "models": {"als": {"factors": 8, "iterations": 15, "regularization": 0.1,
                                                 "num_threads": 1, "random_state": 0}},
           "warm_iterations": {"als": 1}, **section}
    params_file.write_text(yaml.safe_dump({"fit_cf": cfg}))
    assert fit_cf.main(["--split", str(split), "--out", str(out), "--params", str(params_file)]) == 0
    return json.loads((out / "summary.json").read_text())


def _als_loss(model, split: Split) -> float:
    from implicit.cpu.als import calculate_loss

    data = split.interactions(None)
    assert list(model.user_ids) == list(data.user_ids) and list(model.item_ids) == list(data.item_ids)
    Cui = (data.matrix() * model.params["alpha"]).astype(np.float32).tocsr()
    return float(calculate_loss(Cui, model.user_factors_, model.item_factors_,
                                model.params["regularization"], num_threads=1))


def test_fit_cf_als_warm_starts_from_the_previous_output(tmp_path):
    base, full = base_and_full(tmp_path)
    out = tmp_path / "cf"
    first = _fit_cf(base, out, tmp_path / "p.yaml")
    assert first["warm_start"]["full/als"] == {"used": False, "reason": "no previous model"}
    prev = Recommender.load(out / "full" / "als")

    warm_summary = _fit_cf(full, out, tmp_path / "p.yaml")
    info = warm_summary["warm_start"]["full/als"]
    assert info["used"] is True and info["iterations"] == 1
    assert info["previous_items"] == 22 and info["previous_users"] == 41
    warm = Recommender.load(out / "full" / "als")
    assert warm.params["iterations"] == 1
    # new users and new items have learnt factors
    sp_full = Split.load(full)
    for uid in NEW_USERS:
        row = warm.user_factors_[list(warm.user_ids).index(uid)]
        assert np.isfinite(row).all() and np.abs(row).sum() > 0
    for iid in NEW_ITEMS:
        assert np.isfinite(warm.item_factors_[list(warm.item_ids).index(iid)]).all()
    assert list(warm.item_ids) == list(sp_full.item_ids)

    # the same iteration budget from scratch (warm_start off) is not better
    cold_summary = _fit_cf(full, tmp_path / "cold", tmp_path / "p2.yaml", warm_start=False,
                           models={"als": {"factors": 8, "iterations": 1, "regularization": 0.1,
                                           "num_threads": 1, "random_state": 0}})
    assert cold_summary["warm_start"]["full/als"]["used"] is False
    cold = Recommender.load(tmp_path / "cold" / "full" / "als")
    # at least as good: the ALS objective on the full data after the same budget
    assert _als_loss(warm, sp_full) <= _als_loss(cold, sp_full)
    # the previous item factors were the starting point: old items stay close to them
    common = [i for i in prev.item_ids]
    a = prev.item_factors_[[list(prev.item_ids).index(i) for i in common]]
    b = warm.item_factors_[[list(warm.item_ids).index(i) for i in common]]
    c = cold.item_factors_[[list(cold.item_ids).index(i) for i in common]]
    assert np.linalg.norm(a - b) < np.linalg.norm(a - c)


def test_fit_cf_falls_back_to_cold_on_another_factor_size(tmp_path):
    base, full = base_and_full(tmp_path)
    out = tmp_path / "cf"
    _fit_cf(base, out, tmp_path / "p.yaml")
    s = _fit_cf(full, out, tmp_path / "p.yaml",
                models={"als": {"factors": 4, "iterations": 3, "num_threads": 1}})
    info = s["warm_start"]["full/als"]
    assert info["used"] is False and "factors" in info["reason"]
    assert Recommender.load(out / "full" / "als").params["iterations"] == 3


# ---------------------------------------------------------------------------- encoder


def _encoder(split: Path, text: Path, out: Path, params_file: Path, **kw) -> dict:
    params_file.write_text(yaml.safe_dump({"train_encoder": {**TINY, **kw}}))
    rc = train_encoder.main(["--split", str(split), "--text", str(text), "--out", str(out),
                             "--params", str(params_file)])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


def _first_loss(out: Path) -> float:
    tsv = next(p for p in (out / "dvclive").rglob("loss.tsv"))
    return float(pd.read_csv(tsv, sep="\t")["loss"].iloc[0])


def test_encoder_warm_start_reuses_the_previous_model(tmp_path):
    base, full = base_and_full(tmp_path)
    items = [f"i{i}" for i in range(24)]
    text = write_modality(tmp_path / "text", items)
    text_base = write_modality(tmp_path / "text_base", [i for i in items if i not in NEW_ITEMS])
    out = tmp_path / "enc"
    first = _encoder(base, text_base, out, tmp_path / "p.yaml", epochs=6, warm_start=True)
    assert first["warm_start"] == {"used": False, "reason": "no previous model"}
    assert first["epochs_run"] == 6

    warm = _encoder(full, text, out, tmp_path / "p.yaml", epochs=6, warm_start=True, warm_epochs=1)
    ws = warm["warm_start"]
    assert ws["used"] is True and warm["epochs_run"] == 1
    assert ws["items_reused"] == 22 and ws["new_items"] == 2
    # fine-tuning starts with the users whose history changed: new users + those with new
    # items (counted on the fit rows: the first phase starts from the previous fit variant)
    def fit_rows(split):
        t = pd.read_parquet(split / "train.parquet")
        return t[t["fold"] != "val"].groupby("user_id").size()

    n_full, n_base = fit_rows(full), fit_rows(base)
    assert ws["changed_users"] == int((n_full.sub(n_base, fill_value=0) != 0).sum()) > len(NEW_USERS)
    # new users bring new ages (a grown vocabulary: aligned by value); the hashed crosses
    # of the attribute codes change meaning and start afresh
    assert ws["tensors_skipped"] == ["cross_emb.weight"]

    cold = _encoder(full, text, tmp_path / "cold", tmp_path / "p2.yaml", epochs=1, warm_start=False)
    assert cold["warm_start"]["used"] is False
    # same epoch budget: the warm model starts from trained weights (lower first-epoch loss)
    assert _first_loss(out) < _first_loss(tmp_path / "cold")
    assert warm["best_val_recall@20"] >= cold["best_val_recall@20"]
    mw = Recommender.load(out / "model")
    mc = Recommender.load(tmp_path / "cold" / "model")
    assert _test_recall(mw, full) >= _test_recall(mc, full)
    # new users and new items get vectors
    for uid in NEW_USERS:
        v = mw.user_vecs_[list(mw.user_ids).index(uid)]
        assert np.isfinite(v).all() and np.abs(v[:-1]).sum() > 0
    for iid in NEW_ITEMS:
        v = mw.item_vecs_[list(mw.item_ids).index(iid)]
        assert np.isfinite(v).all() and np.abs(v[:-1]).sum() > 0


def test_encoder_warm_start_needs_the_same_architecture(tmp_path):
    base, full = base_and_full(tmp_path)
    items = [f"i{i}" for i in range(24)]
    text = write_modality(tmp_path / "text", items)
    out = tmp_path / "enc"
    _encoder(base, text, out, tmp_path / "p.yaml", epochs=1, warm_start=True)
    m = _encoder(full, text, out, tmp_path / "p.yaml", epochs=2, warm_start=True, d_model=8)
    assert m["warm_start"]["used"] is False and "d_model" in m["warm_start"]["reason"]
    assert m["epochs_run"] == 2


def test_encoder_first_phase_warm_starts_from_the_previous_fit_variant_only(tmp_path, monkeypatch):
    """The first phase yields the fuse's fit variant, whose val-row scores must be honest: it
    starts from the previous fit variant (fit rows only), never from the previous full model
    (which learned from the val rows); the refit starts from the full model."""
    from pipelines.recommenders import encoder as enc

    base, full = base_and_full(tmp_path)
    items = [f"i{i}" for i in range(24)]
    text = write_modality(tmp_path / "text", items)
    out = tmp_path / "enc"
    _encoder(base, text, out, tmp_path / "p.yaml", epochs=2, warm_start=True, refit=True,
             ensemble=False, cold_member=False)
    prev_fit = Recommender.load(out / "model_fit")._seen.nnz
    prev_full = Recommender.load(out / "model")._seen.nnz
    assert prev_fit < prev_full  # the full model saw the val rows too
    started_from = []
    real = enc.warm_load

    def spy(model, previous, item_ids, arch):
        started_from.append(previous._seen.nnz)
        return real(model, previous, item_ids, arch)

    monkeypatch.setattr(enc, "warm_load", spy)
    warm = _encoder(full, text, out, tmp_path / "p.yaml", epochs=2, warm_start=True, refit=True,
                    ensemble=False, cold_member=False, warm_epochs=1)
    assert warm["warm_start"]["used"] is True and warm["refit"]["warm_start"]["used"] is True
    assert started_from == [prev_fit, prev_full]  # phase 1, then the refit

    # without a previous fit variant the first phase starts cold (and says why)
    import shutil

    shutil.rmtree(out / "model_fit")
    started_from.clear()
    again = _encoder(full, text, out, tmp_path / "p.yaml", epochs=2, warm_start=True, refit=True,
                     ensemble=False, cold_member=False, warm_epochs=1)
    assert again["warm_start"]["used"] is False and "fit-rows" in again["warm_start"]["reason"]
    assert again["refit"]["warm_start"]["used"] is True
    assert len(started_from) == 1
