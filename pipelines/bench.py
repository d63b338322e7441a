"""Benchmark runner: the whole stage graph on a dataset under named protocols.

``python -m pipelines.bench --data DIR [--protocols stratified coldstart] [--out reports/bench.json]``

Each protocol runs every stage of the graph (same commands as ``dvc.yaml``)
in its own work directory under ``--workdir`` with ``params.yaml`` plus the
protocol's overrides, timing each stage (wall seconds) and recording its peak
RSS.  Writes ``{protocol: {model: {slice: {metric: value}}}, "seconds":
{stage: wall seconds, summed over the protocols}, "seconds_by_protocol":
{protocol: {stage: s}}, "peak_rss_mb": {protocol: {stage: MiB}}}`` and prints
a table.
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


META_KEYS = ("seconds", "seconds_by_protocol", "peak_rss_mb", "machine")


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
    import platform

    result["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version()}
    write_json(args.out, result)
    print(table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
