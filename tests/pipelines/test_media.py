"""Safe media decoding: every hostile or broken file becomes a MediaError with a reason."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.media import (
    MediaError,
    decode_image,
    read_media_bytes,
    resize_center_crop,
    resolve_media_path,
    sample_video,
    video_file_info,
)
from tests.fixtures import write_mp4

# --------------------------------------------------------------------------- fixtures

def jpeg_bytes(w=64, h=48, seed=0, quality=90, exif=None) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    kw = {"exif": exif} if exif is not None else {}
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(w=32, h=24, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), (10, 200, 30, 128)[: len(mode)] if mode != "L" else 90).save(buf, "PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR is rewritten to claim width x height (CRC fixed)."""
    data = bytearray(png_bytes(4, 4))
    ihdr_start = 8 + 8  # signature, then length + 'IHDR'
    data[ihdr_start:ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr_start + 13])) & 0xFFFFFFFF
    data[ihdr_start + 13:ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "media"
    r.mkdir()
    return r


# --------------------------------------------------------------------------- paths

def test_resolve_accepts_a_regular_file_and_returns_resolved_path(root):
    (root / "images").mkdir()
    (root / "images" / "a.jpg").write_bytes(b"x")
    p = resolve_media_path(root, "images/a.jpg")
    assert p == (root / "images" / "a.jpg").resolve()
    # a symlink that stays inside the root is fine
    os.symlink(root / "images" / "a.jpg", root / "alias.jpg")
    assert resolve_media_path(root, "alias.jpg") == p


@pytest.mark.parametrize("case, reason", [
    ("dotdot", "outside-root"),
    ("absolute", "outside-root"),
    ("symlink-out", "outside-root"),
    ("symlink-dir-out", "outside-root"),
    ("missing", "missing-file"),
    ("dangling", "missing-file"),
    ("directory", "not-a-file"),
    ("fifo", "not-a-file"),
    ("empty", "empty-file"),
    ("too-large", "file-too-large"),
    ("nul", "invalid-path"),
])
def test_resolve_rejects_with_reason(root, tmp_path, case, reason):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes())
    rel = {"dotdot": "../secret.jpg", "absolute": str(secret), "symlink-out": "link.jpg",
           "symlink-dir-out": "outdir/secret.jpg", "missing": "nope.jpg",
           "dangling": "dangling.jpg", "directory": "sub", "fifo": "pipe.jpg",
           "empty": "empty.jpg", "too-large": "big.jpg", "nul": "a\x00.jpg"}[case]
    if case == "symlink-out":
        os.symlink(secret, root / "link.jpg")
    elif case == "symlink-dir-out":
        os.symlink(tmp_path, root / "outdir")
    elif case == "dangling":
        os.symlink(root / "gone.jpg", root / "dangling.jpg")
    elif case == "directory":
        (root / "sub").mkdir()
    elif case == "fifo":
        os.mkfifo(root / "pipe.jpg")
    elif case == "empty":
        (root / "empty.jpg").write_bytes(b"")
    elif case == "too-large":
        (root / "big.jpg").write_bytes(b"\xff" * 2000)
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as ei:
        read_media_bytes(root, rel, max_bytes=1000)
    assert ei.value.reason == reason
    assert time.perf_counter() - t0 < 5  # a FIFO must not block


# --------------------------------------------------------------------------- images

def test_decode_jpeg_records_format_and_size():
    img = decode_image(jpeg_bytes(64, 48))
    assert (img.format, img.width, img.height) == ("JPEG", 64, 48)
    assert img.image.mode == "RGB" and img.image.size == (64, 48)


def test_lying_extension_is_decoded_by_content():
    # the path says .jpg, the bytes are PNG: decoded fine, real format recorded
    img = decode_image(png_bytes(), formats=None)
    assert img.format == "PNG"


def test_alpha_and_grey_become_rgb():
    assert decode_image(png_bytes(mode="RGBA")).image.mode == "RGB"
    assert decode_image(png_bytes(mode="L")).image.mode == "RGB"


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img = decode_image(jpeg_bytes(40, 20, exif=exif))
    assert img.image.size == (20, 40)
    assert (img.width, img.height) == (40, 20)  # header size recorded as stored


