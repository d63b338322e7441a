"""The command line shared by the ``preprocess_*`` stages (a code dependency of each, see
:attr:`pipelines.graph.Stage.task_code`)."""

from __future__ import annotations

from typing import Callable

from pipelines.features import FeatureCache, load_items, prepare_cpu_runtime, write_features
from pipelines.io import atomic_path, load_params

from ._cli import parser, run_main


def feature_stage_main(argv, *, stage: str, doc: str | None, defaults: dict, noun: str,
                       compute: Callable, media_root: bool = False,
                       write_extra: Callable | None = None) -> int:
    """The command line shared by the ``preprocess_*`` stages.

    ``--data`` (the validated dataset), ``--out`` and, with ``media_root``, ``--media-root``;
    the stage's ``params.yaml`` section over ``defaults``.  ``compute(items, params, cache)``
    (with ``media_root``: ``compute(items, media_root, params, cache)``) returns
    ``{"features", "meta", ...}``; the feature table, ``meta.json`` and whatever
    ``write_extra(tmp_dir, result)`` adds are written to ``--out`` atomically, then one line
    saying how many items have ``noun`` (e.g. "an image").
    """
    ap = parser(stage, doc)
    ap.add_argument("--data", required=True, help="validated dataset dir (artifacts/validate)")
    if media_root:
        ap.add_argument("--media-root", required=True,
                        help=f"dataset dir the {stage.split('_')[-1]} paths are relative to")
    ap.add_argument("--out", required=True, help=f"output dir (artifacts/{stage})")
    args = ap.parse_args(argv)
    prepare_cpu_runtime()

    def body():
        params = {**defaults, **load_params(stage, args.params)}
        items = load_items(args.data)
        cache = FeatureCache.load(args.out, enabled=bool(params["cache"]))
        res = (compute(items, args.media_root, params, cache=cache) if media_root
               else compute(items, params, cache=cache))
        with atomic_path(args.out, is_dir=True) as tmp:
            write_features(tmp, res["features"], res["meta"])
            if write_extra is not None:
                write_extra(tmp, res)
        m = res["meta"]
        missing = f"missing {m['missing_reasons']}, " if media_root else ""
        print(f"{stage}: {m['n_present']}/{m['n_items']} items with {noun}, "
              f"{m['n_encoded_this_run']} encoded, {m['n_reused_from_cache']} from cache, "
              f"{missing}{m['seconds']:.1f}s")

    return run_main(body)
