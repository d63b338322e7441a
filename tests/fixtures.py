"""Tiny generated datasets in the data contract (no external files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def ml100k_path() -> Path:
    import os

    return (ROOT / os.environ.get("MMREC_ML100K", "../shared/datasets/ml100k-mm")).resolve()


def write_blocks_dataset(path: Path, n_users: int = 40, n_items: int = 30, per_user: int = 10,
                         seed: int = 0, users: bool = True) -> Path:
    """Two taste groups: even users like items [0, n/2), odd users the rest."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    half = n_items // 2
    rows = []
    for u in range(n_users):
        block = np.arange(half) if u % 2 == 0 else np.arange(half, n_items)
        chosen = rng.choice(block, size=min(per_user, len(block)), replace=False)
        for j, i in enumerate(chosen):
            rows.append((f"u{u}", f"i{i}", 1_600_000_000 + u * 1000 + j * 60, int(rng.integers(3, 6))))
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"]).to_csv(
        path / "ratings.csv", index=False)
    genres = ["Sci-Fi|Action" if i < half else "Romance|Drama" for i in range(n_items)]
    pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                  "title": [f"Item {i}" for i in range(n_items)],
                  "genres": genres,
                  "description": [("space ship adventure" if i < half else "love story") + f" {i}"
                                  for i in range(n_items)]}).to_csv(path / "items.csv", index=False)
    if users:
        pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)],
                      "age": [20 + u % 40 for u in range(n_users)],
                      "gender": ["M" if u % 2 else "F" for u in range(n_users)]}).to_csv(
            path / "users.csv", index=False)
    return path


def split_frames(rows, n_train: int, n_fit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) from (user, item, timestamp, rating) rows in each user's order: the first
    ``n_fit`` rows of a user are the ``fit`` fold, the next up to ``n_train`` the ``val`` fold,
    the rest test."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    df["timestamp"] = df["timestamp"].astype(np.int64)
    df["rating"] = df["rating"].astype(np.float32)
    pos = df.groupby("user_id").cumcount().to_numpy()
    train = df[pos < n_train].copy()
    train["fold"] = np.where(pos[pos < n_train] >= n_fit, "val", "fit")
    return train, df[pos >= n_train].copy()


def write_mp4(path, n: int = 60, fps: int = 24, w: int = 64, h: int = 48, faststart: bool = False,
              codec: str = "mpeg4", seed: int | None = None) -> None:
    """A clip in three coloured thirds with a moving white bar: red, green, blue, or random
    colours drawn with ``seed`` (distinct clips for distinct seeds)."""
    import av

    cols = [(220, 30, 30), (30, 220, 30), (30, 30, 220)] if seed is None else \
        np.random.default_rng(seed).integers(0, 255, (3, 3))
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=opts) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[:] = cols[min(2, i * 3 // n)]
            x = (i * w) // n
            a[:, x:x + 4] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
