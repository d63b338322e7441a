"""fit_cf stage: fit every collaborative-filtering model named in params.

Each model is fitted twice: on the ``fit`` fold (``<out>/fit/<model>``, used
by later stages to learn on the validation fold without leakage) and on the
whole training set (``<out>/full/<model>``, used for test-time scoring).
Models are saved through the shared interface (JSON + safetensors + npz).
"""

from __future__ import annotations

import json
import time

from pipelines.data import Split
from pipelines.io import atomic_path, load_params
from pipelines.recommenders import REGISTRY

from ._cli import parser, run_main

DEFAULTS = {"models": {"popularity": {}, "itemknn": {"neighbors": 100, "shrink": 0.0}},
            "folds": ["fit", "full"]}


def build_model(name: str, hyper: dict | None):
    spec = dict(hyper or {})
    kind = spec.pop("type", name)
    if kind not in REGISTRY:
        raise ValueError(f"fit_cf.models.{name}: unknown model type '{kind}' "
                         f"(known: {sorted(REGISTRY)})")
    return REGISTRY[kind](**spec)


def fit_all(split: Split, params: dict) -> dict:
    """Pure: fit every configured model on each fold. Returns {fold: {name: model}}, timings."""
    p = {**DEFAULTS, **(params or {})}
    models, seconds = {}, {}
    for fold in p["folds"]:
        data = split.interactions("fit" if fold == "fit" else None)
        models[fold] = {}
        for name, hyper in (p["models"] or {}).items():
            t0 = time.perf_counter()
            models[fold][name] = build_model(name, hyper).fit(data)
            seconds[f"{fold}/{name}"] = round(time.perf_counter() - t0, 3)
    return {"models": models, "seconds": seconds}


def main(argv=None) -> int:
    ap = parser("fit_cf", __doc__)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body():
        params = load_params("fit_cf", args.params)
        res = fit_all(Split.load(args.split), params)
        with atomic_path(args.out, is_dir=True) as tmp:
            for fold, models in res["models"].items():
                for name, model in models.items():
                    model.save(tmp / fold / name)
            (tmp / "summary.json").write_text(json.dumps({"seconds": res["seconds"]}, indent=2),
                                              encoding="utf-8")
        print(f"fit_cf: {res['seconds']}")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
