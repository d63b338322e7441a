"""Benchmark the feature stages on a real dataset (CPU).

For each modality (text, image, video) the pure stage function runs in its
own child process (no cache), so that the peak RSS reported is that
modality's alone (``os.wait4``).  Reported per modality: wall seconds
(model load included), items/s, peak RSS, and the share of items that have
the modality.  ``text-vs-st`` encodes the same built texts with our
:class:`pipelines.encoders.TextEncoder` and with sentence-transformers'
``SentenceTransformer(model_dir).encode()`` in the same process, alternating
``--repeats`` times, and reports the best time of each and their ratio.

    python bench/bench_features.py --data ../shared/datasets/ml100k-mm \\
        --out reports/bench_features.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = os.environ.get("MMREC_ML100K", str(ROOT / ".." / "shared" / "datasets" / "ml100k-mm"))


def _items(data: str, limit: int | None):
    from pipelines.schema import load_raw, normalise

    items = normalise(load_raw(data)).items
    return items.head(limit) if limit else items


def _set_threads(n: int | None) -> int:
    from pipelines.features import set_threads

    return set_threads(n)


def child(kind: str, args) -> dict:
    """Runs inside the child process; returns a JSON-able result."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from pipelines.features import prepare_cpu_runtime

    prepare_cpu_runtime()  # as the stage CLIs do
    threads = _set_threads(args.threads)
    items = _items(args.data, args.limit)
    t0 = time.perf_counter()
    common = {"device": "cpu", "progress": False, "cache": False, "num_threads": threads}
    if kind == "text":
        from tasks.preprocess_text import preprocess_text

        res = preprocess_text(items, common)
    elif kind == "image":
        from tasks.preprocess_image import preprocess_image

        res = preprocess_image(items, args.data, common)
    elif kind == "video":
        from tasks.preprocess_video import preprocess_video

        res = preprocess_video(items, args.data, common)
    elif kind == "text-vs-st":
        return text_vs_st(items, args, threads)
    else:
        raise ValueError(kind)
    wall = time.perf_counter() - t0
    m = res["meta"]
    return {"modality": kind, "threads": threads, "wall_s": round(wall, 2),
            "n_items": m["n_items"], "n_present": m["n_present"],
            "share_present": round(m["n_present"] / max(m["n_items"], 1), 4),
            "items_per_s": round(m["n_items"] / wall, 2),
            "encoded_per_s": round(m["n_encoded_this_run"] / wall, 2),
            "missing_reasons": m["missing_reasons"], "dim": m["dim"]}


def text_vs_st(items, args, threads) -> dict:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from pipelines.encoders import load_text_encoder, resolve_text_model
    from tasks.preprocess_text import DEFAULTS, build_texts

    texts = [t for t in build_texts(items, {})[0] if t]
    model_dir = resolve_text_model(DEFAULTS["model"])[0]
    ours = load_text_encoder(DEFAULTS["model"], device="cpu")
    st = SentenceTransformer(model_dir, device="cpu")
    ours_t, st_t, ours_cpu, st_cpu = [], [], [], []
    def run_ours():
        t, c = time.perf_counter(), time.process_time()
        e = ours.encode(texts, batch_size=DEFAULTS["batch_size"],
                        max_length=DEFAULTS["max_length"], show_progress=False)
        ours_t.append(time.perf_counter() - t)
        ours_cpu.append(time.process_time() - c)
        return e

    def run_st():
        t, c = time.perf_counter(), time.process_time()
        e = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        st_t.append(time.perf_counter() - t)
        st_cpu.append(time.process_time() - c)
        return e

    for r in range(args.repeats):  # ABBA order: a load drift hits both alike
        if r % 2 == 0:
            e_ours, e_st = run_ours(), run_st()
        else:
            e_st, e_ours = run_st(), run_ours()
    cos = (e_ours * e_st).sum(1)
    return {"modality": "text-vs-st", "threads": threads, "n_texts": len(texts),
            "ours_wall_s": r2(ours_t), "st_wall_s": r2(st_t),
            "ours_cpu_s": r2(ours_cpu), "st_cpu_s": r2(st_cpu),
            "speedup_vs_st_wall": round(min(st_t) / min(ours_t), 3),
            "speedup_vs_st_cpu": round(min(st_cpu) / min(ours_cpu), 3),
            "ours_texts_per_s": round(len(texts) / min(ours_t), 2),
            "st_texts_per_s": round(len(texts) / min(st_t), 2),
            "min_cosine_vs_st": float(np.round(cos.min(), 6)),
            "max_length": DEFAULTS["max_length"], "st_max_seq_length": int(st.max_seq_length),
            "ours_batch_size": DEFAULTS["batch_size"], "st_batch_size": 32}


def r2(xs) -> list[float]:
    return [round(x, 2) for x in xs]


def run_child(kind: str, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, __file__, "--child", kind, "--child-out", str(out),
               "--data", args.data, "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            return {"modality": kind, "error": f"child exited {proc.returncode}"}
        res = json.loads(out.read_text())
        res["process_wall_s"] = round(wall, 2)  # python start + imports + stage
        res["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
        res["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
        return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="dataset dir (items.csv + media)")
    ap.add_argument("--modalities", default="text,image,video,text-vs-st")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default all cores)")
    ap.add_argument("--limit", type=int, default=None, help="first N items only")
    ap.add_argument("--repeats", type=int, default=2, help="text-vs-st alternations")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = child(args.child, args)
        Path(args.child_out).write_text(json.dumps(res))
        return 0
    if not Path(args.data).is_dir():
        print(f"dataset {args.data} not found (set MMREC_ML100K)", file=sys.stderr)
        return 2
    report = {"data": str(Path(args.data).resolve()), "cpu_count": os.cpu_count(),
              "load_avg_start": os.getloadavg(), "results": []}
    t0 = time.perf_counter()
    for kind in [m.strip() for m in args.modalities.split(",") if m.strip()]:
        res = run_child(kind, args)
        report["results"].append(res)
        print(json.dumps(res), flush=True)
    report["total_wall_s"] = round(time.perf_counter() - t0, 2)
    report["load_avg_end"] = os.getloadavg()
    text_image = [r.get("process_wall_s", 0) for r in report["results"]
                  if r.get("modality") in ("text", "image")]
    report["text_plus_image_wall_s"] = round(sum(text_image), 2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
