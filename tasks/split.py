"""split stage: train / validation fold / test, plus cold-user and cold-item slices.

Protocols (``split.protocol``):

* ``stratified``: per-user random split with ``ratio`` of each user's
  interactions in train (seeded), like Microsoft Recommenders'
  ``python_stratified_split``.
* ``temporal``: per-user last ``test_last_n`` interactions in test, or, when
  ``cutoff`` is set (Unix seconds or ISO date), a global time cut-off.

Then, inside train, ``val_ratio`` of each user's rows become fold ``val``
(the rest ``fit``): later stages tune / early-stop on it.  Cold items: a
``cold_item_fraction`` of items is held out of training entirely (all their
interactions go to test).  Cold users: a ``cold_user_fraction`` of users keep
only 1..``cold_user_max`` training interactions (the rest go to test); the
``cold_users`` slice is every user with at most ``cold_user_max`` training
interactions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.io import atomic_path, load_params
from pipelines.schema import ITEM, TS, USER

from ._cli import parser, run_main

DEFAULTS = {"protocol": "stratified", "ratio": 0.75, "seed": 42, "test_last_n": 1, "cutoff": None,
            "val_ratio": 0.1, "cold_user_max": 5, "cold_user_fraction": 0.0,
            "cold_item_fraction": 0.0, "min_user_interactions": 1}


def stable_uniform(df: pd.DataFrame, seed: int, salt: str) -> np.ndarray:
    """[len(df)] floats in [0, 1): a seeded hash of each row's values (no random stream).

    The same row gets the same number whatever other rows the frame holds, so
    appending data never moves an existing row's draw.
    """
    if not len(df):
        return np.zeros(0)
    key = f"{int(seed) % 10**8:08d}{salt:>8.8}"  # hash_pandas_object wants 16 characters
    if not any(pd.api.types.is_string_dtype(t) or t == object for t in df.dtypes):
        # the key only seeds the hash of strings: an all-numeric frame gets one string column
        df = df.assign(**{df.columns[0]: df[df.columns[0]].astype(str)})
    h = pd.util.hash_pandas_object(df, index=False, hash_key=key).to_numpy(np.uint64)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _id_uniform(ids: np.ndarray, seed: int, salt: str) -> np.ndarray:
    """:func:`stable_uniform` of each id (as a string)."""
    return stable_uniform(pd.DataFrame({"id": pd.Series(ids).astype(str)}), seed, salt)


def _pick(ids: np.ndarray, n: int, seed: int, salt: str) -> np.ndarray:
    """The ``n`` ids with the smallest seeded hash (the same whatever order ``ids`` come in)."""
    if n <= 0:
        return ids[:0]
    return np.sort(ids[np.argsort(_id_uniform(ids, seed, salt), kind="stable")[:n]])


def _rank_within_user(df: pd.DataFrame, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each row within its user after ordering by ``key``, and the user's count."""
    order = np.lexsort((key, df[USER].to_numpy()))
    users_sorted = df[USER].to_numpy()[order]
    starts = np.r_[0, np.nonzero(users_sorted[1:] != users_sorted[:-1])[0] + 1]
    counts = np.diff(np.r_[starts, len(order)])
    pos_sorted = np.arange(len(order)) - np.repeat(starts, counts)
    pos = np.empty(len(order), np.int64)
    pos[order] = pos_sorted
    cnt = np.empty(len(order), np.int64)
    cnt[order] = np.repeat(counts, counts)
    return pos, cnt


