"""preprocess_image stage: one image embedding per item (e.g. a movie poster).

Each item's ``image`` cell is a path relative to the dataset directory
(``--media-root``).  The file is checked and read safely
(:mod:`pipelines.media`: inside the root, a regular non-empty file under
``max_file_mb``, a real image of an allowed format whatever its extension,
at most ``max_pixels`` pixels), EXIF-rotated, converted to RGB, resized
(shorter side) and centre-cropped to ``image_size``, normalised with the
backbone's mean/std and encoded in batches by the image backbone
(``backbone``, default EfficientNet-Lite0: 1280-d pooled pre-classifier
features), L2-normalised.  Any media problem gives a missing row with its
reason; the stage itself fails only on configuration errors.

Outputs (``--out``, atomic): ``features.parquet`` (+ width, height, format)
and ``meta.json``.  Embeddings from the previous run are reused when the
file bytes + preprocessing params (content hash) and the model are unchanged.
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
    cell_str,
    content_hash,
    l2_normalise,
    media_cells,
    nullable_ints,
    set_threads,
    stack_vectors,
    summarise,
)
from pipelines.media import (
    DEFAULT_IMAGE_FORMATS,
    MediaError,
    decode_image,
    read_media_bytes,
    resize_center_crop,
)
from pipelines.schema import ITEM

from ._feature_stage import feature_stage_main

log = logging.getLogger("mmrec.preprocess_image")

#: bump when the preprocessing code changes its output: invalidates cached rows
PREPROCESS_VERSION = 1
STAGE = "preprocess_image"
DEFAULTS: dict[str, Any] = {
    "column": "image",
    "backbone": "efficientnet-lite0",
    "image_size": 224,
    "resize_size": None,  # shorter side before the centre crop (None = image_size)
    "max_pixels": 40_000_000,
    "max_file_mb": 50,
    "formats": list(DEFAULT_IMAGE_FORMATS),
    "batch_size": 8,  # CPU: small batches keep activations in cache
    "device": "auto",
    "precision": "auto",
    "num_threads": None,
    "progress": True,
    "cache": True,
}


def _hash_params(p: dict[str, Any]) -> dict[str, Any]:
    return {"version": PREPROCESS_VERSION, "image_size": int(p["image_size"]),
            "resize_size": int(p["resize_size"] or p["image_size"]),
            "resample": "bicubic", "crop": "center", "exif_transpose": True,
            "normalise": "l2"}


def preprocess_image(items: pd.DataFrame, media_root: str | Path, params: dict[str, Any], *,
                     encoder=None, cache: FeatureCache | None = None) -> dict[str, Any]:
    """Pure stage logic. Returns {'features': DataFrame, 'meta': dict}."""
    from pipelines.encoders import backbone_dim, backbone_model_id, load_image_encoder

    t0 = time.perf_counter()
    p = {**DEFAULTS, **(params or {})}
    cache = cache or FeatureCache()
    root = Path(media_root)
    if not root.is_dir():
        raise FileNotFoundError(f"media root {root} is not a directory")
    col = p["column"]
    size = int(p["image_size"])
    max_pixels = int(float(p["max_pixels"]))
    max_bytes = int(float(p["max_file_mb"]) * 1024 * 1024) if p["max_file_mb"] else None
    formats = tuple(p["formats"]) if p["formats"] else None
    hparams = _hash_params(p)
    model_id = encoder.model_id if encoder is not None else backbone_model_id(p["backbone"])

    item_ids = items[ITEM].astype(str).tolist()
    n = len(item_ids)
    present = np.zeros(n, bool)
    reasons: list[str | None] = [None] * n
    hashes = [""] * n
    width = np.full(n, np.nan)
    height = np.full(n, np.nan)
    fmt: list[str | None] = [None] * n
    vectors: dict[int, np.ndarray] = {}
    n_reused = 0
    n_encoded = 0
    pending_idx: list[int] = []
    pending_arr: list[np.ndarray] = []
    batch_size = max(1, int(p["batch_size"]))

    def flush():
        nonlocal encoder, n_encoded
        if not pending_idx:
            return
        if encoder is None:
            set_threads(p["num_threads"])
            encoder = load_image_encoder(p["backbone"], device=p["device"],
                                         precision=p["precision"])
        feats = l2_normalise(encoder.encode(np.stack(pending_arr)))
        for i, v in zip(pending_idx, feats):
            vectors[i] = v
            present[i] = True
        n_encoded += len(pending_idx)
        pending_idx.clear()
        pending_arr.clear()

    for i, rel in media_cells(items, col, reasons, desc="images",
                              show_progress=bool(p["progress"])):
        try:
            data = read_media_bytes(root, rel, max_bytes=max_bytes)
            hashes[i] = content_hash(data, hparams)
            rec = cache.get(hashes[i], model_id)
            if rec is not None:
                vectors[i] = rec["embedding"]
                present[i] = True
                width[i], height[i] = cell_float(rec.get("width")), cell_float(rec.get("height"))
                fmt[i] = cell_str(rec.get("format")) or None
                n_reused += 1
                continue
            img = decode_image(data, max_pixels=max_pixels, formats=formats,
                               draft_size=int(p["resize_size"] or size))
            width[i], height[i], fmt[i] = img.width, img.height, img.format
            arr = resize_center_crop(img.image, size, p["resize_size"])
        except MediaError as exc:
            reasons[i] = exc.reason
            width[i] = exc.info.get("width", width[i])
            height[i] = exc.info.get("height", height[i])
            fmt[i] = exc.info.get("format", fmt[i]) or None
            log.debug("item %s: %s", item_ids[i], exc)
            continue
        pending_idx.append(i)
        pending_arr.append(arr)
        if len(pending_idx) >= batch_size:
            flush()
    flush()

    dim = encoder.dim if encoder is not None else backbone_dim(p["backbone"])
    emb = stack_vectors(n, dim, vectors)
    extra = {"width": nullable_ints(width), "height": nullable_ints(height),
             "format": pd.array(fmt, dtype="string")}
    table = build_table(item_ids, emb, present, reasons, hashes, model_id, extra=extra)
    meta = summarise(table, dim=dim, model_id=model_id, n_encoded=n_encoded, n_reused=n_reused,
                     seconds=time.perf_counter() - t0, modality="image",
                     backbone=p["backbone"], image_size=size)
    return {"features": table, "meta": meta}


def main(argv=None) -> int:
    return feature_stage_main(argv, stage=STAGE, doc=__doc__, defaults=DEFAULTS, noun="an image",
                              compute=preprocess_image, media_root=True)


if __name__ == "__main__":
    raise SystemExit(main())
