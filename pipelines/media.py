"""Safe decoding of item media (images with Pillow, videos with PyAV).

Media paths in an items table are relative to the dataset directory (the
*media root*).  Nothing here trusts a path or a file: every failure becomes a
:class:`MediaError` carrying a short, stable ``reason`` code that the stages
record in their feature tables (a missing entry, never a crash, never a silent
zero vector).  Reason codes:

=====================  ===================================================
``outside-root``       the path (``..``, absolute, or a symlink) leaves the root
``invalid-path``       the path cannot name a file (NUL byte, ...)
``missing-file``       nothing at the path (or a dangling symlink)
``not-a-file``         a directory, FIFO, device, ...
``empty-file``         zero bytes
``file-too-large``     over the ``max_file_mb`` limit
``unsupported-format`` not an image of an allowed format (checked from the
                       bytes, not the extension)
``decompression-bomb`` more pixels than ``max_pixels``
``truncated``          the data ends early
``corrupt``            the decoder rejected the data
``no-video-stream``    a container without a video stream
``too-many-pixels``    video frame larger than ``max_pixels``
``too-long``           video longer than ``max_duration_s``
``no-frames``          no frame could be decoded
=====================  ===================================================
"""

from __future__ import annotations

import contextlib
import heapq
import io
import math
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Formats decoded by default.  Plugins that shell out (EPS -> Ghostscript) or
#: are rarely seen for posters stay off unless a caller asks for them.
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MediaError(Exception):
    """A media file that cannot be used; ``reason`` is a stable short code."""

    def __init__(self, reason: str, detail: str = "", info: dict[str, Any] | None = None):
        self.reason = reason
        self.detail = detail
        self.info = dict(info or {})
        super().__init__(f"{reason}: {detail}" if detail else reason)


# --------------------------------------------------------------------------- paths

