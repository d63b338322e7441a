"""Hostile media files: each is rejected with a reason, in bounded time and memory.

Complements ``test_media.py`` (one-off corrupt cases) and the stage tests
(``tests/tasks/test_preprocess_*.py``) with:

* real decompression bombs (a valid 400-megapixel PNG that compresses to
  48 KB, headers claiming 65500 x 65500 in JPEG / GIF / BMP, a PNG text chunk
  inflating to 16 MB), checked with the limits of ``params.yaml``;
* lying extensions: PNG bytes named ``.jpg`` (decoded by content, real format
  recorded), text / MP4 / EPS / SVG / HTML bytes named ``.jpg`` (rejected:
  EPS would otherwise run Ghostscript);
* videos with an extreme resolution (over ``preprocess_video.max_pixels``) or
  duration (10 hours in the header; 625 s in a raw stream without any
  duration metadata), under the limits of ``params.yaml``;
* paths: a symlink loop, a symlink to ``/dev/zero`` (would never end);
* property tests (hypothesis): valid images and videos with flipped bytes,
  cut slices, truncation or garbage appended decode or fail with a
  :class:`MediaError`, never another exception.

Memory is measured in a separate process (peak RSS) running every case.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import timedelta
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.media import MediaError, decode_image, sample_video
from tests import hostile
from tests.fixtures import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
IMG_P, VID_P = PARAMS["preprocess_image"], PARAMS["preprocess_video"]

N_IMAGE_EXAMPLES = 300  # quoted in README "Guarantees"
N_VIDEO_EXAMPLES = 200
MAX_RSS_MB = 300  # the 400-Mpx bomb alone would need >= 400 MB decoded (1.2 GB as RGB)


# --------------------------------------------------------------------------- builders

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(w: int = 20_000, h: int = 20_000) -> bytes:
    """A *valid* 1-bit PNG of w x h black pixels (streamed: never built in memory)."""
    row = b"\x00" + b"\x00" * ((w + 7) // 8)
    co = zlib.compressobj(9)
    block = row * 1000
    idat = b"".join(co.compress(block) for _ in range(h // 1000)) + co.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def png_text_bomb(mb: int = 16) -> bytes:
    """A small valid PNG with a zTXt chunk inflating to ``mb`` MB."""
    co = zlib.compressobj(9)
    z = b"".join(co.compress(b"\x00" * (1 << 20)) for _ in range(mb)) + co.flush()
    data = image_bytes("PNG")
    return data[:33] + _chunk(b"zTXt", b"Comment\x00\x00" + z) + data[33:]


def image_bytes(fmt: str, w: int = 48, h: int = 32) -> bytes:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    if fmt == "GIF":
        im = im.convert("P")
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def jpeg_claiming(w: int, h: int) -> bytes:
    data = bytearray(image_bytes("JPEG"))
    i = data.index(b"\xff\xc0")  # SOF0: FF C0, length(2), precision(1), height(2), width(2)
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def gif_claiming(w: int, h: int) -> bytes:
    data = bytearray(image_bytes("GIF"))
    data[6:10] = struct.pack("<HH", w, h)  # logical screen
    i = data.index(b"\x2c", 13)  # image descriptor: left, top, width, height
    data[i + 5:i + 9] = struct.pack("<HH", w, h)
    return bytes(data)


def bmp_claiming(w: int, h: int) -> bytes:
    data = bytearray(image_bytes("BMP"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def write_clip(path: Path, w: int = 32, h: int = 32, n: int = 12, fmt: str = "mp4", rate: int = 24,
               pts: list[int] | None = None, faststart: bool = False) -> Path:
    import fractions

    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=opts) as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if pts is not None:
            s.codec_context.time_base = fractions.Fraction(1, rate)
        for k in range(len(pts) if pts is not None else n):
            a = np.full((h, w, 3), (k * 37) % 255, np.uint8)
            a[:, (k * 3) % w] = 255
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts is not None:
                frame.pts = pts[k]
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(pwned) print\nshowpage\n%%EOF\n"
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"

# name -> (stage, relative path, expected reason or "ok:<FORMAT>")
CASES = {
    "png-bomb-400-megapixels": ("image", "images/bomb.png", "decompression-bomb"),
    "jpeg-claims-65500x65500": ("image", "images/claims.jpg", "decompression-bomb"),
    "gif-claims-65535x65535": ("image", "images/claims.gif", "decompression-bomb"),
    "bmp-claims-100000x100000": ("image", "images/claims.bmp", "decompression-bomb"),
    "png-text-chunk-bomb": ("image", "images/ztxt.png", "corrupt"),
    "png-named-jpg": ("image", "images/really_png.jpg", "ok:PNG"),
    "text-named-jpg": ("image", "images/notes.jpg", "unsupported-format"),
    "mp4-named-jpg": ("image", "images/clip.jpg", "unsupported-format"),
    "eps-named-jpg": ("image", "images/ghostscript.jpg", "unsupported-format"),
    "svg-named-jpg": ("image", "images/vector.jpg", "unsupported-format"),
    "html-named-png": ("image", "images/page.png", "unsupported-format"),
    "jpeg-cut-after-header": ("image", "images/header_only.jpg", "truncated"),
    "symlink-loop": ("image", "images/loop.jpg", "invalid-path"),
    "symlink-to-dev-zero": ("image", "images/zero.jpg", "outside-root"),
    "video-claims-10-hours": ("video", "videos/ten_hours.mp4", "too-long"),
    "video-over-max-pixels": ("video", "videos/huge.mp4", "too-many-pixels"),
    "raw-stream-625s-no-duration": ("video", "videos/long.m4v", "too-long"),
    "video-truncated-mid-moov": ("video", "videos/cut.mp4", "corrupt"),
    "random-bytes-named-mp4": ("video", "videos/noise.mp4", "corrupt"),
    "symlink-video-to-dev-zero": ("video", "videos/zero.mp4", "outside-root"),
}


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "ds"
    img, vid = root / "images", root / "videos"
    img.mkdir(parents=True)
    vid.mkdir()
    (img / "bomb.png").write_bytes(png_bomb())
    (img / "claims.jpg").write_bytes(jpeg_claiming(65500, 65500))
    (img / "claims.gif").write_bytes(gif_claiming(65535, 65535))
    (img / "claims.bmp").write_bytes(bmp_claiming(100_000, 100_000))
    (img / "ztxt.png").write_bytes(png_text_bomb())
    (img / "really_png.jpg").write_bytes(image_bytes("PNG"))
    (img / "notes.jpg").write_text("not an image\n" * 4)
    (img / "ghostscript.jpg").write_bytes(EPS)
    (img / "vector.jpg").write_bytes(SVG)
    (img / "page.png").write_bytes(HTML)
    jpeg = image_bytes("JPEG", 256, 256)
    (img / "header_only.jpg").write_bytes(jpeg[: jpeg.index(b"\xff\xda") + 20])  # cut inside the scan
    os.symlink("loop.jpg", img / "loop.jpg")
    os.symlink("/dev/zero", img / "zero.jpg")
    write_clip(img / "clip.jpg.mp4")
    os.replace(img / "clip.jpg.mp4", img / "clip.jpg")
    write_clip(vid / "ten_hours.mp4", rate=1, pts=[0, 10 * 3600])
    side = int(np.ceil(np.sqrt(float(VID_P["max_pixels"]) * 1.01)))
    write_clip(vid / "huge.mp4", w=side + side % 2, h=side + side % 2, n=1)
    write_clip(vid / "long.m4v", w=16, h=16, fmt="m4v", n=int((float(VID_P["max_duration_s"]) + 25) * 24))
    good = write_clip(vid / "good.mp4", n=24).read_bytes()
    (vid / "cut.mp4").write_bytes(good[: len(good) * 6 // 10])
    (vid / "noise.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    os.symlink("/dev/zero", vid / "zero.mp4")
    return root


DRIVER = r"""
import json, resource, sys, time
from pipelines.media import MediaError, decode_image, read_media_bytes, resolve_media_path, sample_video
root, cases, ip, vp = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
# a safety net only: a runaway allocation fails here instead of taking the machine down
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
out = {}
for name, (stage, rel, _expected) in cases.items():
    t0 = time.perf_counter()
    try:
        if stage == "image":
            data = read_media_bytes(root, rel, max_bytes=int(float(ip["max_file_mb"]) * 2**20))
            img = decode_image(data, max_pixels=int(float(ip["max_pixels"])), formats=ip["formats"],
                               draft_size=int(ip["image_size"]))
            got = "ok:" + img.format
        else:
            path = resolve_media_path(root, rel, max_bytes=int(float(vp["max_file_mb"]) * 2**20))
            sample_video(path, n_frames=int(vp["n_frames"]), sampling=vp["sampling"], image_size=32,
                         max_duration_s=float(vp["max_duration_s"]), max_pixels=int(float(vp["max_pixels"])))
            got = "ok"
    except MediaError as exc:
        got = exc.reason
    except BaseException as exc:
        got = "CRASH " + type(exc).__name__ + ": " + str(exc)[:200]
    out[name] = {"got": got, "seconds": round(time.perf_counter() - t0, 3)}
