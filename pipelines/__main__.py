"""``python -m pipelines <command>``: the project's command line.

Commands: generate-demo, validate, profile, recommend, metrics, dvc-yaml, stages, run-stage.
"""

from __future__ import annotations

import argparse
import sys


def _dvc_yaml(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines dvc-yaml")
    ap.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is out of date")
    args = ap.parse_args(argv)
    from pathlib import Path

    import yaml

    from . import dvcgen

    text = dvcgen.render(yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")))
    if args.check:
        current = Path("dvc.yaml").read_text(encoding="utf-8") if Path("dvc.yaml").exists() else ""
        if current != text:
            print("dvc.yaml is out of date: run `python -m pipelines dvc-yaml`", file=sys.stderr)
            return 1
        return 0
    Path("dvc.yaml").write_text(text, encoding="utf-8")
    print("wrote dvc.yaml")
    return 0


def _stages(argv) -> int:
    from . import graph

    for name in graph.topological():
        ups = sorted(u for u, d in graph.edges() if d == name)
        print(f"{name:<18} <- {', '.join(ups) or '-'}")
    return 0


def _metrics(argv) -> int:
    """Compact table of reports/evaluate/metrics.json: one metric, every model x slice."""
    ap = argparse.ArgumentParser(prog="python -m pipelines metrics")
    ap.add_argument("path", nargs="?", default="reports/evaluate/metrics.json")
    ap.add_argument("--metric", default="ndcg@10")
    args = ap.parse_args(argv)
    import json
    import math
    from pathlib import Path

    path = Path(args.path)
    if not path.is_file():
        print(f"{path}: no such file (run `dvc repro` first)", file=sys.stderr)
        return 1
    metrics = json.loads(path.read_text(encoding="utf-8"))
    slices = ("all", "cold_users", "cold_items")

    def value(model: str, sl: str) -> float:
        v = metrics[model].get(sl, {}).get(args.metric)
        return float("nan") if v is None else float(v)

    print(f"{args.metric:<14}" + "".join(f"{s:>12}" for s in slices))
    for model in sorted(metrics, key=lambda m: -(value(m, "all") if not math.isnan(value(m, "all")) else -1)):
        print(f"{model:<14}" + "".join(f"{value(model, s):>12.4f}" for s in slices))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "generate-demo": ("pipelines.demo", "main"),
        "validate": ("tasks.validate", "cli"),
        "profile": ("pipelines.profiles", "profile_cli"),
        "recommend": ("pipelines.recs", "recommend_cli"),
        "run-stage": ("pipelines.runner", "main"),
    }
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "dvc-yaml":
        return _dvc_yaml(rest)
    if cmd == "stages":
        return _stages(rest)
    if cmd == "metrics":
        return _metrics(rest)
    if cmd not in commands:
        print(f"unknown command '{cmd}'. {__doc__}", file=sys.stderr)
        return 2
    import importlib

    module, fn = commands[cmd]
    return int(getattr(importlib.import_module(module), fn)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