@pytest.mark.parametrize("case, reason", [
    ("bomb-header", "decompression-bomb"),
    ("bomb-low-limit", "decompression-bomb"),
    ("truncated-jpeg", "truncated"),
    ("text-as-jpg", "unsupported-format"),
    ("format-not-allowed", "unsupported-format"),
    ("garbage-after-magic", "corrupt"),
])
def test_decode_rejects_with_reason(case, reason):
    max_pixels = 40_000_000
    if case == "bomb-header":
        data = png_claiming_size(100_000, 100_000)
    elif case == "bomb-low-limit":
        data, max_pixels = jpeg_bytes(64, 64), 1000
    elif case == "truncated-jpeg":
        full = jpeg_bytes(256, 256, quality=95)
        data = full[: len(full) * 2 // 3]
    elif case == "text-as-jpg":
        data = b"this is not an image, just text in a file named poster.jpg\n" * 3
    elif case == "format-not-allowed":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PPM")
        data = buf.getvalue()
    else:
        data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as ei:
        decode_image(data, max_pixels=max_pixels)
    assert ei.value.reason == reason, ei.value
    assert time.perf_counter() - t0 < 5


def test_bomb_limit_restores_pillow_global():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(MediaError):
        decode_image(jpeg_bytes(64, 64), max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == before


def test_resize_center_crop_shapes():
    im = Image.fromarray(np.zeros((30, 90, 3), np.uint8))
    out = resize_center_crop(im, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # centre crop: a wide image keeps its middle column band
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255
    out = resize_center_crop(Image.fromarray(arr), 20)
    assert out.mean() > 250


def test_draft_decodes_large_jpeg_at_reduced_scale_but_reports_header_size():
    img = decode_image(jpeg_bytes(1024, 768), draft_size=224)
    assert (img.width, img.height) == (1024, 768)
    assert min(img.image.size) >= 224 and img.image.size[0] < 1024


# --------------------------------------------------------------------------- videos

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    write_mp4(d / "clip.mp4")
    write_mp4(d / "fast.mp4", faststart=True)
    return d


def test_uniform_sampling_returns_requested_frames_spread_over_duration(clips):
    s = sample_video(clips / "clip.mp4", n_frames=8, image_size=32)
    assert s.frames.shape == (8, 32, 32, 3) and s.frames.dtype == np.uint8
    assert s.info["width"] == 64 and s.info["height"] == 48
    assert s.info["fps"] == pytest.approx(24)
    assert s.info["duration_s"] == pytest.approx(2.5, abs=0.1)
    t = np.array(s.times)
    assert (np.diff(t) > 0).all()
    slot = 2.5 / 8
    np.testing.assert_allclose(t, (np.arange(8) + 0.5) * slot, atol=1 / 24 + 1e-6)


def test_seek_and_decode_pick_agree(clips):
    a = sample_video(clips / "clip.mp4", n_frames=5, image_size=32)
    b = sample_video(clips / "clip.mp4", n_frames=5, image_size=32, seek_min_duration_s=0)
    np.testing.assert_allclose(a.times, b.times)
    np.testing.assert_array_equal(a.frames, b.frames)


def test_scene_sampling_picks_the_cuts(clips):
    s = sample_video(clips / "clip.mp4", n_frames=3, image_size=32, sampling="scene")
    # 60 frames at 24 fps in thirds: cuts at frames 20 and 40
    np.testing.assert_allclose(s.times, [0, 20 / 24, 40 / 24], atol=1e-6)
    reds, greens, blues = (s.frames[k, 2:6, 2:6].reshape(-1, 3).mean(0) for k in range(3))
    assert reds.argmax() == 0 and greens.argmax() == 1 and blues.argmax() == 2


def test_more_frames_than_the_clip_has(clips):
    s = sample_video(clips / "clip.mp4", n_frames=100, image_size=16)
    assert len(s.frames) == 100  # nearest frames repeat for a short clip


def _truncate(src, dst, frac):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


@pytest.mark.parametrize("case, reason", [
    ("truncated-moov-at-end", "corrupt"),
    ("truncated-faststart", "truncated"),
    ("text-as-mp4", "corrupt"),
    ("too-long", "too-long"),
    ("too-many-pixels", "too-many-pixels"),
    ("audio-only", "no-video-stream"),
])
def test_video_rejects_with_reason(clips, tmp_path, case, reason):
    kw = {}
    path = clips / "clip.mp4"
    if case == "truncated-moov-at-end":
        path = _truncate(clips / "clip.mp4", tmp_path / "t.mp4", 0.7)
    elif case == "truncated-faststart":
        path = _truncate(clips / "fast.mp4", tmp_path / "t.mp4", 0.6)
    elif case == "text-as-mp4":
        path = tmp_path / "x.mp4"
        path.write_text("not a video\n" * 20)
    elif case == "too-long":
        kw["max_duration_s"] = 1.0
    elif case == "too-many-pixels":
        kw["max_pixels"] = 64 * 47
    elif case == "audio-only":
        path = tmp_path / "a.wav"
        with av.open(str(path), "w", format="wav") as c:
            s = c.add_stream("pcm_s16le", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                               layout="mono")
            frame.sample_rate = 8000
            for p in s.encode(frame):
                c.mux(p)
            for p in s.encode():
                c.mux(p)
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as ei:
        sample_video(path, n_frames=4, image_size=16, **kw)
    assert ei.value.reason == reason, ei.value
    assert time.perf_counter() - t0 < 10


def test_limit_errors_carry_probed_info(clips):
    with pytest.raises(MediaError) as ei:
        sample_video(clips / "clip.mp4", max_duration_s=1.0)
    assert ei.value.info["duration_s"] == pytest.approx(2.5, abs=0.1)
    assert video_file_info(clips / "clip.mp4")["width"] == 64


def test_bad_sampling_arguments_are_errors_not_media_reasons(clips):
    with pytest.raises(ValueError):
        sample_video(clips / "clip.mp4", sampling="random")
    with pytest.raises(ValueError):
        sample_video(clips / "clip.mp4", n_frames=0)


def test_extreme_aspect_ratio_is_cropped_without_a_huge_intermediate():
    im = Image.fromarray(np.full((2, 40_000, 3), 128, np.uint8))
    t0 = time.perf_counter()
    out = resize_center_crop(im, 224)
    assert out.shape == (224, 224, 3) and abs(int(out.mean()) - 128) <= 1
    assert time.perf_counter() - t0 < 2
