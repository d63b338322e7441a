"""build_profiles stage: one multi-dimensional profile per user (see ``pipelines.profiles``).

    python -m tasks.build_profiles --split artifacts/split --text artifacts/preprocess_text \\
        --image artifacts/preprocess_image --video artifacts/preprocess_video \\
        --encoder artifacts/train_encoder --out artifacts/build_profiles --params params.yaml

Inputs: the split's ``train.parquet`` (both folds), ``items.parquet`` and
``users.parquet``; per-modality ``features.parquet`` and the text stage's
``keywords.parquet`` when present; the encoder's saved model
(``<encoder>/model``) for the behaviour embedding, when present (without it
the column is null).  Any feature directory may be absent.

Outputs in ``--out``: ``profiles.parquet`` (one row per user of
``users.parquet``, plus any user only seen in training), ``sample.json`` (a
few profiles, embeddings shortened) and ``summary.json`` (counts).

Params (section ``build_profiles``): the keys of ``pipelines.profiles.DEFAULTS``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data import Split
from pipelines.io import atomic_path, load_params
from pipelines.profiles import DEFAULTS, MODALITIES, build_profiles, sample_rows, to_records

from ._cli import parser, run_main

log = logging.getLogger("mmrec.build_profiles")


def check_params(params: dict | None) -> dict:
    p = dict(params or {})
    unknown = sorted(set(p) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"build_profiles: unknown param(s) {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **p}


def load_behaviour(encoder_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(user_ids, user vectors without the trailing bias 1) from a saved encoder, or None."""
    if encoder_dir is None:
        return None
    model_dir = Path(encoder_dir) / "model"
    if not (model_dir / "config.json").is_file():
        model_dir = Path(encoder_dir)
        if not (model_dir / "config.json").is_file():
            log.info("no encoder model under %s: behaviour embedding left null", encoder_dir)
            return None
    from pipelines.recommenders.base import Recommender
    import pipelines.recommenders.encoder  # noqa: F401  (registers the model class)

    model = Recommender.load(model_dir)
    vecs = getattr(model, "user_vecs_", None)
    if vecs is None:
        raise ValueError(f"{model_dir}: model '{model.name}' has no user vectors")
    if hasattr(model, "behaviour_vectors"):  # the encoder: its first member (of an ensemble)
        return np.asarray(model.user_ids, dtype=object), model.behaviour_vectors()
    return np.asarray(model.user_ids, dtype=object), np.asarray(vecs[:, :-1], np.float32)


def load_keywords(text_dir: str | Path | None) -> pd.DataFrame | None:
    if text_dir is None:
        return None
    path = Path(text_dir) / "keywords.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def run(split: Split, params: dict, features: dict, keywords, behaviour) -> pa.Table:
    """Pure: the profiles table for ``split``."""
    p = check_params(params)
    return build_profiles(split.train, split.items, split.users, p, features=features,
                          keywords=keywords, behaviour=behaviour)


def main(argv=None) -> int:
    ap = parser("build_profiles", __doc__)
    ap.add_argument("--split", required=True)
    ap.add_argument("--text", default=None)
    ap.add_argument("--image", default=None)
    ap.add_argument("--video", default=None)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body():
        from pipelines.recommenders.encoder import load_modality

        params = check_params(load_params("build_profiles", args.params))
        split = Split.load(args.split)
        item_ids = split.items["item_id"].astype(str).to_numpy(object)
        dirs = {"text": args.text, "image": args.image, "video": args.video}
        features = {m: got for m in MODALITIES
                    if (got := load_modality(dirs[m], item_ids)) is not None}
        table = run(split, params, features, load_keywords(args.text), load_behaviour(args.encoder))
        cold = np.asarray(table.column("cold_start").to_pylist(), bool)
        summary = {"n_users": table.num_rows, "n_cold_start": int(cold.sum()),
                   "modalities": sorted(features), "behaviour": args.encoder is not None and
                   table.column("behaviour_embedding").null_count < table.num_rows}
        with atomic_path(args.out, is_dir=True) as tmp:
            pq.write_table(table, tmp / "profiles.parquet")
            sample = to_records(table, sample_rows(table, int(params["n_sample"])))
            (tmp / "sample.json").write_text(json.dumps(sample, indent=2, default=str) + "\n",
                                             encoding="utf-8")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"build_profiles: {json.dumps(summary)}")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
