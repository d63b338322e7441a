"""evaluate stage: every model on the same split, per slice, one metric signature.

Slices: ``all`` (every test user, all test items), ``cold_users`` (users with
at most ``split.cold_user_max`` training interactions), ``cold_items`` (only
test interactions on items held out of training; users without any are not
counted).  Items seen in training are excluded from recommendations.

Outputs ``metrics.json`` shaped ``{model: {slice: {"ndcg@10": x, ...}}}``
(DVC metrics), ``recall_curve.csv`` (DVC plot), ``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data import Split
from pipelines.io import atomic_path, load_params
from pipelines.metrics import evaluate as eval_metrics
from pipelines.recommenders import Recommender
from pipelines.schema import ITEM, USER

from ._cli import parser, run_main

DEFAULTS = {"ks": [1, 5, 10, 20], "curve_ks": [1, 2, 5, 10, 20, 50], "primary": "ndcg@10",
            "slices": ["all", "cold_users", "cold_items"], "batch_size": 2048}


def truth_sets(split: Split, users: np.ndarray, item_index: pd.Index) -> dict[str, list]:
    """Per slice, per user (in ``users`` order), the set of relevant item indices."""
    test = split.test
    cold_items = set(split.slices.get("cold_items", []))
    cold_users = set(split.slices.get("cold_users", []))
    iidx = item_index.get_indexer(test[ITEM].astype(str))
    groups: dict[str, set] = {u: set() for u in users}
    groups_ci: dict[str, set] = {u: set() for u in users}
    for u, i, it in zip(test[USER].astype(str).to_numpy(), iidx, test[ITEM].astype(str).to_numpy()):
        if i < 0:
            continue
        groups[u].add(int(i))
        if it in cold_items:
            groups_ci[u].add(int(i))
    return {
        "all": [groups[u] for u in users],
        "cold_users": [groups[u] if u in cold_users else set() for u in users],
        "cold_items": [groups_ci[u] for u in users],
    }


def recs_from_table(table: pd.DataFrame, users: np.ndarray, item_index: pd.Index, k: int) -> np.ndarray:
    """Turn a (user_id, item_id, rank) table into an index array [n_users, k] (-1 padded)."""
    out = np.full((len(users), k), -1, dtype=np.int64)
    t = table.sort_values([USER, "rank"])
    t = t[t["rank"] <= k]
    uidx = pd.Index(users).get_indexer(t[USER].astype(str))
    ok = uidx >= 0
    out[uidx[ok], t["rank"].to_numpy()[ok] - 1] = item_index.get_indexer(t[ITEM].astype(str))[ok]
    return out


def evaluate_models(split: Split, recommenders: dict[str, Recommender],
                    tables: dict[str, pd.DataFrame], params: dict) -> dict:
    p = {**DEFAULTS, **(params or {})}
    kmax = max(max(p["ks"]), max(p["curve_ks"]))
    users = np.asarray(sorted(split.test[USER].astype(str).unique()), dtype=object)
    item_index = pd.Index(split.item_ids)
    truths = truth_sets(split, users, item_index)
    results, curves = {}, []
    recos = {}
    for name, model in recommenders.items():
        if list(model.item_ids) != list(item_index):
            model_index = pd.Index(model.item_ids)
            idx, _ = model.recommend_idx(model.user_index(users), kmax)
            mapped = np.where(idx >= 0, item_index.get_indexer(model_index[np.maximum(idx, 0)]), -1)
            recos[name] = mapped
        else:
            recos[name], _ = model.recommend_idx(model.user_index(users), kmax)
    for name, table in tables.items():
        recos[name] = recs_from_table(table, users, item_index, kmax)
    for name, reco in recos.items():
        results[name] = {}
        for sl in p["slices"]:
            results[name][sl] = eval_metrics(reco, truths[sl], p["ks"], n_items=len(item_index))
        curve = eval_metrics(reco, truths["all"], p["curve_ks"])
        for k in p["curve_ks"]:
            if f"recall@{k}" in curve:
                curves.append({"model": name, "k": k, "recall": curve[f"recall@{k}"],
                               "ndcg": curve[f"ndcg@{k}"]})
    return {"metrics": results, "curve": pd.DataFrame(curves)}


def render_report(metrics: dict, primary: str, ks) -> str:
    lines = ["# Evaluation report", "",
             f"Primary metric: `{primary}`. Items seen in training are excluded.", ""]
    for sl in ("all", "cold_users", "cold_items"):
        rows = {m: v.get(sl, {}) for m, v in metrics.items()}
        if not any(r.get("n_users") for r in rows.values()):
            lines += [f"## Slice `{sl}`", "", "_empty slice (no users)_", ""]
            continue
        cols = [f"{m}@10" for m in ("ndcg", "precision", "recall", "map", "hitrate")] + ["coverage@10"]
        cols = [c for c in cols if any(c in r for r in rows.values())]
        lines += [f"## Slice `{sl}`", "", "| model | users | " + " | ".join(cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        best = {c: max((r.get(c, float("-inf")) for r in rows.values()), default=0) for c in cols}
        for m in sorted(rows, key=lambda m: -rows[m].get(primary, -1)):
            r = rows[m]
            cells = []
            for c in cols:
                v = r.get(c)
                s = "" if v is None else f"{v:.4f}"
                cells.append(f"**{s}**" if v is not None and v == best[c] else s)
            lines.append(f"| {m} | {int(r.get('n_users', 0))} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![Recall@K](recall_curve.png)", "", "![ndcg@10 per slice](slices.png)", ""]
    return "\n".join(lines)


def plot(metrics: dict, curve: pd.DataFrame, out: Path, primary: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in curve.groupby("model"):
        ax.plot(g["k"], g["recall"], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title("Recall@K (slice: all)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recall_curve.png", dpi=110)
    plt.close(fig)

    slices = ["all", "cold_users", "cold_items"]
    models = list(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / max(len(models), 1)
    for j, m in enumerate(models):
        vals = [metrics[m].get(s, {}).get(primary, 0.0) for s in slices]
        ax.bar(np.arange(len(slices)) + j * w, vals, w, label=m)
    ax.set_xticks(np.arange(len(slices)) + 0.4 - w / 2, slices)
    ax.set_ylabel(primary)
    ax.set_title(f"{primary} per slice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "slices.png", dpi=110)
    plt.close(fig)


def discover_models(roots: list[str]) -> dict[str, Path]:
    """Model dirs: a dir with config.json, or <root>/full/<name>/config.json."""
    found = {}
    for root in roots:
        root = Path(root)
        if (root / "config.json").exists():
            name = json.loads((root / "config.json").read_text(encoding="utf-8"))["model"]
            found[name] = root
            continue
        if (root / "model" / "config.json").exists():
            name = json.loads((root / "model" / "config.json").read_text(encoding="utf-8"))["model"]
            found[name] = root / "model"
            continue
        base = root / "full" if (root / "full").is_dir() else root
        if not base.is_dir():
            raise FileNotFoundError(f"{root}: no model directory")
        for d in sorted(base.iterdir()):
            if (d / "config.json").exists():
                found[d.name] = d
    return found


def main(argv=None) -> int:
    ap = parser("evaluate", __doc__)
    ap.add_argument("--split", required=True)
    ap.add_argument("--models", nargs="*", default=[], help="model dirs or roots")
    ap.add_argument("--recs", nargs="*", default=[], help="NAME=recommendations.parquet")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body():
        params = {**DEFAULTS, **load_params("evaluate", args.params)}
        split = Split.load(args.split)
        models = {n: Recommender.load(p) for n, p in discover_models(args.models).items()}
        tables = {}
        for spec in args.recs:
            name, _, path = spec.partition("=")
            tables[name] = pd.read_parquet(path)
        res = evaluate_models(split, models, tables, params)
        with atomic_path(args.out, is_dir=True) as tmp:
            (tmp / "metrics.json").write_text(json.dumps(res["metrics"], indent=2, sort_keys=True),
                                              encoding="utf-8")
            res["curve"].to_csv(tmp / "recall_curve.csv", index=False)
            (tmp / "report.md").write_text(render_report(res["metrics"], params["primary"],
                                                         params["ks"]), encoding="utf-8")
            plot(res["metrics"], res["curve"], tmp, params["primary"])
        primary = params["primary"]
        for name, m in sorted(res["metrics"].items(), key=lambda kv: -kv[1]["all"].get(primary, 0)):
            print(f"{name:>12}  " + "  ".join(f"{sl}:{m[sl].get(primary, float('nan')):.4f}"
                                            for sl in m))

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
