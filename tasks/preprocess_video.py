"""preprocess_video stage: one clip embedding per item (e.g. a trailer).

Each item's ``video`` cell is a path relative to the dataset directory
(``--media-root``), checked like images (inside the root, regular, non-empty,
under ``max_file_mb``).  PyAV decodes ``n_frames`` frames (``sampling:
uniform``: nearest to the centres of equal time slots; ``scene``: first frame
plus the largest colour-histogram changes), each resized + centre-cropped to
``image_size`` and embedded by the SAME image backbone as preprocess_image;
the per-frame features are pooled over time as [mean ; max] (each half
L2-normalised, the whole unit length: 2 x 1280 dims for EfficientNet-Lite0).

Limits -> missing with reason: ``max_duration_s`` (``too-long``),
``max_pixels`` per frame (``too-many-pixels``), ``max_file_mb``
(``file-too-large``); corrupt / truncated / missing files likewise.  Items
with an empty cell are ``no-video``; a table without the column gives every
item ``no-video-column`` and the stage still succeeds.

Outputs (``--out``, atomic): ``features.parquet`` (+ duration_s, fps, width,
height, n_frames_sampled) and ``meta.json``; cached by file hash + params.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.features import (
    FeatureCache,
    build_table,
    cell_float,
    file_hash,
    l2_normalise,
    media_cells,
    nullable_ints,
    set_threads,
    stack_vectors,
    summarise,
)
from pipelines.media import MediaError, resolve_media_path, sample_video
from pipelines.schema import ITEM

from ._feature_stage import feature_stage_main

log = logging.getLogger("mmrec.preprocess_video")

#: bump when the preprocessing code changes its output: invalidates cached rows
PREPROCESS_VERSION = 1
STAGE = "preprocess_video"
DEFAULTS: dict[str, Any] = {
    "column": "video",
    "backbone": "efficientnet-lite0",
    "image_size": 224,
    "n_frames": 8,
    "sampling": "uniform",  # or "scene"
    "max_duration_s": 600,
    "max_pixels": 4096 * 2160,
    "max_file_mb": 2048,
    "device": "auto",
    "precision": "auto",
    "num_threads": None,
    "progress": True,
    "cache": True,
}
META_COLUMNS = ("duration_s", "fps", "width", "height", "n_frames_sampled")


def pool_frames(frame_feats: np.ndarray) -> np.ndarray:
    """[T, d] per-frame features -> [2d]: L2(mean) ; L2(max), scaled to unit length."""
    f = np.asarray(frame_feats, dtype=np.float32)
    if f.ndim != 2 or len(f) == 0:
        raise ValueError(f"expected [T, d] frame features, got {f.shape}")
    mean = l2_normalise(f.mean(axis=0))
    mx = l2_normalise(f.max(axis=0))
    return (np.concatenate([mean, mx]) / np.sqrt(2.0)).astype(np.float32)


def _hash_params(p: dict[str, Any]) -> dict[str, Any]:
    return {"version": PREPROCESS_VERSION, "image_size": int(p["image_size"]),
            "n_frames": int(p["n_frames"]),
            "sampling": str(p["sampling"]), "pooling": "mean+max", "resample": "bicubic",
            "crop": "center"}


def preprocess_video(items: pd.DataFrame, media_root: str | Path, params: dict[str, Any], *,
                     encoder=None, cache: FeatureCache | None = None) -> dict[str, Any]:
    """Pure stage logic. Returns {'features': DataFrame, 'meta': dict}."""
    from pipelines.encoders import backbone_dim, backbone_model_id, load_image_encoder

    t0 = time.perf_counter()
    p = {**DEFAULTS, **(params or {})}
    if p["sampling"] not in ("uniform", "scene"):
        raise ValueError(f"{STAGE}: unknown sampling '{p['sampling']}' (uniform or scene)")
    if int(p["n_frames"]) < 1:
        raise ValueError(f"{STAGE}: n_frames must be >= 1")
    cache = cache or FeatureCache()
    root = Path(media_root)
    if not root.is_dir():
        raise FileNotFoundError(f"media root {root} is not a directory")
    col = p["column"]
    max_bytes = int(float(p["max_file_mb"]) * 1024 * 1024) if p["max_file_mb"] else None
    hparams = _hash_params(p)
    model_id = encoder.model_id if encoder is not None else backbone_model_id(p["backbone"])

    item_ids = items[ITEM].astype(str).tolist()
    n = len(item_ids)
    present = np.zeros(n, bool)
    reasons: list[str | None] = [None] * n
    hashes = [""] * n
    metas = {c: np.full(n, np.nan) for c in META_COLUMNS}
    vectors: dict[int, np.ndarray] = {}
    n_reused = n_encoded = 0

    def record_info(i: int, info: dict[str, Any]) -> None:
        for c in ("duration_s", "fps", "width", "height"):
            v = info.get(c)
            if v is not None:
                metas[c][i] = float(v)

    for i, rel in media_cells(items, col, reasons, desc="videos",
                              show_progress=bool(p["progress"])):
        try:
            path = resolve_media_path(root, rel, max_bytes=max_bytes)
            hashes[i] = file_hash(path, hparams)
            rec = cache.get(hashes[i], model_id)
            if rec is not None:
                vectors[i] = rec["embedding"]
                present[i] = True
                for c in META_COLUMNS:
                    metas[c][i] = cell_float(rec.get(c))
                n_reused += 1
                continue
            sample = sample_video(path, n_frames=int(p["n_frames"]), sampling=p["sampling"],
                                  image_size=int(p["image_size"]),
                                  max_duration_s=float(p["max_duration_s"]),
                                  max_pixels=int(float(p["max_pixels"])))
        except MediaError as exc:
            reasons[i] = exc.reason
            record_info(i, exc.info)
            log.debug("item %s: %s", item_ids[i], exc)
            continue
        except OSError as exc:  # unreadable while hashing
            reasons[i] = "missing-file"
            log.debug("item %s: %s", item_ids[i], exc)
            continue
        record_info(i, sample.info)
        metas["n_frames_sampled"][i] = len(sample.frames)
        if encoder is None:
            set_threads(p["num_threads"])
            encoder = load_image_encoder(p["backbone"], device=p["device"],
                                         precision=p["precision"])
        vectors[i] = pool_frames(encoder.encode(sample.frames))
        present[i] = True
        n_encoded += 1

    dim = 2 * (encoder.dim if encoder is not None else backbone_dim(p["backbone"]))
    emb = stack_vectors(n, dim, vectors)
    extra = {"duration_s": metas["duration_s"].astype(np.float64),
             "fps": metas["fps"].astype(np.float64),
             "width": nullable_ints(metas["width"]), "height": nullable_ints(metas["height"]),
             "n_frames_sampled": nullable_ints(metas["n_frames_sampled"])}
    table = build_table(item_ids, emb, present, reasons, hashes, model_id, extra=extra)
    meta = summarise(table, dim=dim, model_id=model_id, n_encoded=n_encoded, n_reused=n_reused,
                     seconds=time.perf_counter() - t0, modality="video", backbone=p["backbone"],
                     n_frames=int(p["n_frames"]), sampling=p["sampling"], pooling="mean+max")
    return {"features": table, "meta": meta}


def main(argv=None) -> int:
    return feature_stage_main(argv, stage=STAGE, doc=__doc__, defaults=DEFAULTS, noun="a video",
                              compute=preprocess_video, media_root=True)


if __name__ == "__main__":
    raise SystemExit(main())
