"""Scale benchmark: the whole stage graph on synthetic datasets of growing size.

``python -m pipelines.bench_scale --sizes 1000000 5000000 --workdir DIR --out reports/bench-scale.json``

For each size (number of interactions) the project's generator streams a
dataset (``python -m pipelines generate-demo ... --format parquet``) with the
catalogue of :func:`catalogue` (users = size / 50; items grow with the square
root of the size; images on, videos off), then every stage of the graph runs
on it, in a fresh work directory, with the same commands as ``dvc.yaml``
(:func:`pipelines.bench.run_protocol`): wall seconds and the peak RSS of each
stage process are recorded.

Incremental retraining (default on; ``--no-incremental`` for one cold run per
size): the dataset is cut into a *base* (95% of the interactions) and an
*increment* (5%: every interaction of 1% new users and 1% new items, the rest
the most recent interactions by timestamp).  The graph runs cold on the base
(these are the size's figures, at ``n_interactions`` = the base's count), then
reruns in the same work directory on the whole dataset: the feature stages
reuse the embeddings of unchanged items (content-hash cache), ``train_encoder``
and ALS/BPR warm-start from the previous outputs and ``fuse`` reuses its ranker
and rescores only the users whose training rows changed (``warm_start``
params), as ``dvc repro`` does with the ``persist`` outputs.  The rerun's seconds per
stage and its ratio to the cold run are recorded (conservative: the rerun has
5% more data than the cold run it is compared with).

Output ``{size: {"seconds": {stage: s}, "cpu_seconds": {stage: user+system s},
"peak_rss_mb": {stage: MiB}, "total_seconds", "total_cpu_seconds",
"peak_rss_mb_max", "n_interactions", "dataset": {...}, "ndcg@10": {model: v},
"incremental": {"seconds", "cpu_seconds", "total_seconds", "ratio", "cpu_ratio",
"reuse", ...}}, "machine": {...}}``, a log-log plot of time against
interactions (``<out>.png``) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import bench
from .io import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
MEAN_PER_USER = 50.0  # mean interactions per user (log-normal activity)


def catalogue(size: int, per_user: float = MEAN_PER_USER) -> dict:
    """Users and items for ``size`` interactions.

    Users grow linearly (``size / per_user``); the catalogue grows with the
    square root of the size (``3 * sqrt(size)``, at least 200): 3,000 items at
    1M interactions, 6,708 at 5M, like a service whose users grow faster than
    its catalogue.  Every item has text and a 64 px poster; videos are off.
    """
    users = max(50, int(round(size / per_user)))
    items = max(200, int(round(3.0 * math.sqrt(size))))
    return {"users": users, "items": items, "interactions_per_user": per_user,
            "images": True, "videos": False}


def generate(size: int, out: Path, log, seed: int = 0) -> dict:
    cat = catalogue(size)
    cmd = (f"python -m pipelines generate-demo --out {out} --users {cat['users']} "
           f"--items {cat['items']} --interactions {cat['interactions_per_user']} "
           f"--seed {seed} --no-videos --format parquet")
    log.write(f"$ {cmd}\n")
    log.flush()
    sec, mb, rc = bench.run_stage(cmd, ROOT, log)
    if rc != 0:
        raise RuntimeError(f"generate-demo failed (exit {rc}) for size {size}; see the log")
    return {**cat, "generate_seconds": round(sec, 2), "generate_peak_rss_mb": round(mb, 1)}


def split_increment(full: Path, base: Path, share: float = 0.05, new_share: float = 0.01,
                    seed: int = 0) -> dict:
    """Write ``base``: ``full`` without its latest ``share`` of interactions.

    The increment holds every interaction of ``new_share`` of the users and of
    the items (chosen at random: they are absent from the base tables) and,
    to make up ``share``, the most recent remaining interactions.  Images are
    hard links (the validator rejects symlinks leaving the dataset).
    """
    import pandas as pd
    import pyarrow.parquet as pq

    r = pq.read_table(full / "ratings.parquet").to_pandas()
    items = pd.read_parquet(full / "items.parquet")
    users = pd.read_parquet(full / "users.parquet")
    rng = np.random.default_rng([seed, 7])
    new_items = set(rng.choice(items["item_id"].to_numpy(), max(1, int(len(items) * new_share)),
                               replace=False))
    new_users = set(rng.choice(users["user_id"].to_numpy(), max(1, int(len(users) * new_share)),
                               replace=False))
    new = r["item_id"].isin(new_items).to_numpy() | r["user_id"].isin(new_users).to_numpy()
    quota = int(round(share * len(r))) - int(new.sum())
    if quota > 0:
        ts = r["timestamp"].to_numpy()
        rest = np.nonzero(~new)[0]
        latest = rest[np.argsort(ts[rest], kind="stable")[len(rest) - quota:]]
        new[latest] = True
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    r[~new].to_parquet(base / "ratings.parquet", index=False)
    items[~items["item_id"].isin(new_items)].to_parquet(base / "items.parquet", index=False)
    users[~users["user_id"].isin(new_users)].to_parquet(base / "users.parquet", index=False)
    if (full / "images").is_dir():
        (base / "images").mkdir()
        keep = items.loc[~items["item_id"].isin(new_items), "image"].dropna()
        for rel in keep:
            os.link(full / rel, base / rel)
    return {"n_base": int((~new).sum()), "n_increment": int(new.sum()),
            "increment_share": round(float(new.mean()), 4), "new_items": len(new_items),
            "new_users": len(new_users)}


def _total(seconds: dict) -> float:
    return round(float(sum(seconds.values())), 2)


def _summary(run: dict) -> dict:
    return {"seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"],
            "cpu_seconds": run["cpu_seconds"], "total_seconds": _total(run["seconds"]),
            "total_cpu_seconds": _total(run["cpu_seconds"]),
            "peak_rss_mb_max": max(run["peak_rss_mb"].values()),
            "ndcg@10": _primary(run["metrics"])}


def run_size(size: int, workdir: Path, params: Path, incremental: bool, log,
             reuse_data: bool = False) -> dict:
    """Two runs with the increment (cold run on the base, warm rerun on all), else one cold run.

    With ``incremental`` the size's figures (``seconds``...) are those of the cold run on
    the base dataset (95% of the interactions: ``n_interactions``), and the ratio
    compares the rerun on 100% with it, a conservative ratio (the rerun has 5% more data).
    """
    data_dir = workdir / f"data-{size}"
    cat = catalogue(size)
    truth = data_dir / "truth.json"
    if reuse_data and truth.is_file() and {k: json.loads(truth.read_text())["params"][k2] for k, k2 in (
            ("users", "n_users"), ("items", "n_items"), ("interactions_per_user", "interactions_per_user"))
    } == {k: cat[k] for k in ("users", "items", "interactions_per_user")}:
        ds = {**cat, "generate_seconds": None, "reused": True}
    else:
        ds = generate(size, data_dir, log)
    print(f"[{size}] generated in {ds['generate_seconds']} s", file=sys.stderr, flush=True)
    proto = bench.PROTOCOLS["stratified"]
    if not incremental:
        # a cold run: nothing left from an earlier run (persisted outputs: the feature caches,
        # the warm-start models) may serve this one
        shutil.rmtree(workdir / f"run-{size}", ignore_errors=True)
        full = bench.run_protocol(data_dir, f"{size}", proto, workdir / f"run-{size}", params)
        import pyarrow.parquet as pq

        n = pq.ParquetFile(data_dir / "ratings.parquet").metadata.num_rows
        return {**_summary(full), "dataset": ds, "n_interactions": int(n),
                "detail": _detail(workdir / f"run-{size}")}
    base_dir = workdir / f"data-{size}-base"
    inc = split_increment(data_dir, base_dir)
    wd = workdir / f"inc-{size}"
    shutil.rmtree(wd, ignore_errors=True)  # the base run is cold (see above); the rerun is not
    base = bench.run_protocol(base_dir, f"{size}-base", proto, wd, params)
    res = {**_summary(base), "dataset": ds, "n_interactions": inc["n_base"], "detail": _detail(wd)}
    rerun = bench.run_protocol(data_dir, f"{size}-incremental", proto, wd, params)
    r = _summary(rerun)
    res["incremental"] = {
        **inc, **r,
        "ratio": round(r["total_seconds"] / max(res["total_seconds"], 1e-9), 3),
        "cpu_ratio": round(r["total_cpu_seconds"] / max(res["total_cpu_seconds"], 1e-9), 3),
        "reuse": _reuse(wd)}
    return res


def _primary(metrics: dict) -> dict:
    return {m: round(float(v.get("all", {}).get("ndcg@10", float("nan"))), 4)
            for m, v in metrics.items() if isinstance(v, dict)}


def _artifact(wd: Path, stage: str, name: str) -> dict | None:
    """A stage's JSON output in the work directory ``wd``, or None when it is not there."""
    f = wd / "artifacts" / stage / name
    return read_json(f) if f.is_file() else None


