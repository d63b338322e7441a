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
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipelines.data import Split
from pipelines.io import atomic_path, load_params
from pipelines.recommenders import REGISTRY, Recommender

from ._cli import parser, run_main

log = logging.getLogger("mmrec.fit_cf")

DEFAULTS = {"models": {"popularity": {}, "itemknn": {"neighbors": 100, "shrink": 0.0}},
            "folds": ["fit", "full"], "warm_start": True, "warm_iterations": {"als": 5, "bpr": 20}}
WARM_TYPES = ("als", "bpr")  # models whose fit() takes init=previous model


def build_model(name: str, hyper: dict | None):
    spec = dict(hyper or {})
    kind = spec.pop("type", name)
    if kind not in REGISTRY:
        raise ValueError(f"fit_cf.models.{name}: unknown model type '{kind}' "
                         f"(known: {sorted(REGISTRY)})")
    return REGISTRY[kind](**spec)


def previous_model(prev_dir: Path | None, fold: str, name: str, hyper: dict | None,
                   warm_iterations: dict) -> tuple[Recommender | None, str]:
    """The previous run's ``fold/name`` model if it can warm-start this one, and why (not)."""
    kind = dict(hyper or {}).get("type", name)
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


def fit_all(split: Split, params: dict, prev_dir: str | Path | None = None) -> dict:
    """Pure: fit every configured model on each fold. Returns {fold: {name: model}}, timings.

    ``prev_dir``: an earlier output of this stage; with ``warm_start`` its ALS/BPR
    models initialise the new ones (see the module docstring).
    """
    p = {**DEFAULTS, **(params or {})}
    models, seconds, warm = {}, {}, {}
    for fold in p["folds"]:
        data = split.interactions("fit" if fold == "fit" else None)
        models[fold] = {}
        for name, hyper in (p["models"] or {}).items():
            t0 = time.perf_counter()
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
                if dict(hyper or {}).get("type", name) in WARM_TYPES:
                    warm[f"{fold}/{name}"] = {"used": False, "reason": why}
            seconds[f"{fold}/{name}"] = round(time.perf_counter() - t0, 3)
    return {"models": models, "seconds": seconds, "warm_start": warm}


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
                json.dumps({"seconds": res["seconds"], "warm_start": res["warm_start"]}, indent=2),
                encoding="utf-8")
        print(f"fit_cf: {res['seconds']} warm start: "
              f"{sorted(k for k, v in res['warm_start'].items() if v['used'])}")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
