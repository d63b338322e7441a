"""fit_cf stage: fit every collaborative-filtering model named in params.

Each model is fitted twice: on the ``fit`` fold (``<out>/fit/<model>``, used
by later stages to learn on the validation fold without leakage) and on the
whole training set (``<out>/full/<model>``, used for test-time scoring).
Models are saved through the shared interface (JSON + safetensors + npz).

Warm start (``warm_start: true``, the default): models named in
``warm_iterations`` (ALS and BPR) start from the factors of the previous
run's model in ``--out`` when it is there (DVC keeps it: the output is
``persist``), aligned by user/item id (new users/items get a fresh random
init), and run ``warm_iterations[name]`` iterations instead of the full
``iterations``.  A previous model that cannot be used (absent, unreadable,
another type or factor size) means a cold fit, logged and recorded in
``summary.json`` (``warm_start``).

Tuning (``tune``): for each model named there, every combination of the listed
values (``{param: [values, ...]}``, a grid) is fitted on the ``fit`` fold and
scored by ``tune_metric`` (default ``ndcg@10``) on the validation fold (at most
``tune_max_users`` users, a seeded sample); the best combination (the first on
a tie) is used for both folds, except that the configured values (``models``),
when they are a grid point, stand unless beaten by more than ``tune_min_gain``
(relative, default 1%: smaller differences are the validation sample's
noise); the fitted ``fit``-fold winner is kept rather than fitted again.  The
defaults of ``params.yaml`` suit ML-100K; a catalogue of another shape may want
other values (the synthetic 1M benchmark: ALS with 96 factors scores below
popularity, with 8 factors above EASE), and the tuning finds them without a
hand-made search.  The test rows are never seen.  A warm-started
run reuses the previous run's choice when the grid, the tuning settings and the
model's other hyper-parameters are unchanged (no re-tuning on every increment).  The whole
table is written to ``summary.json`` (``tuning``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np

from pipelines.data import ITEM, USER, Split
from pipelines.io import atomic_path, load_params
from pipelines.metrics import METRICS
from pipelines.recommenders import REGISTRY, Recommender

from ._cli import parser, run_main

log = logging.getLogger("mmrec.fit_cf")

DEFAULTS = {"models": {"popularity": {}, "itemknn": {"neighbors": 100, "shrink": 0.0}},
            "folds": ["fit", "full"], "warm_start": True, "warm_iterations": {"als": 5, "bpr": 20},
            "tune": {}, "tune_metric": "ndcg@10", "tune_max_users": 5000, "tune_seed": 0,
            "tune_min_gain": 0.01}
WARM_TYPES = ("als", "bpr")  # models whose fit() takes init=previous model


def model_type(name: str, hyper: dict | None) -> str:
    """The registry key of model ``name``: its ``type`` hyper-parameter, else the name itself."""
    return dict(hyper or {}).get("type", name)


def build_model(name: str, hyper: dict | None):
    spec = dict(hyper or {})
    kind = model_type(name, spec)
    spec.pop("type", None)
    if kind not in REGISTRY:
        raise ValueError(f"fit_cf.models.{name}: unknown model type '{kind}' "
                         f"(known: {sorted(REGISTRY)})")
    return REGISTRY[kind](**spec)


def previous_model(prev_dir: Path | None, fold: str, name: str, hyper: dict | None,
                   warm_iterations: dict) -> tuple[Recommender | None, str]:
    """The previous run's ``fold/name`` model if it can warm-start this one, and why (not)."""
    kind = model_type(name, hyper)
    if kind not in WARM_TYPES or name not in (warm_iterations or {}):
        return None, "not warm-startable" if kind not in WARM_TYPES else "not in warm_iterations"
    path = None if prev_dir is None else Path(prev_dir) / fold / name
    if path is None or not (path / "config.json").is_file():
        return None, "no previous model"
    try:
        prev = Recommender.load(path)
    except ValueError as exc:
        log.warning("fit_cf: cold start for %s/%s: %s", fold, name, exc)
        return None, f"unreadable previous model ({exc})"
    want = build_model(name, hyper)
    if type(prev) is not type(want):
        return None, f"previous model is '{prev.name}', not '{want.name}'"
    if int(prev.params.get("factors", -1)) != int(want.params["factors"]):
        return None, (f"previous model has {prev.params.get('factors')} factors, "
                      f"params say {want.params['factors']}")
    return prev, "ok"


