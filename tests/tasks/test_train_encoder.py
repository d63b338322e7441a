"""train_encoder stage: CLI outputs, missing modalities, params checks, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")

from pipelines.data import Split  # noqa: E402
from pipelines.features import build_table, write_features  # noqa: E402
from pipelines.io import load_params  # noqa: E402
from pipelines.recommenders import Recommender  # noqa: E402
from tasks import train_encoder  # noqa: E402
from tests.fixtures import split_frames  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "max_len": 16, "batch_size": 16, "epochs": 4,
        "patience": 0, "lr": 5e-3, "threads": 1, "samples_per_user": 1}


def write_split(path: Path, n_users: int = 40, n_items: int = 24, per_user: int = 10, seed: int = 0) -> Path:
    """A split directory in the split stage's format, two taste blocks + one cold user and item."""
    rng = np.random.default_rng(seed)
    half = n_items // 2
    rows = []
    for u in range(n_users):
        block = range(half - 1) if u % 2 == 0 else range(half, n_items - 1)  # last of each block: cold
        for j, i in enumerate(rng.choice(list(block), per_user, replace=False)):
            rows.append((f"u{u}", f"i{i}", 1_600_000_000 + u * 1000 + j * 600, float(rng.integers(1, 6))))
    train, test = split_frames(rows, n_train=8, n_fit=7)
    path.mkdir(parents=True, exist_ok=True)
    train.to_parquet(path / "train.parquet", index=False)
    test.to_parquet(path / "test.parquet", index=False)
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)] + ["cold"],
                          "gender": ["F" if u % 2 == 0 else "M" for u in range(n_users)] + ["F"],
                          "age": [str(20 + u) for u in range(n_users)] + ["33"]})
    users.to_parquet(path / "users.parquet", index=False)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                          "title": [f"Film {i}" for i in range(n_items)],
                          "genres": ["Sci-Fi|Action" if i < half else "Romance" for i in range(n_items)],
                          "year": [1995 if i < half else 1960 for i in range(n_items)]})
    items.to_parquet(path / "items.parquet", index=False)
    (path / "slices.json").write_text(json.dumps({"cold_users": ["cold"],
                                                  "cold_items": [f"i{half - 1}", f"i{n_items - 1}"]}))
    return path


def write_modality(path: Path, item_ids, dim: int = 6, present=None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = len(item_ids)
    present = np.ones(n, bool) if present is None else np.asarray(present, bool)
    emb = rng.normal(0, 0.05, (n, dim)).astype(np.float32)
    emb[: n // 2, 0] += 1.0
    emb[n // 2:, 1] += 1.0
    reasons = [None if p else "no-text" for p in present]
    table = build_table(item_ids, emb, present, reasons, ["h"] * n, "test-model")
    write_features(path, table, {"dim": dim, "model_id": "test-model"})
    return path


def write_params(path: Path, **kw) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"train_encoder": {**TINY, **kw}, "other": {"x": 1}}))
    return path


