import json

import numpy as np
import pandas as pd
import pytest

from pipelines.data import Split
from pipelines.recommenders import ItemKNN, Popularity
from tasks import evaluate as ev
from tasks import split as split_stage
from tests.fixtures import write_blocks_dataset


@pytest.fixture()
def split_obj(tmp_path):
    d = write_blocks_dataset(tmp_path / "ds", n_users=40, n_items=30, per_user=10)
    r = pd.read_csv(d / "ratings.csv", dtype={"user_id": str, "item_id": str})
    items = pd.read_csv(d / "items.csv", dtype=str)
    res = split_stage.split(r, items, {"ratio": 0.7, "seed": 0, "cold_item_fraction": 0.1,
                                       "cold_user_fraction": 0.2, "cold_user_max": 2})
    users = pd.DataFrame({"user_id": sorted(r.user_id.unique())})
    return Split(res["train"], res["test"], users, items, res["slices"])


def test_knn_beats_popularity_on_planted_structure(split_obj):
    data = split_obj.interactions()
    models = {"popularity": Popularity().fit(data), "itemknn": ItemKNN(neighbors=10).fit(data)}
    res = ev.evaluate_models(split_obj, models, {}, {"ks": [5], "curve_ks": [1, 5]})
    m = res["metrics"]
    assert m["itemknn"]["all"]["ndcg@5"] > m["popularity"]["all"]["ndcg@5"]
    assert m["itemknn"]["cold_users"]["n_users"] > 0
    # CF cannot recommend items it never saw in training
    assert m["itemknn"]["cold_items"].get("recall@5", 0.0) == 0.0
    assert set(res["curve"]["model"]) == {"popularity", "itemknn"}


def test_precomputed_table_equals_model(split_obj):
    data = split_obj.interactions()
    model = ItemKNN(neighbors=10).fit(data)
    users = np.asarray(sorted(split_obj.test.user_id.unique()), dtype=object)
    items = model.recommend(users, k=50)
    rows = [(u, it, r + 1) for u, row in zip(users, items) for r, it in enumerate(row) if it]
    table = pd.DataFrame(rows, columns=["user_id", "item_id", "rank"])
    res = ev.evaluate_models(split_obj, {"a": model}, {"b": table}, {"ks": [5, 10]})
    assert res["metrics"]["a"] == res["metrics"]["b"]


def test_truth_sets_do_not_include_training_items(split_obj):
    users = np.asarray(sorted(split_obj.test.user_id.unique()), dtype=object)
    idx = pd.Index(split_obj.item_ids)
    truths = ev.truth_sets(split_obj, users, idx)
    train_pairs = set(zip(split_obj.train.user_id, idx.get_indexer(split_obj.train.item_id)))
    for u, t in zip(users, truths["all"]):
        assert not {(u, i) for i in t} & train_pairs


def test_cli_writes_metrics_report_and_plots(tmp_path, split_obj):
    sdir = tmp_path / "split"
    sdir.mkdir()
    split_obj.train.to_parquet(sdir / "train.parquet")
    split_obj.test.to_parquet(sdir / "test.parquet")
    split_obj.users.to_parquet(sdir / "users.parquet")
    split_obj.items.to_parquet(sdir / "items.parquet")
    (sdir / "slices.json").write_text(json.dumps(split_obj.slices))
    cf = tmp_path / "cf" / "full"
    ItemKNN(neighbors=5).fit(split_obj.interactions()).save(cf / "itemknn")
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  ks: [5, 10]\n")
    out = tmp_path / "eval"
    rc = ev.main(["--split", str(sdir), "--models", str(tmp_path / "cf"), "--out", str(out),
                  "--params", str(params)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["itemknn"]) == {"all", "cold_users", "cold_items"}
    assert 0 < metrics["itemknn"]["all"]["ndcg@10"] <= 1
    assert (out / "recall_curve.png").stat().st_size > 1000
    assert "| itemknn |" in (out / "report.md").read_text()
