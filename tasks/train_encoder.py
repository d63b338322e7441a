"""train_encoder stage: the transformer user encoder (``pipelines.recommenders.encoder``).

    python -m tasks.train_encoder --split artifacts/split --text artifacts/preprocess_text \\
        --image artifacts/preprocess_image --video artifacts/preprocess_video \\
        --out artifacts/train_encoder --params params.yaml

Trains on the split's ``fit`` fold, early-stops on Recall@K over the ``val``
fold, then encodes every user of the catalogue from their whole training
history (users without one from their attributes alone).  Any feature
directory may be absent or hold no present item: that modality is skipped.

Outputs in ``--out``:

* ``model/``: the saved :class:`EncoderRecommender` (config.json +
  arrays.safetensors + seen.npz): torch weights as numpy, item vectors, user
  vectors and the unknown-user prior, so evaluation needs neither torch nor
  features;
* ``model_fit/``: the same kind of model as it stood on the ``fit`` rows alone
  (phase-1 weights, user vectors from each user's fit rows, seen items = fit
  rows): the fuse stage trains its ranker on this variant's scores over the
  ``val`` fold and applies it with ``model/``, as with the CF ``fit`` / ``full``
  pairs.  Absent when the split has no ``val`` fold;
* ``metrics.json``: best val recall, epochs, timings, device, resume info;
* ``dvclive/``: training curves (train/loss, val/recall@K, val/ndcg@K per epoch),
  written once training ends, from the run's complete per-epoch history (the
  checkpoint carries it across a kill), into a temp dir renamed into place: a
  killed run never leaves half-written or duplicated curve rows behind;
* warm start (``warm_start: true``): when ``--out`` already holds a model (the
  output is ``persist`` under DVC) of the same architecture, training starts
  from its weights (items aligned by id) and runs ``warm_epochs`` epochs;
  ``metrics.json`` records ``warm_start`` (used or why not);
* ``checkpoints/last/``: the per-epoch checkpoint.  Rerunning with the same
  params and data resumes from it (after a kill) or, once training finished,
  only re-exports.  Under ``dvc repro`` the output directory is removed before
  the stage runs unless it is marked ``persist``, so resuming applies to
  direct reruns.

Device: CUDA when available (bf16 autocast; ``compile: true`` for
``torch.compile``), else CPU with deterministic algorithms.  Multi-GPU::

    torchrun --standalone --nproc_per_node 4 -m tasks.train_encoder --split ... --out ...

(``WORLD_SIZE > 1`` -> DistributedDataParallel + DistributedSampler; rank 0
evaluates, checkpoints and writes outputs, the other ranks write nothing.)

Params (section ``train_encoder``): every key of
``pipelines.recommenders.encoder.DEFAULTS`` (architecture, objective,
optimisation, device); unknown keys are an error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from pipelines.data import Split
from pipelines.io import atomic_path, load_params, write_json
from pipelines.recommenders.encoder import DEFAULTS, MODALITIES, EncoderRecommender, load_modality

from ._cli import parser, run_main

log = logging.getLogger("mmrec.train_encoder")


def check_params(params: dict | None) -> dict:
    p = dict(params or {})
    unknown = sorted(set(p) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"train_encoder: unknown param(s) {unknown}; known: {sorted(DEFAULTS)}")
    if p.get("objective", DEFAULTS["objective"]) not in ("holdout", "next"):
        raise ValueError(f"train_encoder.objective: '{p['objective']}' is not holdout|next")
    return {**DEFAULTS, **p}


def load_features(dirs: dict[str, str | os.PathLike | None], item_ids) -> dict:
    """{modality: (emb, present)} for the modalities whose directory has present items."""
    out = {}
    for m in MODALITIES:
        got = load_modality(dirs.get(m), item_ids)
        if got is None:
            log.info("modality %s: absent or empty, skipped", m)
        else:
            out[m] = got
            log.info("modality %s: %d/%d items present, dim %d", m, int(got[1].sum()), len(got[1]),
                     got[0].shape[1])
    return out


def previous_model(path: str | os.PathLike, params: dict | None) -> EncoderRecommender | None:
    """The earlier run's saved model at ``path`` when ``warm_start`` is on and it loads."""
    if not check_params(params)["warm_start"] or not (Path(path) / "config.json").is_file():
        return None
    try:
        prev = EncoderRecommender.load(path)
    except ValueError as exc:
        log.warning("warm start: ignoring the previous model: %s", exc)
        return None
    return prev if isinstance(prev, EncoderRecommender) else None