def parse_metric(spec: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``, against the metric registry."""
    name, _, k = str(spec).partition("@")
    if name not in METRICS or not k.isdigit() or int(k) < 1:
        raise ValueError(f"fit_cf.tune_metric: '{spec}' is not METRIC@K with METRIC one of "
                         f"{sorted(METRICS)} and K >= 1")
    return name, int(k)


def grid(name: str, spec) -> list[dict]:
    """Every combination of ``{param: [values]}`` in the order given (the first varies slowest)."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"fit_cf.tune.{name}: expected a mapping param -> list of values, got {spec!r}")
    for key, values in spec.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"fit_cf.tune.{name}.{key}: expected a non-empty list of values, "
                             f"got {values!r}")
    keys = list(spec)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec[k] for k in keys))]


def tuning_key(hyper: dict | None, spec: dict, extra: dict | None = None) -> str:
    """Fingerprint of a model's base hyper-parameters, its grid and the tuning settings
    (a previous choice is reused only when all are equal)."""
    blob = json.dumps({"hyper": dict(hyper or {}), "grid": spec, "tuning": extra or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def validation_targets(split: Split, data, max_users: int, seed: int) -> tuple[np.ndarray, list]:
    """User indices (in ``data``'s catalogue) and their sets of validation item indices.

    Users with no ``fit`` row are left out (no history to rank from); at most
    ``max_users`` of them, a seeded sample, so that tuning cost stays bounded.
    """
    val = split.val()
    if val.empty:
        return np.zeros(0, np.int64), []
    u = data.user_index(val[USER].to_numpy())
    i = data.item_index(val[ITEM].to_numpy())
    ok = (u >= 0) & (i >= 0)
    u, i = u[ok], i[ok]
    has_history = np.bincount(data.df["uidx"].to_numpy(), minlength=data.n_users) > 0
    keep = has_history[u]
    u, i = u[keep], i[keep]
    users = np.unique(u)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
        sel = np.isin(u, users)
        u, i = u[sel], i[sel]
    order = np.argsort(u, kind="stable")
    u, i = u[order], i[order]
    bounds = np.searchsorted(u, np.append(users, np.iinfo(np.int64).max))
    return users, [set(i[bounds[j]:bounds[j + 1]].tolist()) for j in range(len(users))]


def tune_model(name: str, hyper: dict | None, spec: dict, data, users: np.ndarray, truth: list,
               metric: str, min_gain: float = 0.0) -> tuple[dict, Recommender, list[dict], dict]:
    """Fit each grid point on ``data``; return the chosen hyper-parameters, its model, the table
    and how the choice was made.

    The configured values (``hyper``), when they are a grid point, stand unless another point
    beats them by more than ``min_gain`` (relative): a validation fold is a sample, and a
    difference of a few parts in ten thousand is noise, not a reason to move away from a
    tuned default.  Without the configured values in the grid the best point is taken.
    """
    mname, k = parse_metric(metric)
    base = {key: dict(hyper or {}).get(key) for key in spec}
    rows, best, configured = [], None, None
    for combo in grid(name, spec):
        h = {**dict(hyper or {}), **combo}
        t0 = time.perf_counter()
        model = build_model(name, h).fit(data)
        reco, _ = model.recommend_idx(users, k)
        value = float(np.mean(METRICS[mname](reco, truth, k)))
        rows.append({"params": combo, metric: round(value, 6),
                     "seconds": round(time.perf_counter() - t0, 3)})
        log.info("fit_cf: tune %s %s -> %s %.4f", name, combo, metric, value)
        if combo == base and configured is None:
            configured = (value, h, model)
        if best is None or value > best[0]:
            best = (value, h, model)
    how = {"configured": base if configured is not None else None, "min_gain": float(min_gain)}
    if configured is not None and best[0] <= configured[0] * (1.0 + float(min_gain)):
        how["kept_configured"] = True
        return configured[1], configured[2], rows, how
    how["kept_configured"] = False
    return best[1], best[2], rows, how


def previous_tuning(prev_dir: Path | None) -> dict:
    path = None if prev_dir is None else Path(prev_dir) / "summary.json"
    if path is None or not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("tuning") or {})
    except (ValueError, AttributeError) as exc:
        log.warning("fit_cf: previous summary %s unreadable (%s): tuning again", path, exc)
        return {}


def fit_all(split: Split, params: dict, prev_dir: str | Path | None = None) -> dict:
    """Pure: fit every configured model on each fold. Returns {fold: {name: model}}, timings.

    ``prev_dir``: an earlier output of this stage; with ``warm_start`` its ALS/BPR
    models initialise the new ones and its tuning choices are reused (see the
    module docstring).
    """
    p = {**DEFAULTS, **(params or {})}
    models_cfg = dict(p["models"] or {})
    tune_cfg = dict(p["tune"] or {})
    unknown = sorted(set(tune_cfg) - set(models_cfg))
    if unknown:
        raise ValueError(f"fit_cf.tune names models that fit_cf.models does not have: {unknown}")
    parse_metric(p["tune_metric"])
    for name, spec in tune_cfg.items():
        grid(name, spec)  # fail on a malformed grid before any fit

    models, seconds, warm, tuning = {}, {}, {}, {}
    hypers = {name: dict(h or {}) for name, h in models_cfg.items()}
    tuned_fit_models: dict[str, Recommender] = {}
    if tune_cfg:
        prev_tuning = previous_tuning(prev_dir) if p["warm_start"] else {}
        data_fit = split.interactions("fit")
        users = truth = None
        for name, spec in tune_cfg.items():
            key = tuning_key(hypers[name], spec, {k: p[k] for k in (
                "tune_metric", "tune_max_users", "tune_seed", "tune_min_gain")})
            prev = prev_tuning.get(name) or {}
            t0 = time.perf_counter()
            if prev.get("key") == key and isinstance(prev.get("chosen"), dict):
                hypers[name] = {**hypers[name], **prev["chosen"]}
                tuning[name] = {**prev, "reused": True}
                log.info("fit_cf: %s keeps the previous run's tuned %s", name, prev["chosen"])
                continue
            if users is None:
                users, truth = validation_targets(split, data_fit, int(p["tune_max_users"]),
                                                  int(p["tune_seed"]))
            if len(users) == 0:
                tuning[name] = {"key": key, "reused": False, "chosen": None,
                                "reason": "no validation rows: configured values kept"}
                log.warning("fit_cf: no validation rows to tune %s on: configured values kept", name)
                continue
            best, model, rows, how = tune_model(name, hypers[name], spec, data_fit, users, truth,
                                                p["tune_metric"], float(p["tune_min_gain"]))
            chosen = {k: best[k] for k in spec}
            hypers[name] = best
            tuned_fit_models[name] = model
            tuning[name] = {"key": key, "reused": False, "metric": p["tune_metric"],
                            "users": int(len(users)), "chosen": chosen, **how, "results": rows,
                            "seconds": round(time.perf_counter() - t0, 3)}
            print(f"fit_cf: tuned {name} on {len(users)} validation users: {chosen} "
                  f"({p['tune_metric']} " + ", ".join(
                      f"{r['params']}={r[p['tune_metric']]:.4f}" for r in rows) + ")")

    for fold in p["folds"]:
        data = split.interactions("fit" if fold == "fit" else None)
        models[fold] = {}
        for name, hyper in hypers.items():
            t0 = time.perf_counter()
            if fold == "fit" and name in tuned_fit_models:
                models[fold][name] = tuned_fit_models[name]  # fitted on this fold while tuning
                seconds[f"{fold}/{name}"] = 0.0
                if model_type(name, hyper) in WARM_TYPES:
                    warm[f"{fold}/{name}"] = {"used": False, "reason": "tuned in this run"}
                continue
            prev, why = (previous_model(prev_dir, fold, name, hyper, p["warm_iterations"])
                         if p["warm_start"] else (None, "warm_start off"))
            if prev is not None:
                hyper = {**(hyper or {}), "iterations": int(p["warm_iterations"][name])}
                models[fold][name] = build_model(name, hyper).fit(data, init=prev)
                warm[f"{fold}/{name}"] = {"used": True, "iterations": hyper["iterations"],
                                          "previous_users": len(prev.user_ids),
                                          "previous_items": len(prev.item_ids)}
            else:
                models[fold][name] = build_model(name, hyper).fit(data)
                if model_type(name, hyper) in WARM_TYPES:
                    warm[f"{fold}/{name}"] = {"used": False, "reason": why}
            seconds[f"{fold}/{name}"] = round(time.perf_counter() - t0, 3)
    return {"models": models, "seconds": seconds, "warm_start": warm, "tuning": tuning}


def main(argv=None) -> int:
    ap = parser("fit_cf", __doc__)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body():
        params = load_params("fit_cf", args.params)
        prev = Path(args.out) if Path(args.out).is_dir() else None
        res = fit_all(Split.load(args.split), params, prev_dir=prev)
        with atomic_path(args.out, is_dir=True) as tmp:
            for fold, models in res["models"].items():
                for name, model in models.items():
                    model.save(tmp / fold / name)
            (tmp / "summary.json").write_text(
                json.dumps({"seconds": res["seconds"], "warm_start": res["warm_start"],
                            "tuning": res["tuning"]}, indent=2),
                encoding="utf-8")
        print(f"fit_cf: {res['seconds']} warm start: "
              f"{sorted(k for k, v in res['warm_start'].items() if v['used'])}")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