def test_cli_writes_model_metrics_and_curves(tmp_path):
    split = write_split(tmp_path / "split")
    items = [f"i{i}" for i in range(24)]
    text = write_modality(tmp_path / "text", items)
    # image: every item missing; video: no directory at all
    image = write_modality(tmp_path / "image", items, present=np.zeros(24, bool))
    out = tmp_path / "enc"
    rc = train_encoder.main(["--split", str(split), "--text", str(text), "--image", str(image),
                             "--video", str(tmp_path / "nope"), "--out", str(out),
                             "--params", str(write_params(tmp_path / "params.yaml"))])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 4 and metrics["modalities"] == ["text"]
    assert metrics["n_cold_users_encoded_from_attributes"] == 1
    assert 0 <= metrics["best_val_recall@20"] <= 1
    model = Recommender.load(out / "model")
    assert model.name == "encoder"
    sp = Split.load(split)
    assert list(model.item_ids) == list(sp.item_ids) and list(model.user_ids) == list(sp.user_ids)
    scores = model.score_users(model.user_index(["u0", "cold", "stranger"]))
    assert np.isfinite(scores).all()  # cold items and cold / unknown users included
    # the fit-rows-only variant for the fuse stage: a pair it discovers, honest on the val fold
    from pipelines import fusion

    assert fusion.discover_sources(out) == {"encoder": (out / "model_fit", out / "model")}
    fit_model = Recommender.load(out / "model_fit")
    train = pd.read_parquet(split / "train.parquet")
    fusion.check_no_leak({"encoder": fit_model}, train[train.fold == "val"])
    with pytest.raises(ValueError, match="leakage"):  # the exported model did learn from them
        fusion.check_no_leak({"encoder": model}, train[train.fold == "val"])
    # the fuse pairs the fit variant with the exported ensemble's first (refit) member only
    from tasks import fuse as fuse_stage

    # refit + phase 1, then the cold member's two (the fixture has a user without history)
    assert len(model.member_weights_) == 3 and model.params["_cold_members"] == 2
    assert metrics["cold_member"]["members"] == 2
    cf = tmp_path / "cf"
    (cf / "fit").mkdir(parents=True)
    _fit, full = fuse_stage.load_sources(cf, out)
    d = model._member_dim()
    assert full["encoder"].item_vecs_.shape[1] == d == fit_model.item_vecs_.shape[1]
    np.testing.assert_array_equal(full["encoder"].item_vecs_, model.item_vecs_[:, :d])
    # dvclive curves: one row per epoch for loss and val recall
    curves = list((out / "dvclive").rglob("*.tsv"))
    names = {p.name for p in curves}
    assert "loss.tsv" in names and "recall@20.tsv" in names
    loss = pd.read_csv(next(p for p in curves if p.name == "loss.tsv"), sep="\t")
    assert len(loss) == 4
    assert (out / "checkpoints" / "last" / "state.safetensors").is_file()


def test_unknown_params_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown param"):
        train_encoder.check_params({"d_modle": 3})
    with pytest.raises(ValueError, match="holdout"):
        train_encoder.check_params({"objective": "magic"})
    split = write_split(tmp_path / "split")
    params = write_params(tmp_path / "p.yaml", bogus=1)
    rc = train_encoder.main(["--split", str(split), "--out", str(tmp_path / "o"), "--params", str(params)])
    assert rc == 1 and not (tmp_path / "o" / "model").exists()


def test_rerun_after_finish_reuses_the_checkpoint(tmp_path):
    split = Split.load(write_split(tmp_path / "split"))
    m1, info1 = train_encoder.train(split, {}, {**TINY, "epochs": 2}, workdir=tmp_path / "w")
    m2, info2 = train_encoder.train(split, {}, {**TINY, "epochs": 2}, workdir=tmp_path / "w")
    assert info2["resumed_from_epoch"] == 2
    assert np.array_equal(m1.item_vecs_, m2.item_vecs_)
    assert info2["refit"]["resumed_from_epoch"] == info1["refit"]["epochs"]  # both phases
    # a time box: what the first phase leaves to the refit varies from run to run, yet two
    # runs write the same refit checkpoint (its fingerprint does not depend on timing)
    box = {**TINY, "epochs": 2, "max_train_seconds": 1000}
    states = []
    for wd in ("box1", "box2"):
        train_encoder.train(split, {}, box, workdir=tmp_path / wd)
        states.append(json.loads((tmp_path / wd / "refit" / "checkpoints" / "last" /
                                  "state.json").read_text()))
    assert states[0]["fingerprint"] == states[1]["fingerprint"]
    # other params -> the checkpoint is ignored, training starts afresh
    _, info3 = train_encoder.train(split, {}, {**TINY, "epochs": 2, "lr": 1e-3}, workdir=tmp_path / "w")
    assert info3["resumed_from_epoch"] == 0


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    split = write_split(tmp_path / "split", n_users=100, n_items=40, per_user=10)
    epochs = 12
    params = write_params(tmp_path / "params.yaml", epochs=epochs, batch_size=8)
    out = tmp_path / "enc"
    cmd = [sys.executable, "-m", "tasks.train_encoder", "--split", str(split), "--out", str(out),
           "--params", str(params)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 1 <= killed_at < epochs
    assert not (out / "metrics.json").exists()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= killed_at and metrics["epochs_run"] == epochs
    # the resumed run ends where an uninterrupted one does (per-epoch seeding)
    ref, _ = train_encoder.train(Split.load(split), {}, load_params("train_encoder", params), workdir=None)
    resumed = Recommender.load(out / "model")
    np.testing.assert_allclose(resumed.item_vecs_, ref.item_vecs_, rtol=1e-5, atol=1e-5)