def train(split: Split, features: dict, params: dict, workdir: str | os.PathLike | None = None,
          live=None, previous: EncoderRecommender | None = None,
          previous_fit: EncoderRecommender | None | str = "same") -> tuple[EncoderRecommender, dict]:
    """Fit the encoder on ``split`` (train rows with their fold). Returns (model, metrics).

    ``previous``: an earlier fitted encoder to warm-start from (used when compatible);
    ``previous_fit``: its ``fit`` variant, which the first phase starts from (see
    :meth:`EncoderRecommender.set_warm_start`).
    """
    p = check_params(params)
    data = split.interactions(None)
    model = EncoderRecommender(**p).set_side_info(features, split.users).set_run(workdir, live)
    model.set_warm_start(previous, previous_fit)
    model.fit(data)
    info = dict(model.train_info_)
    metrics = {k: v for k, v in info.items() if k != "history"}
    metrics.update(n_users=int(data.n_users), n_items=int(data.n_items),
                   n_train=int(len(data.df)), modalities=sorted(features),
                   n_cold_users_encoded_from_attributes=int(
                       (np.diff(data.matrix().indptr) == 0).sum()))
    return model, metrics


def write_curves(history: list[dict], path: str | os.PathLike) -> None:
    """dvclive curves of the whole run, from its per-epoch history, written atomically.

    Logging live during training would write dvclive's files in place (a kill could
    leave an empty ``metrics.json`` or rows of epochs the checkpoint does not hold,
    which a resumed run would then log again); the history restored from the
    checkpoint is the single source of truth.
    """
    from dvclive import Live

    with atomic_path(path, is_dir=True) as tmp:
        live = Live(str(tmp), save_dvc_exp=False, dvcyaml=None)
        for rec in history:
            live.log_metric("train/loss", rec["loss"])
            for k, v in rec.items():
                if "@" in k:
                    live.log_metric(f"val/{k}", v)
            live.next_step()
        live.end()


def main(argv=None) -> int:
    ap = parser("train_encoder", __doc__)
    ap.add_argument("--split", required=True)
    ap.add_argument("--text", default=None)
    ap.add_argument("--image", default=None)
    ap.add_argument("--video", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body():
        params = load_params("train_encoder", args.params)
        split = Split.load(args.split)
        features = load_features({"text": args.text, "image": args.image, "video": args.video},
                                 split.item_ids)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        main_rank = int(os.environ.get("RANK", "0")) == 0
        previous = previous_model(out / "model", params)  # persist: the last run's output
        # the first phase (the fuse's fit variant) only from the last fit variant: the full
        # model learned from the val rows too
        previous_fit = previous_model(out / "model_fit", params) if previous is not None else None
        model, metrics = train(split, features, params, workdir=out, previous=previous,
                               previous_fit=previous_fit)
        if not main_rank:
            return 0
        model.save(out / "model")
        # the fit-rows-only variant next to it: the fuse stage's honest training-time source
        if model.fit_model_ is not None:
            model.fit_model_.save(out / "model_fit")
        elif (out / "model_fit").exists():  # no val fold this time: no stale pair left behind
            shutil.rmtree(out / "model_fit")
        write_curves(model.train_info_.get("history", []), out / "dvclive")
        write_json(out / "metrics.json", metrics)
        print("train_encoder: " + json.dumps({k: v for k, v in metrics.items()
                                                if not isinstance(v, (list, dict))}))

    return run_main(body)


__all__ = ["train", "previous_model", "check_params", "load_features", "write_curves", "main", "atomic_path"]

if __name__ == "__main__":
    raise SystemExit(main())