def _detail(wd: Path) -> dict:
    """Inside the two largest stages of a run: fit_cf's per-model seconds and tuning, fuse's phases."""
    out = {}
    s = _artifact(wd, "fit_cf", "summary.json")
    if s is not None:
        out["fit_cf"] = {"seconds": s.get("seconds"), "tuning": {
            name: {k: t.get(k) for k in ("chosen", "seconds", "results", "reused") if k in t}
            for name, t in (s.get("tuning") or {}).items()}}
    s = _artifact(wd, "fuse", "summary.json")
    if s is not None:
        out["fuse"] = {"seconds": s.get("seconds")}
    return out


def _reuse(wd: Path) -> dict:
    """What the rerun reused: feature cache hits, encoder/ALS warm starts."""
    out = {}
    for st in ("preprocess_text", "preprocess_image", "preprocess_video"):
        s = _artifact(wd, st, "meta.json")
        if s is not None:
            out[st] = {k: s.get(k) for k in ("n_items", "n_encoded_this_run", "n_reused_from_cache")
                       if k in s}
    s = _artifact(wd, "train_encoder", "metrics.json")
    if s is not None:
        out["train_encoder"] = {k: s.get(k) for k in ("warm_start", "epochs_run", "train_seconds")}
    s = _artifact(wd, "fit_cf", "summary.json")
    if s is not None:
        out["fit_cf"] = s.get("warm_start")
    s = _artifact(wd, "fuse", "summary.json")
    if s is not None:
        out["fuse"] = {"warm_start": s.get("warm_start"), "seconds": s.get("seconds")}
    return out