def split(ratings: pd.DataFrame, items: pd.DataFrame, params: dict) -> dict:
    """Pure split. Returns {'train', 'test', 'slices', 'summary'}; train has a ``fold`` column."""
    p = {**DEFAULTS, **(params or {})}
    seed = int(p["seed"])
    df = ratings.reset_index(drop=True).copy()
    if p["min_user_interactions"] > 1:
        counts = df.groupby(USER)[ITEM].transform("size")
        df = df[counts >= int(p["min_user_interactions"])].reset_index(drop=True)

    # cold items: held out of training entirely
    all_items = items[ITEM].astype(str).to_numpy()
    n_cold_items = int(round(float(p["cold_item_fraction"]) * len(all_items)))
    cold_items = _pick(all_items, n_cold_items, seed, "coldit") if n_cold_items else \
        np.array([], dtype=object)
    is_cold_item = df[ITEM].isin(set(cold_items)).to_numpy()

    protocol = p["protocol"]
    row_cols = [c for c in (USER, ITEM, TS) if c in df.columns]
    if protocol == "stratified":
        key = stable_uniform(df[row_cols], seed, "split")
        pos, cnt = _rank_within_user(df, key)
        in_train = pos < np.round(cnt * float(p["ratio"]))
    elif protocol == "temporal":
        if p.get("cutoff") not in (None, ""):
            cutoff = p["cutoff"]
            cut = float(cutoff) if str(cutoff).replace(".", "").isdigit() else \
                pd.Timestamp(cutoff, tz="UTC").timestamp()
            in_train = df[TS].to_numpy() < cut
        else:
            key = df[TS].to_numpy().astype(np.float64) + \
                stable_uniform(df[row_cols], seed, "tie") * 1e-3
            pos, cnt = _rank_within_user(df, key)
            in_train = pos < cnt - int(p["test_last_n"])
    else:
        raise ValueError(f"split.protocol: unknown protocol '{protocol}' (stratified|temporal)")
    in_train &= ~is_cold_item

    # cold users: truncate a fraction of users' training histories
    users = np.sort(df[USER].unique())
    n_cold_users = int(round(float(p["cold_user_fraction"]) * len(users)))
    if n_cold_users:
        picked = _pick(users, n_cold_users, seed, "colduser")
        chosen = set(picked)
        sel = df[USER].isin(chosen).to_numpy() & in_train
        keep_n = {u: 1 + int(d * int(p["cold_user_max"]))
                  for u, d in zip(picked, _id_uniform(picked, seed, "keepn"))}
        sub = df[sel]
        key = df[TS].to_numpy()[sel].astype(np.float64) if protocol == "temporal" else \
            stable_uniform(sub[row_cols], seed, "coldkeep")
        pos, _ = _rank_within_user(sub, key)
        limit = sub[USER].map(keep_n).to_numpy()
        drop = np.nonzero(sel)[0][pos >= limit]
        in_train[drop] = False

    train = df[in_train].copy()
    test = df[~in_train].copy()
    # validation fold inside train
    fold = np.full(len(train), "fit", dtype=object)
    if float(p["val_ratio"]) > 0 and len(train):
        key = train[TS].to_numpy().astype(np.float64) if protocol == "temporal" else \
            stable_uniform(train[row_cols], seed, "val")
        pos, cnt = _rank_within_user(train, key)
        n_val = np.floor(cnt * float(p["val_ratio"])).astype(np.int64)
        fold[pos >= cnt - n_val] = "val"
    train["fold"] = pd.array(fold, dtype="string")

    n_train = train.groupby(USER).size()
    all_users = np.sort(df[USER].unique())
    n_train = n_train.reindex(all_users, fill_value=0)
    cold_users = n_train[n_train <= int(p["cold_user_max"])].index.to_numpy()
    slices = {"cold_users": [str(u) for u in cold_users], "cold_items": [str(i) for i in cold_items]}
    summary = {"protocol": protocol, "n_train": int(len(train)), "n_test": int(len(test)),
               "n_val": int((fold == "val").sum()), "n_users": int(len(all_users)),
               "n_cold_users": len(slices["cold_users"]), "n_cold_items": len(slices["cold_items"]),
               "test_users": int(test[USER].nunique())}
    return {"train": train.reset_index(drop=True), "test": test.reset_index(drop=True),
            "slices": slices, "summary": summary}


def main(argv=None) -> int:
    ap = parser("split", __doc__)
    ap.add_argument("--data", required=True, help="validated dataset dir (artifacts/validate)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body():
        params = load_params("split", args.params)
        data = Path(args.data)
        ratings = pd.read_parquet(data / "ratings.parquet")
        items = pd.read_parquet(data / "items.parquet")
        users_file = data / "users.parquet"
        users = pd.read_parquet(users_file) if users_file.exists() else \
            pd.DataFrame({USER: np.sort(ratings[USER].unique())})
        res = split(ratings, items, params)
        import json

        with atomic_path(args.out, is_dir=True) as tmp:
            res["train"].to_parquet(tmp / "train.parquet", index=False)
            res["test"].to_parquet(tmp / "test.parquet", index=False)
            items.to_parquet(tmp / "items.parquet", index=False)
            users.to_parquet(tmp / "users.parquet", index=False)
            (tmp / "slices.json").write_text(json.dumps(res["slices"]), encoding="utf-8")
            (tmp / "summary.json").write_text(json.dumps(res["summary"], indent=2), encoding="utf-8")
        print(f"split: {res['summary']}")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