def resolve_media_path(root: str | os.PathLike, rel: str, *,
                       max_bytes: int | None = None) -> Path:
    """Resolve ``rel`` inside ``root`` and check it names a readable regular file.

    The returned path is fully resolved (no symlink left in it), so opening it
    cannot be redirected outside the root by a link.
    """
    root_r = Path(root).resolve()
    rel = str(rel)
    if "\x00" in rel:
        raise MediaError("invalid-path", "NUL byte in path")
    candidate = Path(rel)
    if candidate.is_absolute():
        raise MediaError("outside-root", f"absolute path {rel!r}")
    try:
        resolved = (root_r / candidate).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop, name too long
        raise MediaError("invalid-path", f"{rel!r}: {exc}") from exc
    if not resolved.is_relative_to(root_r):
        raise MediaError("outside-root", f"{rel!r} resolves outside the media root")
    try:
        st = resolved.stat()
    except FileNotFoundError as exc:
        raise MediaError("missing-file", f"{rel!r} does not exist") from exc
    except OSError as exc:
        raise MediaError("invalid-path", f"{rel!r}: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "special file"
        raise MediaError("not-a-file", f"{rel!r} is a {kind}")
    if st.st_size == 0:
        raise MediaError("empty-file", f"{rel!r} has zero bytes")
    if max_bytes is not None and st.st_size > max_bytes:
        raise MediaError("file-too-large", f"{rel!r} has {st.st_size} bytes > {max_bytes}")
    if not os.access(resolved, os.R_OK):
        raise MediaError("missing-file", f"{rel!r} is not readable")
    return resolved


def read_media_bytes(root: str | os.PathLike, rel: str, *, max_bytes: int | None = None) -> bytes:
    path = resolve_media_path(root, rel, max_bytes=max_bytes)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError("missing-file", f"{rel!r}: {exc}") from exc
    if not data:
        raise MediaError("empty-file", f"{rel!r} has zero bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise MediaError("file-too-large", f"{rel!r} grew to {len(data)} bytes")
    return data


# --------------------------------------------------------------------------- images

@dataclass
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    width: int  # original (pre-draft, pre-rotation) size from the header
    height: int
    format: str


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Temporarily set Pillow's decompression-bomb limit (process-global; None = off)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if max_pixels is None else int(max_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_image_format(data: bytes) -> str | None:
    """Format named by the leading magic bytes (to tell 'corrupt' from 'not an image')."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for sig, name in _SIGNATURES:
        if data.startswith(sig):
            return name
    return None


def check_formats(formats) -> list[str] | None:
    """Upper-cased format list; unknown names are a configuration error (ValueError)."""
    if not formats:
        return None
    Image.init()
    fmts = [str(f).upper() for f in formats]
    unknown = [f for f in fmts if f not in Image.OPEN]
    if unknown:
        raise ValueError(f"unknown image format(s) {unknown}; Pillow opens {sorted(Image.OPEN)}")
    return fmts


# what Pillow's decoders raise on malformed bytes (not a catch-all: a MemoryError or a bug of
# ours still propagates).  TypeError: a TIFF whose StripOffsets tag is typed RATIONAL makes
# Pillow seek to an IFDRational (found by test_damaged_images_decode_or_fail_with_a_reason);
# struct.error / IndexError / KeyError: short or inconsistent tag tables.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, ZeroDivisionError, TypeError,
                 IndexError, KeyError, struct.error)


def decode_image(data: bytes, *, max_pixels: int = 40_000_000,
                 formats: tuple[str, ...] | list[str] | None = DEFAULT_IMAGE_FORMATS,
                 draft_size: int | None = None) -> DecodedImage:
    """Decode image bytes safely; raises :class:`MediaError`.

    The real format is detected from the bytes (the file name is never used).
    ``max_pixels`` is checked from the header before any pixel is decoded.
    ``draft_size`` lets JPEG decode at a reduced scale that is still at least
    that many pixels on each side (much faster for large photos).
    """
    if not data:
        raise MediaError("empty-file", "zero bytes")
    fmts = check_formats(formats)
    # header first, with Pillow's own bomb check off so the claimed size can be
    # recorded; nothing is decoded before the explicit max_pixels check below
    with pixel_limit(None):
        try:
            im = Image.open(io.BytesIO(data), formats=fmts)
        except UnidentifiedImageError as exc:
            sniffed = sniff_image_format(data)
            if sniffed and (fmts is None or sniffed in fmts):
                raise MediaError("corrupt", f"{sniffed} signature but undecodable header",
                                 {"format": sniffed}) from exc
            raise MediaError("unsupported-format", "not a recognised image"
                             + (f" (allowed {', '.join(fmts)})" if fmts else "")) from exc
        except DECODE_ERRORS as exc:
            raise MediaError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    fmt = str(im.format or "")
    width, height = im.size
    info = {"width": width, "height": height, "format": fmt}
    if width <= 0 or height <= 0:
        raise MediaError("corrupt", f"invalid size {width}x{height}", info)
    if width * height > max_pixels:
        raise MediaError("decompression-bomb",
                         f"{width}x{height} = {width * height} pixels > {int(max_pixels)}", info)
    with pixel_limit(max_pixels), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if draft_size and fmt in ("JPEG", "MPO"):
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise MediaError("decompression-bomb", str(exc), info) from exc
        except DECODE_ERRORS as exc:
            msg = f"{type(exc).__name__}: {exc}"
            reason = "truncated" if "truncat" in str(exc).lower() else "corrupt"
            raise MediaError(reason, msg, info) from exc
    return DecodedImage(im, width, height, fmt)


def resize_center_crop(im: Image.Image, size: int, resize_size: int | None = None) -> np.ndarray:
    """Resize the shorter side to ``resize_size`` (default ``size``), centre-crop
    ``size`` x ``size``; returns uint8 [size, size, 3].

    Done as one resample of the source region that the crop keeps (Pillow's
    ``box``), so an extreme aspect ratio never builds a huge intermediate image.
    """
    size = int(size)
    resize_size = int(resize_size or size)
    w, h = im.size
    scale = resize_size / min(w, h)
    bw, bh = min(w, size / scale), min(h, size / scale)  # kept region, source pixels
    left, top = (w - bw) / 2, (h - bh) / 2
    out = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + bw, top + bh))
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise MediaError("corrupt", f"unexpected decoded shape {arr.shape}")
    return arr


def crop_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre crop an HWC array (already resized so its shorter side is ``size``)."""
    h, w = arr.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    out = arr[top:top + size, left:left + size]
    if out.shape[:2] != (size, size):
        out = resize_center_crop(Image.fromarray(np.ascontiguousarray(arr)), size)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- videos

@dataclass
class VideoSample:
    frames: np.ndarray  # uint8 [k, size, size, 3]
    times: list[float]
    info: dict[str, Any] = field(default_factory=dict)  # duration_s, fps, width, height


def _frame_time(frame, index: int, fps: float) -> float:
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * frame.time_base)
    if frame.time is not None:
        return float(frame.time)
    return index / fps if fps > 0 else float(index)


def _frame_to_model(frame, size: int) -> np.ndarray:
    w, h = frame.width, frame.height
    if max(w, h) <= 4 * min(w, h):
        # usual aspect: let swscale downscale (fast), then crop the centre
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        arr = frame.to_ndarray(format="rgb24", width=nw, height=nh, interpolation="BICUBIC")
        return crop_array(arr, size)
    return resize_center_crop(Image.fromarray(frame.to_ndarray(format="rgb24")), size)


def _histogram(frame) -> np.ndarray:
    small = frame.to_ndarray(format="rgb24", width=64, height=36)
    hist = [np.bincount((small[..., c] >> 4).ravel(), minlength=16) for c in range(3)]
    h = np.concatenate(hist).astype(np.float32)
    return h / max(float(h.sum()), 1.0)


def _open_video(path: str | os.PathLike):
    import av

    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise MediaError("corrupt", f"cannot open container: {exc}") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError("corrupt", f"cannot open container: {type(exc).__name__}: {exc}") from exc


def probe_video(container) -> dict[str, Any]:
    """duration_s (None when unknown), fps, width, height of the first video stream."""
    if not container.streams.video:
        raise MediaError("no-video-stream", "container has no video stream")
    st = container.streams.video[0]
    cc = st.codec_context
    if cc is None:  # e.g. a moov atom cut inside the track: no codec parameters
        raise MediaError("corrupt", "video stream without codec parameters")
    width, height = int(cc.width or 0), int(cc.height or 0)
    rate = st.average_rate or st.base_rate or st.guessed_rate
    fps = float(rate) if rate else 0.0
    duration = None
    if st.duration is not None and st.time_base is not None and st.duration > 0:
        duration = float(st.duration * st.time_base)
    elif container.duration is not None and container.duration > 0:
        duration = container.duration / 1_000_000
    elif st.frames and fps > 0:
        duration = st.frames / fps
    return {"duration_s": duration, "fps": fps, "width": width, "height": height}


def sample_video(path: str | os.PathLike, *, n_frames: int = 8, sampling: str = "uniform",
                 image_size: int = 224, max_duration_s: float = 600.0,
                 max_pixels: int = 4096 * 2160, seek_min_duration_s: float = 30.0) -> VideoSample:
    """Decode ``n_frames`` frames of a video as model inputs (uint8 crops).

    ``sampling='uniform'``: frames nearest to the centres of ``n_frames`` equal
    time slots (seeking to each slot's keyframe for videos longer than
    ``seek_min_duration_s``, otherwise decode-and-pick).  ``'scene'``: the
    first frame plus the frames with the largest colour-histogram change from
    their predecessor.  Frames are returned in time order.
    """
    import av

    if sampling not in ("uniform", "scene"):
        raise ValueError(f"unknown video sampling '{sampling}' (uniform or scene)")
    n_frames = int(n_frames)
    if n_frames < 1:
        raise ValueError("n_frames must be >= 1")
    container = _open_video(path)
    with container:
        info = probe_video(container)
        st = container.streams.video[0]
        w, h = info["width"], info["height"]
        if w <= 0 or h <= 0:
            raise MediaError("corrupt", f"invalid frame size {w}x{h}", info)
        if w * h > max_pixels:
            raise MediaError("too-many-pixels", f"{w}x{h} = {w * h} pixels per frame > "
                             f"{int(max_pixels)}", info)
        if info["duration_s"] is not None and info["duration_s"] > max_duration_s:
            raise MediaError("too-long", f"{info['duration_s']:.1f}s > {max_duration_s}s", info)
        st.thread_type = "AUTO"
        fps = info["fps"] or 25.0
        # metadata can lie: never decode more frames than the limit allows
        max_frames = math.ceil(max_duration_s * max(fps, 1.0) * 1.25) + 16
        try:
            if sampling == "uniform" and info["duration_s"] \
                    and info["duration_s"] >= seek_min_duration_s:
                try:
                    picked = _uniform_seek(container, st, info, n_frames, fps, max_frames)
                except (av.FFmpegError, MediaError):
                    container.seek(0)
                    picked = _decode_and_pick(container, st, info, n_frames, fps, max_frames,
                                              max_duration_s, sampling)
            else:
                picked = _decode_and_pick(container, st, info, n_frames, fps, max_frames,
                                          max_duration_s, sampling)
            frames = [(t, _frame_to_model(f, image_size)) for t, f in picked]
        except av.FFmpegError as exc:
            raise MediaError("corrupt", f"decode error: {exc}", info) from exc
    frames.sort(key=lambda x: x[0])
    arr = np.stack([f for _, f in frames]).astype(np.uint8)
    return VideoSample(arr, [t for t, _ in frames], info)


def _decode_frames(container, st, fps, max_frames, max_duration_s, info) -> Iterator[tuple]:
    """Yield (index, time, frame); mid-stream errors after some frames -> 'truncated'."""
    import av

    i = -1
    try:
        for packet in container.demux(st):
            for frame in packet.decode():
                i += 1
                if i >= max_frames:
                    raise MediaError("too-long", f"more than {max_frames} frames", info)
                t = _frame_time(frame, i, fps)
                if t > max_duration_s + 1.0:
                    raise MediaError("too-long", f"frame at {t:.1f}s > {max_duration_s}s", info)
                yield i, t, frame
    except av.FFmpegError as exc:
        if i < 0:
            raise MediaError("corrupt", f"decode error: {exc}", info) from exc
        raise MediaError("truncated", f"decode error after {i + 1} frames: {exc}", info) from exc


def _decode_and_pick(container, st, info, n_frames, fps, max_frames, max_duration_s, sampling):
    if sampling == "scene":
        return _scene_pick(container, st, info, n_frames, fps, max_frames, max_duration_s)
    duration = info["duration_s"]
    if duration is None:
        # unknown duration: decode once to learn it (bounded), then pick
        times = [t for _i, t, _f in _decode_frames(container, st, fps, max_frames,
                                                     max_duration_s, info)]
        if not times:
            raise MediaError("no-frames", "no frame decoded", info)
        duration = max(times) + 1.0 / fps
        info["duration_s"] = duration
        container.seek(0)
    start = float(st.start_time * st.time_base) if st.start_time is not None and st.time_base \
        else 0.0
    targets = [start + (k + 0.5) * duration / n_frames for k in range(n_frames)]
    best: list[tuple[float, float, Any] | None] = [None] * n_frames
    last_t = None
    k0 = 0  # first target not yet passed
    for _i, t, frame in _decode_frames(container, st, fps, max_frames, max_duration_s, info):
        last_t = t
        for k in range(k0, n_frames):
            d = abs(t - targets[k])
            if best[k] is None or d < best[k][0]:
                best[k] = (d, t, frame)
        # frames come in presentation order: a target whose best frame is
        # already closer than this (later) one is settled
        while k0 < n_frames and t > targets[k0] and best[k0][0] < abs(t - targets[k0]):
            k0 += 1
        if k0 >= n_frames:
            break
    if last_t is None:
        raise MediaError("no-frames", "no frame decoded", info)
    tol = max(2.0 / fps, 0.1 * duration)
    if k0 < n_frames and last_t < start + duration - tol:
        raise MediaError("truncated", f"stream ends at {last_t:.2f}s of {duration:.2f}s", info)
    return [(b[1], b[2]) for b in best if b is not None]


def _uniform_seek(container, st, info, n_frames, fps, max_frames):
    duration = info["duration_s"]
    tb = st.time_base
    start = float(st.start_time * tb) if st.start_time is not None and tb else 0.0
    picked = []
    budget = max_frames
    for k in range(n_frames):
        target = start + (k + 0.5) * duration / n_frames
        container.seek(int(target / tb), stream=st, backward=True, any_frame=False)
        chosen = None
        prev = None
        for packet in container.demux(st):
            for frame in packet.decode():
                budget -= 1
                if budget < 0:
                    raise MediaError("too-long", "frame budget exhausted while seeking", info)
                t = _frame_time(frame, 0, fps)
                if t >= target:
                    if prev is not None and target - prev[0] < t - target:
                        chosen = prev
                    else:
                        chosen = (t, frame)
                    break
                prev = (t, frame)
            if chosen is not None:
                break
        if chosen is None:
            chosen = prev
        if chosen is None:
            raise MediaError("truncated", f"no frame at or before {target:.2f}s", info)
        picked.append(chosen)
    return picked


def _scene_pick(container, st, info, n_frames, fps, max_frames, max_duration_s):
    heap: list[tuple[float, int, float, Any]] = []  # (score, index, time, frame): min-heap
    first = None
    prev_hist = None
    last_t = None
    for i, t, frame in _decode_frames(container, st, fps, max_frames, max_duration_s, info):
        last_t = t
        hist = _histogram(frame)
        if first is None:
            first = (t, frame)
        else:
            score = float(np.abs(hist - prev_hist).sum())
            item = (score, -i, t, frame)  # ties: earlier frame wins
            if len(heap) < n_frames - 1:
                heapq.heappush(heap, item)
            elif n_frames > 1 and item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
        prev_hist = hist
    if first is None:
        raise MediaError("no-frames", "no frame decoded", info)
    duration = info["duration_s"]
    if duration and last_t is not None:
        start = float(st.start_time * st.time_base) if st.start_time is not None \
            and st.time_base else 0.0
        if last_t < start + duration - max(2.0 / fps, 0.1 * duration):
            raise MediaError("truncated", f"stream ends at {last_t:.2f}s of {duration:.2f}s",
                             info)
    picked = [first] + [(t, f) for _s, _i, t, f in heap]
    return picked


def video_file_info(path: str | os.PathLike) -> dict[str, Any]:
    """Probe only (no decoding); raises :class:`MediaError`."""
    container = _open_video(path)
    with container:
        return probe_video(container)