def table(result: dict) -> str:
    """Markdown: per stage wall s, CPU s (user + system) and peak RSS per size; incremental runs."""
    sizes = sorted((k for k in result if k.isdigit()), key=int)
    stages = []
    for s in sizes:
        for st in result[s]["seconds"]:
            if st not in stages:
                stages.append(st)
    head = "| stage | " + " | ".join(f"{int(s):,}: wall s | CPU s | RSS MiB" for s in sizes) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(sizes)]
    nan = float("nan")
    for st in stages:
        cells = []
        for s in sizes:
            r = result[s]
            cells += [f"{r['seconds'].get(st, nan):.1f}", f"{r.get('cpu_seconds', {}).get(st, nan):.1f}",
                      f"{r['peak_rss_mb'].get(st, nan):.0f}"]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(
        f"**{result[s]['total_seconds']:.1f}** | **{result[s].get('total_cpu_seconds', nan):.1f}** | "
        f"**{result[s]['peak_rss_mb_max']:.0f}** (max)" for s in sizes) + " |")
    if any("incremental" in result[s] for s in sizes):
        lines.append("")
        lines.append("| size | full run wall s (CPU s) | +5% rerun wall s (CPU s) | ratio wall (CPU) "
                     "| rerun stages wall s |")
        lines.append("|---:|---:|---:|---:|---|")
        for s in sizes:
            inc = result[s].get("incremental")
            if inc:
                per = ", ".join(f"{k} {v:.0f}" for k, v in inc["seconds"].items())
                lines.append(f"| {int(s):,} | {result[s]['total_seconds']:.0f} "
                             f"({result[s].get('total_cpu_seconds', nan):.0f}) | "
                             f"{inc['total_seconds']:.0f} ({inc.get('total_cpu_seconds', nan):.0f}) | "
                             f"{inc['ratio']:.2f} ({inc.get('cpu_ratio', nan):.2f}) | {per} |")
    # each size against the next smaller one (e.g. the 5M / 1M target), then largest / smallest
    pairs = list(zip(sizes[:-1], sizes[1:]))
    if len(sizes) > 2:
        pairs.append((sizes[0], sizes[-1]))
    if pairs:
        lines.append("")
    for a, b in pairs:
        ra, rb = result[a], result[b]
        lines.append(f"time({int(b):,}) / time({int(a):,}) = "
                     f"{rb['total_seconds'] / ra['total_seconds']:.2f} wall, "
                     f"{rb.get('total_cpu_seconds', nan) / ra.get('total_cpu_seconds', nan):.2f} CPU "
                     f"for {int(b) / int(a):.1f}x the interactions")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> tuple[str, str]:
    """Log-log PNG of wall seconds against interactions (total, per stage, incremental)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted((k for k in result if k.isdigit()), key=int)
    x = np.array([result[s].get("n_interactions", int(s)) for s in sizes], float)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.loglog(x, [result[s]["total_seconds"] for s in sizes], "o-", lw=2.5, label="total")
    stages = sorted({st for s in sizes for st in result[s]["seconds"]})
    for st in stages:
        y = [result[s]["seconds"].get(st, np.nan) for s in sizes]
        ax.loglog(x, y, ".--", lw=1, label=st)
    if len(x) >= 1:  # linear reference through the first total
        ref = result[sizes[0]]["total_seconds"] * x / x[0]
        ax.loglog(x, ref, ":", color="grey", label="linear (slope 1)")
    inc = [(result[s]["incremental"]["n_base"] + result[s]["incremental"]["n_increment"],
            result[s]["incremental"]["total_seconds"]) for s in sizes if "incremental" in result[s]]
    if inc:
        ax.loglog(*zip(*inc), "s", color="black", label="+5% incremental rerun")
    ax.set_xlabel("interactions")
    ax.set_ylabel("wall seconds")
    ax.set_title("mmrec stage graph on 2 CPU cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    scales = (ax.get_xscale(), ax.get_yscale())
    plt.close(fig)
    return scales


def machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["mem_total_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.bench_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[1_000_000, 5_000_000])
    ap.add_argument("--workdir", default="bench_runs/scale")
    ap.add_argument("--out", default="reports/bench-scale.json")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--no-incremental", dest="incremental", action="store_false")
    ap.add_argument("--incremental-sizes", nargs="*", type=int, default=None,
                    help="sizes that also get the +5%% incremental rerun (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the datasets and work directories")
    ap.add_argument("--reuse-data", action="store_true",
                    help="use WORKDIR/data-SIZE when it is a dataset of the same catalogue")
    args = ap.parse_args(argv)
    out = Path(args.out)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    load_start = [round(v, 2) for v in os.getloadavg()]
    with open(workdir / "bench-scale.log", "a", encoding="utf-8") as log:
        for size in args.sizes:
            t0 = time.perf_counter()
            inc = args.incremental and (args.incremental_sizes is None
                                        or size in args.incremental_sizes)
            result[str(size)] = run_size(size, workdir, Path(args.params), inc, log,
                                         reuse_data=args.reuse_data)
            result[str(size)]["wall_seconds"] = round(time.perf_counter() - t0, 1)
            result[str(size)]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
            result["machine"] = {**machine(), "loadavg_at_start": load_start}
            write_json(out, result)  # after every size: a later failure keeps the earlier ones
            plot(result, out.with_suffix(".png"))
            if not args.keep:
                for name in (f"data-{size}", f"data-{size}-base", f"run-{size}", f"inc-{size}"):
                    shutil.rmtree(workdir / name, ignore_errors=True)
    print(table(result))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
