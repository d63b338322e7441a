"""preprocess_video: frame sampling, temporal pooling, media guards, cache, CLI."""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.encoders import BackboneSpec, register_backbone
from pipelines.features import FeatureCache, l2_normalise, read_features, read_meta, write_features
from tasks.preprocess_video import main, pool_frames, preprocess_video
from tests.fixtures import write_mp4

TINY = "tiny-test-video"


def _tiny_factory():
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return BackboneSpec(net, dim=8, model_id="tiny-test-video:v1", image_size=32)


register_backbone(TINY, _tiny_factory, "tiny-test-video:v1", 8, replace=True)


EXPECTED = {  # item_id -> (video cell, reason or None)
    "good": ("videos/good.mp4", None),
    "good-faststart": ("videos/fast.mp4", None),
    "too-long": ("videos/long.mp4", "too-long"),
    "too-big": ("videos/big.mp4", "too-many-pixels"),
    "truncated": ("videos/trunc.mp4", "corrupt"),  # moov atom lost
    "truncated-faststart": ("videos/trunc_fast.mp4", "truncated"),
    "text": ("videos/notes.mp4", "corrupt"),
    "zero-byte": ("videos/empty.mp4", "empty-file"),
    "missing": ("videos/nope.mp4", "missing-file"),
    "directory": ("videos/dir.mp4", "not-a-file"),
    "symlink-out": ("videos/link.mp4", "outside-root"),
    "dotdot": ("../outside.mp4", "outside-root"),
    "empty-cell": ("", "no-video"),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    write_mp4(d / "good.mp4", seed=1)
    write_mp4(d / "fast.mp4", faststart=True, seed=2)
    write_mp4(d / "long.mp4", n=150, seed=3)  # 6.25 s
    write_mp4(d / "big.mp4", w=320, h=240, n=12, seed=4)
    write_mp4(d / "fast_src.mp4", faststart=True, seed=5)
    return d


@pytest.fixture()
def dataset(tmp_path, clips):
    root = tmp_path / "ds"
    v = root / "videos"
    v.mkdir(parents=True)
    for name in ("good.mp4", "fast.mp4", "long.mp4", "big.mp4"):
        (v / name).write_bytes((clips / name).read_bytes())
    good = (clips / "good.mp4").read_bytes()
    (v / "trunc.mp4").write_bytes(good[: len(good) * 7 // 10])
    fast = (clips / "fast_src.mp4").read_bytes()
    (v / "trunc_fast.mp4").write_bytes(fast[: len(fast) * 6 // 10])
    (v / "notes.mp4").write_text("not a video\n" * 10)
    (v / "empty.mp4").write_bytes(b"")
    (v / "dir.mp4").mkdir()
    (tmp_path / "outside.mp4").write_bytes(good)
    os.symlink(tmp_path / "outside.mp4", v / "link.mp4")
    items = pd.DataFrame({"item_id": list(EXPECTED), "video": [c for c, _ in EXPECTED.values()]})
    return root, items


def params(**kw):
    return {"backbone": TINY, "device": "cpu", "progress": False, "image_size": 32,
            "n_frames": 4, "max_duration_s": 4, "max_pixels": 200 * 200, **kw}


def test_pool_frames_mean_and_max_halves():
    f = np.array([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]], np.float32)
    v = pool_frames(f)
    assert v.shape == (6,) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v), 1, atol=1e-6)
    np.testing.assert_allclose(v[:3] * np.sqrt(2), l2_normalise(f.mean(0)), atol=1e-6)
    np.testing.assert_allclose(v[3:] * np.sqrt(2), l2_normalise(f.max(0)), atol=1e-6)


def test_every_video_problem_is_a_missing_row_with_its_reason(dataset):
    root, items = dataset
    t0 = time.perf_counter()
    res = preprocess_video(items, root, params())
    assert time.perf_counter() - t0 < 60
    t = res["features"].set_index("item_id")
    assert list(t.index) == list(EXPECTED)
    for item_id, (_cell, reason) in EXPECTED.items():
        if reason is None:
            assert t.loc[item_id, "present"], item_id
        else:
            assert not t.loc[item_id, "present"], item_id
            assert t.loc[item_id, "reason"] == reason, item_id
    emb = np.stack(t["embedding"].to_numpy())
    pres = t["present"].to_numpy()
    assert emb.shape == (len(EXPECTED), 16)  # mean ; max of 8-d frame features
    np.testing.assert_allclose(np.linalg.norm(emb[pres], axis=1), 1, atol=1e-5)
    assert (emb[~pres] == 0).all()
    good = t.loc["good"]
    assert good["n_frames_sampled"] == 4
    assert (good["width"], good["height"]) == (64, 48)
    assert good["fps"] == pytest.approx(24) and good["duration_s"] == pytest.approx(2.5, abs=0.1)
    # limits: the probed facts are kept for the rejected rows
    assert t.loc["too-long", "duration_s"] == pytest.approx(6.25, abs=0.1)
    assert t.loc["too-big", "width"] == 320
    assert res["meta"]["n_present"] == 2 and res["meta"]["dim"] == 16


def test_requested_number_of_frames_is_sampled(dataset):
    root, items = dataset
    for n in (1, 3, 8):
        res = preprocess_video(items.head(1), root, params(n_frames=n))
        assert res["features"]["n_frames_sampled"].iloc[0] == n
    res = preprocess_video(items.head(1), root, params(sampling="scene", n_frames=3))
    assert res["features"]["present"].iloc[0]
    with pytest.raises(ValueError):
        preprocess_video(items.head(1), root, params(sampling="random"))


def test_no_video_column_every_item_missing_and_stage_succeeds(dataset, tmp_path):
    root, items = dataset
    res = preprocess_video(items[["item_id"]], root, params())
    assert set(res["features"]["reason"]) == {"no-video-column"}
    assert res["meta"]["dim"] == 16 and res["meta"]["n_present"] == 0
    data = tmp_path / "validate"
    data.mkdir()
    items[["item_id"]].assign(title="x").to_parquet(data / "items.parquet", index=False)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump({"preprocess_video": params()}))
    out = tmp_path / "out"
    assert main(["--data", str(data), "--media-root", str(root), "--out", str(out),
                 "--params", str(pfile)]) == 0
    ids, emb, present, _ = read_features(out)
    assert len(ids) == len(EXPECTED) and not present.any() and emb.shape[1] == 16
    assert read_meta(out)["missing_reasons"] == {"no-video-column": len(EXPECTED)}


def test_cache_encodes_only_new_videos_and_equals_scratch(dataset, tmp_path):
    root, items = dataset
    first = preprocess_video(items.head(1), root, params())
    write_features(tmp_path / "prev", first["features"], first["meta"])
    inc = preprocess_video(items.head(2), root, params(),
                           cache=FeatureCache.load(tmp_path / "prev"))
    assert (inc["meta"]["n_reused_from_cache"], inc["meta"]["n_encoded_this_run"]) == (1, 1)
    scratch = preprocess_video(items.head(2), root, params())
    np.testing.assert_allclose(np.stack(inc["features"]["embedding"].to_numpy()),
                               np.stack(scratch["features"]["embedding"].to_numpy()), atol=1e-5)
    assert inc["features"]["n_frames_sampled"].tolist() == [4, 4]
    other = preprocess_video(items.head(2), root, params(n_frames=5),
                             cache=FeatureCache.load(tmp_path / "prev"))
    assert other["meta"]["n_reused_from_cache"] == 0


@pytest.mark.slow
def test_real_backbone_video_embedding(dataset):
    from pipelines.encoders import load_image_encoder

    root, items = dataset
    enc = load_image_encoder("efficientnet-lite0", device="cpu")
    p = {"device": "cpu", "progress": False, "n_frames": 8}
    a = preprocess_video(items.head(2), root, p, encoder=enc)
    b = preprocess_video(items.head(2), root, p, encoder=enc)
    ea, eb = (np.stack(r["features"]["embedding"].to_numpy()) for r in (a, b))
    assert ea.shape == (2, 2560)
    np.testing.assert_allclose(ea, eb, atol=1e-6)
    assert a["features"]["n_frames_sampled"].tolist() == [8, 8]
