"""Benchmark runner: the whole stage graph on a dataset under named protocols.

``python -m pipelines.bench --data DIR [--protocols stratified coldstart] [--out reports/bench.json]``

Each protocol runs every stage of the graph (same commands as ``dvc.yaml``)
in its own work directory under ``--workdir`` with ``params.yaml`` plus the
protocol's overrides, timing each stage (wall seconds) and recording its peak
RSS.  Writes ``{protocol: {model: {slice: {metric: value}}}, "seconds":
{stage: wall seconds, summed over the protocols}, "seconds_by_protocol":
{protocol: {stage: s}}, "peak_rss_mb": {protocol: {stage: MiB}}}`` and prints
a table.

``--fuse-seeds 1 2`` also runs ``fuse`` + ``evaluate`` again at those ``fuse.seed`` values on
each protocol's own upstream artifacts (outputs beside the main ones: ``artifacts/fuse_seed1``,
``reports/evaluate_seed1``) and adds ``"fuse_seeds": {protocol: {"seeds": [...], "hybrid":
{slice: {metric: {"values", "mean", "min", "max"}}}, "seconds": [...]}}``: how far the
hybrid's figures move with the ranker's seed alone (the seed also draws the training worlds'
simulated cold items and users and the cross-fitting folds).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import graph
from .io import write_json

ROOT = Path(__file__).resolve().parents[1]

PROTOCOLS: dict[str, dict] = {
    # Microsoft Recommenders' MovieLens protocol: per-user random 75/25, seed 42, K=10
    "stratified": {"split": {"protocol": "stratified", "ratio": 0.75, "seed": 42,
                             "cold_item_fraction": 0.0, "cold_user_fraction": 0.0}},
    # 10% of items never in training; users with <= 5 training interactions = cold users
    "coldstart": {"split": {"protocol": "stratified", "ratio": 0.75, "seed": 42,
                            "cold_item_fraction": 0.1, "cold_user_fraction": 0.1,
                            "cold_user_max": 5}},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


LAST_CPU_SECONDS: list[float] = [0.0]  # user + system CPU seconds of the last run_stage


def run_stage(cmd: str, cwd: Path, log) -> tuple[float, float, int]:
    """Run one stage command; return (wall seconds, peak RSS MiB of the process tree root, rc).

    The process's user + system CPU seconds (all its threads) land in ``LAST_CPU_SECONDS[0]``:
    on a shared machine they vary less with the load than the wall time.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(shlex.split(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    LAST_CPU_SECONDS[0] = usage.ru_utime + usage.ru_stime
    return time.perf_counter() - t0, usage.ru_maxrss / 1024.0, proc.returncode


def run_protocol(data: Path, name: str, overrides: dict, workdir: Path,
                 params_file: Path = ROOT / "params.yaml", stages: list[str] | None = None) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    params = _merge(params, overrides)
    params["data"]["path"] = str(data.resolve())
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    seconds, rss, cpu = {}, {}, {}
    order = stages or [s for s in graph.topological() if s != "publish"]
    with open(workdir / "bench.log", "w", encoding="utf-8") as log:
        for stage_name in order:
            st = graph.by_name()[stage_name]
            cmd = st.command().replace(graph.DATA, shlex.quote(str(data.resolve())))
            print(f"[{name}] {stage_name} ...", file=sys.stderr, flush=True)
            log.write(f"$ {cmd}\n")
            log.flush()
            sec, mb, rc = run_stage(cmd, workdir, log)
            if rc != 0:
                raise RuntimeError(f"[{name}] stage {stage_name} failed (exit {rc}); see {workdir}/bench.log")
            seconds[stage_name] = round(sec, 2)
            rss[stage_name] = round(mb, 1)
            cpu[stage_name] = round(LAST_CPU_SECONDS[0], 2)
    metrics = json.loads((workdir / "reports/evaluate/metrics.json").read_text(encoding="utf-8"))
    return {"metrics": metrics, "seconds": seconds, "peak_rss_mb": rss, "cpu_seconds": cpu}


def fuse_seed_runs(workdir: Path, seeds: list[int], name: str = "") -> dict:
    """``fuse`` + ``evaluate`` at each other ``fuse.seed`` on a finished protocol's artifacts.

    Each seed gets its own params file (the protocol's with ``fuse.seed`` replaced) and output
    directories, emptied first so that the fuse's warm start never reuses a ranker: every run
    is cold.  Returns the :data:`fuse_seeds <META_KEYS>` entry of one protocol, the protocol's
    own seed first (its figures from ``reports/evaluate``)."""
    params = yaml.safe_load((workdir / "params.yaml").read_text(encoding="utf-8"))
    from .fusion import DEFAULTS as FUSE_DEFAULTS

    base = int((params.get("fuse") or {}).get("seed", FUSE_DEFAULTS["seed"]))
    main_metrics = json.loads((workdir / "reports/evaluate/metrics.json").read_text(encoding="utf-8"))
    runs = {base: (main_metrics["hybrid"], None)}
    fuse_st, eval_st = graph.by_name()["fuse"], graph.by_name()["evaluate"]
    with open(workdir / "bench.log", "a", encoding="utf-8") as log:
        for seed in seeds:
            if int(seed) in runs:
                continue
            tag = f"seed{int(seed)}"
            pfile = f"params_fuse_{tag}.yaml"
            (workdir / pfile).write_text(
                yaml.safe_dump(_merge(params, {"fuse": {"seed": int(seed)}}), sort_keys=False),
                encoding="utf-8")
            fuse_args = {**fuse_st.args, "out": f"artifacts/fuse_{tag}", "report": f"reports/fuse_{tag}"}
            recs = f"hybrid=artifacts/fuse_{tag}/recommendations.parquet"
            eval_args = {**eval_st.args, "recs": [recs], "out": f"reports/evaluate_{tag}"}
            for d in (fuse_args["out"], fuse_args["report"], eval_args["out"]):
                shutil.rmtree(workdir / d, ignore_errors=True)
            secs = 0.0
            for st, args in ((fuse_st, fuse_args), (eval_st, eval_args)):
                cmd = st.command(args, params=pfile)
                print(f"[{name}] {st.name} (fuse.seed {seed}) ...", file=sys.stderr, flush=True)
                log.write(f"$ {cmd}\n")
                log.flush()
                sec, _, rc = run_stage(cmd, workdir, log)
                if rc != 0:
                    raise RuntimeError(f"[{name}] {st.name} at fuse.seed {seed} failed (exit {rc}); "
                                       f"see {workdir}/bench.log")
                secs += sec
            m = json.loads((workdir / eval_args["out"] / "metrics.json").read_text(encoding="utf-8"))
            runs[int(seed)] = (m["hybrid"], round(secs, 2))
    return summarise_seeds(runs)


def summarise_seeds(runs: dict[int, tuple[dict, float | None]]) -> dict:
    """``{seed: (hybrid {slice: {metric: value}}, seconds)}`` -> values per slice and metric
    in seed order, with their mean, min and max (``n_users`` and NaN-valued slices left out)."""
    seeds = list(runs)
    out: dict = {"seeds": seeds, "hybrid": {}, "seconds": [runs[s][1] for s in seeds]}
    first = runs[seeds[0]][0]
    for sl, metrics in first.items():
        for metric in metrics:
            if metric == "n_users":
                continue
            vals = [float(runs[s][0].get(sl, {}).get(metric, float("nan"))) for s in seeds]
            if any(v != v for v in vals):  # NaN: an empty slice
                continue
            out["hybrid"].setdefault(sl, {})[metric] = {
                "values": vals, "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
    return out


def seed_lines(spread: dict, metrics=("ndcg@10", "recall@10")) -> list[str]:
    """The printed summary of :func:`fuse_seed_runs` for each protocol."""
    lines = []
    for proto, s in spread.items():
        lines.append(f"\n### {proto}: hybrid over fuse seeds {' / '.join(map(str, s['seeds']))}\n")
        lines.append("| slice | metric | values | mean | max - min |")
        lines.append("|---|---|---|---:|---:|")
        for sl, ms in s["hybrid"].items():
            for m in metrics:
                if m in ms:
                    v = ms[m]
                    lines.append(f"| {sl} | {m} | {' / '.join(f'{x:.4f}' for x in v['values'])} | "
                                 f"{v['mean']:.4f} | {v['max'] - v['min']:.4f} |")
    return lines


META_KEYS = ("seconds", "seconds_by_protocol", "peak_rss_mb", "machine", "fuse_seeds")


def table(result: dict, metrics=("ndcg@10", "precision@10", "recall@10", "map@10")) -> str:
    lines = []
    for proto, models in result.items():
        if proto in META_KEYS:
            continue
        slices = ["all", "cold_users", "cold_items"]
        lines.append(f"\n### {proto}\n")
        lines.append("| model | slice | users | " + " | ".join(metrics) + " |")
        lines.append("|---|---|---:|" + "---:|" * len(metrics))
        for sl in slices:
            for model in sorted(models, key=lambda m: -models[m].get(sl, {}).get("ndcg@10", -1)):
                r = models[model].get(sl, {})
                if not r.get("n_users"):
                    continue
                lines.append(f"| {model} | {sl} | {int(r['n_users'])} | " +
                             " | ".join(f"{r.get(m, float('nan')):.4f}" for m in metrics) + " |")
    by_proto = result["seconds_by_protocol"]
    lines.append("\n| stage | " + " | ".join(f"{p} s" for p in by_proto) + " | total s | peak RSS MiB |")
    lines.append("|---|" + "---:|" * (len(by_proto) + 2))
    order = {name: i for i, name in enumerate(graph.topological())}
    for st, total in sorted(result["seconds"].items(), key=lambda kv: order.get(kv[0], len(order))):
        rss = max(r.get(st, 0.0) for r in result["peak_rss_mb"].values())
        lines.append(f"| {st} | " + " | ".join(str(by_proto[p].get(st, "")) for p in by_proto)
                     + f" | {total:.1f} | {rss:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--protocols", nargs="*", default=list(PROTOCOLS))
    ap.add_argument("--workdir", default="bench_runs")
    ap.add_argument("--out", default="reports/bench.json")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--reuse-workdir", action="store_true",
                    help="keep WORKDIR/PROTOCOL from an earlier run (its persisted outputs, the "
                         "feature caches and warm-start models, then serve this one: not a cold "
                         "benchmark)")
    ap.add_argument("--fuse-seeds", nargs="*", type=int, default=[],
                    help="also run fuse + evaluate at these fuse.seed values on each protocol's "
                         "artifacts and report the hybrid's spread (\"fuse_seeds\")")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"ERROR: dataset directory {data} does not exist", file=sys.stderr)
        return 2
    result: dict = {"seconds": {}, "seconds_by_protocol": {}, "peak_rss_mb": {}}
    for name in args.protocols:
        if name not in PROTOCOLS:
            print(f"ERROR: unknown protocol '{name}' ({sorted(PROTOCOLS)})", file=sys.stderr)
            return 2
        wd = Path(args.workdir) / name
        if not args.reuse_workdir:  # a cold run: nothing persisted by an earlier run serves it
            shutil.rmtree(wd, ignore_errors=True)
        r = run_protocol(data, name, PROTOCOLS[name], wd, Path(args.params))
        result[name] = r["metrics"]
        result["seconds_by_protocol"][name] = r["seconds"]
        for st, sec in r["seconds"].items():
            result["seconds"][st] = round(result["seconds"].get(st, 0.0) + sec, 2)
        result["peak_rss_mb"][name] = r["peak_rss_mb"]
        if args.fuse_seeds:
            result.setdefault("fuse_seeds", {})[name] = fuse_seed_runs(wd, args.fuse_seeds, name)
    import platform

    result["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version()}
    write_json(args.out, result)
    print(table(result))
    if result.get("fuse_seeds"):
        print("\n".join(seed_lines(result["fuse_seeds"])))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
