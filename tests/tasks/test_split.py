import json

import numpy as np
import pandas as pd
import pytest

from tasks import split as split_stage


def _ratings(n_users=30, per_user=20, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for j, i in enumerate(rng.choice(50, per_user, replace=False)):
            rows.append((f"u{u}", f"i{i}", 1000 + j * 10 + u, 4.0))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])


ITEMS = pd.DataFrame({"item_id": [f"i{i}" for i in range(50)]})


def test_stratified_ratio_per_user_and_disjoint():
    r = _ratings()
    res = split_stage.split(r, ITEMS, {"ratio": 0.75, "seed": 42, "val_ratio": 0.0})
    tr, te = res["train"], res["test"]
    assert len(tr) + len(te) == len(r)
    assert (tr.groupby("user_id").size() == 15).all()
    pairs_tr = set(zip(tr.user_id, tr.item_id))
    assert not pairs_tr & set(zip(te.user_id, te.item_id))


def test_seed_is_deterministic_and_matters():
    r = _ratings()
    a = split_stage.split(r, ITEMS, {"seed": 1})["test"]
    b = split_stage.split(r, ITEMS, {"seed": 1})["test"]
    c = split_stage.split(r, ITEMS, {"seed": 2})["test"]
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_temporal_last_n_puts_latest_in_test():
    r = _ratings()
    res = split_stage.split(r, ITEMS, {"protocol": "temporal", "test_last_n": 2, "val_ratio": 0})
    te, tr = res["test"], res["train"]
    assert (te.groupby("user_id").size() == 2).all()
    last_train = tr.groupby("user_id")["timestamp"].max()
    first_test = te.groupby("user_id")["timestamp"].min()
    assert (last_train < first_test.loc[last_train.index]).all()


def test_temporal_cutoff():
    r = _ratings()
    res = split_stage.split(r, ITEMS, {"protocol": "temporal", "cutoff": 1100, "val_ratio": 0})
    assert (res["train"]["timestamp"] < 1100).all() and (res["test"]["timestamp"] >= 1100).all()


def test_validation_fold_is_inside_train():
    res = split_stage.split(_ratings(), ITEMS, {"val_ratio": 0.2})
    tr = res["train"]
    assert set(tr["fold"]) == {"fit", "val"}
    assert (tr[tr.fold == "val"].groupby("user_id").size() == 3).all()  # floor(15 * 0.2)


def test_cold_items_never_in_train_and_cold_users_truncated():
    r = _ratings()
    res = split_stage.split(r, ITEMS, {"cold_item_fraction": 0.1, "cold_user_fraction": 0.2,
                                       "cold_user_max": 3, "seed": 3})
    cold_items = set(res["slices"]["cold_items"])
    assert len(cold_items) == 5
    assert not cold_items & set(res["train"]["item_id"])
    n_train = res["train"].groupby("user_id").size().reindex(r.user_id.unique(), fill_value=0)
    cold_users = set(res["slices"]["cold_users"])
    assert cold_users == set(n_train[n_train <= 3].index)
    assert len(cold_users) >= 6  # the truncated 20% of 30 users


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="split.protocol"):
        split_stage.split(_ratings(), ITEMS, {"protocol": "magic"})


def test_cli_writes_outputs_atomically(tmp_path):
    data = tmp_path / "validated"
    data.mkdir()
    _ratings().to_parquet(data / "ratings.parquet")
    ITEMS.to_parquet(data / "items.parquet")
    params = tmp_path / "params.yaml"
    params.write_text("split:\n  ratio: 0.5\n  seed: 1\n")
    out = tmp_path / "split"
    assert split_stage.main(["--data", str(data), "--out", str(out), "--params", str(params)]) == 0
    for f in ("train.parquet", "test.parquet", "users.parquet", "items.parquet", "slices.json",
              "summary.json"):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] + summary["n_test"] == 600
    before = (out / "train.parquet").read_bytes()
    params.write_text("split:\n  protocol: nope\n")
    assert split_stage.main(["--data", str(data), "--out", str(out), "--params", str(params)]) == 1
    assert (out / "train.parquet").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("protocol", ["stratified", "temporal"])
def test_appended_data_leaves_unchanged_users_rows_where_they_were(protocol):
    """New users, new items and new rows of some users: every other user keeps the same
    train / val / test rows (an incremental rerun only has to redo the changed users)."""
    r = _ratings()
    rng = np.random.default_rng(0)
    grown_users = ["u0", "u1", "u2"]
    extra = pd.DataFrame({
        "user_id": grown_users * 4 + ["new1"] * 10 + ["new2"] * 10,
        "item_id": [f"i{j}" for j in rng.integers(0, 50, 12)] + [f"i{j}" for j in range(20)],
        "rating": 4.0, "timestamp": 2_000_000_000 + np.arange(32)})
    grown = pd.concat([extra.iloc[:5], r, extra.iloc[5:]], ignore_index=True)  # order shuffled too
    p = {"protocol": protocol, "seed": 7, "val_ratio": 0.2}
    a, b = split_stage.split(r, ITEMS, p), split_stage.split(grown, ITEMS, p)

    def rows(res, part):
        df = res[part]
        df = df[~df.user_id.isin(grown_users + ["new1", "new2"])]
        cols = ["user_id", "item_id", "timestamp"] + (["fold"] if part == "train" else [])
        return df[cols].astype(str).sort_values(cols).reset_index(drop=True)

    pd.testing.assert_frame_equal(rows(a, "train"), rows(b, "train"))
    pd.testing.assert_frame_equal(rows(a, "test"), rows(b, "test"))
    # ... while the grown users do get rows of their new interactions in train
    assert len(b["train"][b["train"].user_id.isin(grown_users)]) > \
        len(a["train"][a["train"].user_id.isin(grown_users)])


def test_cold_choices_do_not_depend_on_row_order():
    r = _ratings()
    p = {"cold_item_fraction": 0.1, "cold_user_fraction": 0.2, "cold_user_max": 3, "seed": 3}
    a = split_stage.split(r, ITEMS, p)
    b = split_stage.split(r.sample(frac=1.0, random_state=1), ITEMS.sample(frac=1.0, random_state=2), p)
    assert a["slices"]["cold_items"] == b["slices"]["cold_items"]
    assert a["slices"]["cold_users"] == b["slices"]["cold_users"]


def test_seed_matters_with_numeric_ids_too():
    r = _ratings()
    r["user_id"] = r["user_id"].str[1:].astype(int)
    r["item_id"] = r["item_id"].str[1:].astype(int)
    a = split_stage.split(r, ITEMS, {"seed": 1})["test"]
    assert a.equals(split_stage.split(r, ITEMS, {"seed": 1})["test"])
    assert not a.equals(split_stage.split(r, ITEMS, {"seed": 2})["test"])
