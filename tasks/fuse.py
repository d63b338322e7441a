"""fuse stage: hybrid learning-to-rank over every candidate source, with readable reasons.

Training uses only the ``fit``-fold models (``<cf>/fit/<name>``, the encoder's
``model_fit``) and ``fit``-fold interactions for candidates and features, and
the ``val`` fold for labels; test-time recommendations use the ``full`` models
and every training row with the same feature code (see :mod:`pipelines.fusion`).
A source with only one of the two variants is skipped (logged).

Inputs other than ``--split`` and ``--cf`` are optional: a directory that does
not exist is skipped with a log line (its features are simply absent).

Outputs (``--out``): ``recommendations.parquet`` (user_id, item_id, rank,
score, reason, sources; every catalogue user), ``model.txt`` (LightGBM text
model; ``model.json`` tree dump for the scikit-learn fallback) +
``features.json``, ``cold_model.txt`` + ``cold_features.json`` (the cold-user
ranker, when one was trained: ``summary.json`` ``cold_ranker``),
``feature_importance.json``, ``user_state.parquet`` (a digest of each user's
training rows), ``summary.json`` (timings, candidates
per user, candidate recall on the validation fold, k, ``warm_start``).

Incremental retraining (``warm_start: true``): when ``--out`` already holds an
earlier output of this stage, its ranker is reused if the data grew little
(:func:`pipelines.fusion.reuse_decision`); the fit-fold models are then not
loaded, and only the users whose digest changed are rescored
(``rescore: changed``).  ``summary.json`` says what was reused and why (not).
``--report``: ``feature_importance.json`` + ``feature_importance.png``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from pipelines import fusion
from pipelines.data import Split
from pipelines.io import atomic_path, load_params
from pipelines.recommenders import Recommender

from ._cli import parser, run_main

log = logging.getLogger("mmrec.fuse")

MODALITIES = ("text", "image", "video")


def load_sources(cf: str | Path, encoder: str | Path | None,
                 lazy_fit: bool = False) -> tuple[dict | Callable[[], dict], dict]:
    """Fit / full models of every source found (fit_cf layout and the encoder's).

    ``lazy_fit``: the fit models come back as a function that loads them (a reused ranker
    never needs them)."""
    cf = Path(cf)
    if not cf.is_dir():
        raise FileNotFoundError(f"--cf {cf}: no such directory")
    fusion.register_recommenders()
    found = fusion.discover_sources(cf)
    full_only = {d.name for d in (cf / "full").iterdir() if (d / "config.json").exists()} \
        if (cf / "full").is_dir() else set()
    for name in sorted(full_only - set(found)):
        log.info("fuse: %s has no 'fit' variant under %s, skipped", name, cf)
    if encoder is not None:
        enc = Path(encoder)
        if not enc.is_dir():
            log.info("fuse: encoder dir %s does not exist, skipped", enc)
        else:
            got = fusion.discover_sources(enc)
            if not got:
                log.info("fuse: %s has no fit + full model pair (model_fit/ + model/ or fit/ + "
                         "full/), encoder skipped", enc)
            for name in got:
                if name in found:
                    raise ValueError(f"fuse: source name '{name}' found both in {cf} and {enc}")
            found.update(got)
    full = {n: Recommender.load(full) for n, (_f, full) in found.items()}
    # an ensemble (the encoder's refit + phase-1 models) is paired with its fit variant (one
    # model trained on the fit rows) through its first member only, the model trained the same
    # way on every training row: the ranker then meets at test time the kind of scores it
    # learned from (with the whole ensemble, ML-100K stratified hybrid 0.4987 vs 0.5003)
    full = {n: m.first_member() if hasattr(m, "first_member") else m for n, m in full.items()}

    def fit() -> dict:
        return {n: Recommender.load(f) for n, (f, _full) in found.items()}

    return (fit if lazy_fit else fit()), full


def load_previous(out: str | Path) -> tuple[dict | None, str]:
    """An earlier output of this stage in ``out`` (ranker, summary, recommendations, user
    state), or None and why.  A partial or unreadable output is not reused (logged)."""
    out = Path(out)
    need = ["summary.json", "features.json", "recommendations.parquet", "user_state.parquet"]
    missing = [n for n in need if not (out / n).is_file()]
    if missing:
        return None, f"{out}: no previous output ({', '.join(missing)} missing)"
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        files = [summary.get("model_file", "model.txt"),
                 (summary.get("cold_ranker") or {}).get("model_file")]
        missing = [n for n in files if n and not (out / n).is_file()]
        if missing:
            return None, f"{out}: no previous output ({', '.join(missing)} missing)"
        prev = {"summary": summary,
                "ranker": fusion.Ranker.load(out),
                "cold_ranker": None,
                "recommendations": pd.read_parquet(out / "recommendations.parquet"),
                "user_state": pd.read_parquet(out / "user_state.parquet")}
        if (prev["summary"].get("cold_ranker") or {}).get("used"):
            prev["cold_ranker"] = fusion.Ranker.load(out, prefix="cold_")
    except (OSError, ValueError, KeyError) as exc:  # reported, and the ranker is retrained
        return None, f"{out}: previous output unreadable ({type(exc).__name__}: {exc})"
    return prev, "ok"


def load_item_features(dirs: dict[str, str | None]) -> dict[str, tuple]:
    from pipelines.features import read_features

    out = {}
    for mod, d in dirs.items():
        if d is None:
            continue
        path = Path(d)
        if not (path / "features.parquet").exists():
            log.info("fuse: %s features %s not found, skipped", mod, path)
            continue
        ids, emb, present, _table = read_features(path)
        out[mod] = (ids, emb, present)
    return out


def load_profiles(d: str | Path | None) -> pd.DataFrame | None:
    if d is None:
        return None
    path = Path(d) / "profiles.parquet"
    if not path.exists():
        log.info("fuse: profiles %s not found, skipped", path)
        return None
    import pyarrow.parquet as pq

    cols = pq.read_schema(path).names
    keep = [c for c in ("user_id", "segment") if c in cols]
    if "user_id" not in keep:
        log.info("fuse: %s has no user_id column, profiles skipped", path)
        return None
    return pd.read_parquet(path, columns=keep)


def plot_importance(imp: dict, path: Path, top: int = 30) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(imp.items(), key=lambda kv: -kv[1]["gain"])[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v["gain_share"] for _, v in items], color="#4C72B0")
    ax.set_xlabel("share of total gain")
    ax.set_title("Hybrid ranker: feature importance")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = parser("fuse", __doc__)
    ap.add_argument("--split", required=True)
    ap.add_argument("--cf", required=True, help="fit_cf output (fit/<model>, full/<model>)")
    ap.add_argument("--encoder", default=None, help="train_encoder output (model_fit/, model/)")
    ap.add_argument("--profiles", default=None, help="build_profiles output (profiles.parquet)")
    for m in MODALITIES:
        ap.add_argument(f"--{m}", default=None, help=f"preprocess_{m} output (features.parquet)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", default=None)
    args = ap.parse_args(argv)

    def body():
        t0 = time.perf_counter()
        params = load_params("fuse", args.params)
        split = Split.load(args.split)
        previous, why = load_previous(args.out) if params.get("warm_start") else (None, "off")
        if previous is None and params.get("warm_start"):
            log.info("fuse: %s", why)
        fit, full = load_sources(args.cf, args.encoder, lazy_fit=True)
        feats = load_item_features({m: getattr(args, m) for m in MODALITIES})
        profiles = load_profiles(args.profiles)
        t_load = time.perf_counter() - t0
        res = fusion.fuse(split, fit, full, feats, profiles, params, previous=previous)
        summary = res["summary"]
        if previous is None and params.get("warm_start"):
            summary["warm_start"]["reason"] = why
        summary["seconds"]["load"] = round(t_load, 3)
        summary["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        summary["model_file"] = res["ranker"].model_file()
        if res["cold_ranker"] is not None:
            summary["cold_ranker"]["model_file"] = res["cold_ranker"].model_file("cold_")
        imp = res["importances"]
        with atomic_path(args.out, is_dir=True) as tmp:
            res["recommendations"].to_parquet(tmp / "recommendations.parquet", index=False)
            res["ranker"].save(tmp)
            if res["cold_ranker"] is not None:
                res["cold_ranker"].save(tmp, prefix="cold_")
            res["user_state"].to_parquet(tmp / "user_state.parquet", index=False)
            (tmp / "feature_importance.json").write_text(json.dumps(imp, indent=2), encoding="utf-8")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=float),
                                              encoding="utf-8")
        if args.report:
            with atomic_path(args.report, is_dir=True) as tmp:
                (tmp / "feature_importance.json").write_text(json.dumps(imp, indent=2),
                                                             encoding="utf-8")
                plot_importance(imp, tmp / "feature_importance.png")
        tr = summary["training"]
        print(f"fuse: {len(res['recommendations'])} recommendations for {summary['n_users']} users, "
              f"sources {summary['sources']}, candidate recall on val {tr['candidate_recall']:.3f}, "
              f"{summary['seconds']['total']:.1f}s")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