# peak RSS of this process image (VmHWM resets at exec; ru_maxrss would include the parent's)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
out["_maxrss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


def test_hostile_media_rejected_with_bounded_time_and_memory(media_root):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", DRIVER, str(media_root), json.dumps(CASES),
                          json.dumps(IMG_P), json.dumps(VID_P)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    wrong = {n: out[n]["got"] for n, (_s, _r, want) in CASES.items() if out[n]["got"] != want}
    assert not wrong, wrong
    slow = {n: out[n]["seconds"] for n in CASES if out[n]["seconds"] > 10}
    assert not slow, slow
    assert out["_maxrss_mb"] < MAX_RSS_MB, out["_maxrss_mb"]
    assert time.perf_counter() - t0 < 120


def test_hostile_media_through_the_stages_are_missing_rows_with_reasons(media_root):
    """The same files through preprocess_image / preprocess_video with params.yaml's limits."""
    import pandas as pd

    from tasks.preprocess_image import preprocess_image
    from tasks.preprocess_video import preprocess_video
    from tests.tasks.test_preprocess_image import TINY as TINY_IMAGE
    from tests.tasks.test_preprocess_video import TINY as TINY_VIDEO

    for stage, fn, tiny, col, p in (("image", preprocess_image, TINY_IMAGE, "image", IMG_P),
                                    ("video", preprocess_video, TINY_VIDEO, "video", VID_P)):
        names = [n for n, (s, _r, _w) in CASES.items() if s == stage]
        items = pd.DataFrame({"item_id": names, col: [CASES[n][1] for n in names]})
        params = {**p, "backbone": tiny, "device": "cpu", "progress": False, "image_size": 32,
                  "cache": False}
        t0 = time.perf_counter()
        res = fn(items, media_root, params)
        assert time.perf_counter() - t0 < 120
        t = res["features"].set_index("item_id")
        for n in names:
            want = CASES[n][2]
            if want.startswith("ok"):
                assert t.loc[n, "present"], n
            else:
                assert not t.loc[n, "present"] and t.loc[n, "reason"] == want, (n, t.loc[n, "reason"])


# --------------------------------------------------------------------------- property tests

MEDIA_SETTINGS = dict(deadline=timedelta(seconds=10), database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
IMAGE_SEEDS = {fmt: image_bytes(fmt, 40, 24) for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")}


@pytest.mark.timeout(600)
@settings(max_examples=N_IMAGE_EXAMPLES, **MEDIA_SETTINGS)
@given(fmt=st.sampled_from(sorted(IMAGE_SEEDS)), data=st.data())
def test_damaged_images_decode_or_fail_with_a_reason(fmt, data):
    raw = data.draw(hostile.damaged_bytes(IMAGE_SEEDS[fmt]))
    try:
        img = decode_image(raw, max_pixels=int(float(IMG_P["max_pixels"])), formats=IMG_P["formats"])
    except MediaError as exc:
        assert exc.reason in {"empty-file", "unsupported-format", "decompression-bomb", "truncated",
                              "corrupt"}, exc
        event(f"{fmt}: {exc.reason}")
        return
    assert img.image.mode == "RGB" and img.image.size[0] > 0 and img.image.size[1] > 0
    event(f"{fmt}: decoded")


def test_tiff_with_rational_strip_offsets_is_corrupt_not_a_crash():
    # found by the property test above (CI of 39435fe): a StripOffsets tag typed RATIONAL made
    # Pillow raise TypeError from im.load(), which escaped decode_image and would have stopped
    # preprocess_image instead of recording the item as missing with a reason
    raw = bytearray(IMAGE_SEEDS["TIFF"])
    assert raw[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", raw, 4)[0]
    patched = 0
    for k in range(struct.unpack_from("<H", raw, ifd)[0]):
        off = ifd + 2 + 12 * k
        tag, _typ, count, value = struct.unpack_from("<HHII", raw, off)
        if tag == 273:  # StripOffsets: LONG -> RATIONAL (8 bytes at the old offset)
            struct.pack_into("<HHII", raw, off, tag, 5, count, value)
            patched += 1
    assert patched == 1
    with pytest.raises(MediaError) as exc:
        decode_image(bytes(raw))
    assert exc.value.reason == "corrupt" and "TypeError" in str(exc.value)


@functools.lru_cache(maxsize=1)
def video_seeds() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        return {"mp4": write_clip(Path(d) / "a.mp4", n=24).read_bytes(),
                "mp4-faststart": write_clip(Path(d) / "b.mp4", n=24, faststart=True).read_bytes(),
                "mkv": write_clip(Path(d) / "c.mkv", n=24, fmt="matroska").read_bytes()}


@pytest.mark.timeout(600)
@settings(max_examples=N_VIDEO_EXAMPLES, **MEDIA_SETTINGS)
@given(kind=st.sampled_from(["mp4", "mp4-faststart", "mkv"]), data=st.data())
def test_damaged_videos_decode_or_fail_with_a_reason(kind, data):
    raw = data.draw(hostile.damaged_bytes(video_seeds()[kind]))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"v.{kind[:3]}"
        path.write_bytes(raw)
        try:
            s = sample_video(path, n_frames=4, image_size=16,
                             max_duration_s=float(VID_P["max_duration_s"]),
                             max_pixels=int(float(VID_P["max_pixels"])))
        except MediaError as exc:
            event(f"{kind}: {exc.reason}")
            return
    assert s.frames.shape == (4, 16, 16, 3)
    event(f"{kind}: decoded")


def test_video_stream_without_codec_parameters_is_corrupt(tmp_path):
    """Found by the property test: a faststart MP4 cut inside its moov atom has a video stream
    without a codec context; probing it raised AttributeError (a stage crash)."""
    raw = video_seeds()["mp4-faststart"]
    path = tmp_path / "cut.mp4"
    path.write_bytes(raw[: raw.index(b"vide") + 4])
    with pytest.raises(MediaError) as ei:
        sample_video(path, n_frames=2, image_size=16)
    assert ei.value.reason == "corrupt"
