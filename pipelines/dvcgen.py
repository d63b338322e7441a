"""Generate ``dvc.yaml`` from the stage graph (``python -m pipelines dvc-yaml``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from . import graph

HEADER = ("# GENERATED from pipelines/graph.py by `python -m pipelines dvc-yaml`.\n"
          "# Do not edit by hand: tests/pipelines/test_graph.py fails when this file and the\n"
          "# stage graph disagree.\n")


def _param_keys(section: str, params: dict) -> list[str]:
    value = params.get(section)
    if not isinstance(value, dict):
        return [section]
    return [f"{section}.{k}" for k in value]


def build(params: dict) -> dict:
    stages = {}
    for s in graph.STAGES:
        entry: dict = {"cmd": s.command()}
        entry["deps"] = list(s.deps) + s.code_deps
        entry["params"] = _param_keys(s.name, params) + list(s.extra_params)
        # persist: DVC must not delete the last good output before the stage
        # runs; stages replace outputs atomically (pipelines.io.atomic_path).
        metric_set = set(s.metrics)
        entry["outs"] = [{o: {"persist": True}} for o in s.outs]
        if s.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in s.metrics
                                if not any(graph._inside(m, o) for o in s.outs)]
            if not entry["metrics"]:
                del entry["metrics"]
        if s.plots:
            plot_list = []
            for p in s.plots:
                path = p if isinstance(p, str) else next(iter(p))
                if any(graph._inside(path, o) for o in s.outs):
                    continue
                plot_list.append(p)
            if plot_list:
                entry["plots"] = plot_list
        del metric_set
        stages[s.name] = entry
    top_metrics = [m for s in graph.STAGES for m in s.metrics]
    top_plots = []
    for s in graph.STAGES:
        for p in s.plots:
            top_plots.append(p)
    return {"stages": stages, "metrics": top_metrics, "plots": top_plots}


def render(params: dict) -> str:
    return HEADER + yaml.safe_dump(build(params), sort_keys=False, width=100)


def write(root: str | Path = ".") -> Path:
    root = Path(root)
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    out = root / "dvc.yaml"
    out.write_text(render(params), encoding="utf-8")
    return out
