"""The one stage graph: single source of truth for ``dvc.yaml`` and the DAGs.

A stage's name is its module (``tasks/<name>.py``) and its ``params.yaml``
section.  Its command takes every path from arguments.  Edges are derived
from paths: stage B depends on stage A when one of B's ``deps`` is (inside)
one of A's ``outs``.  ``dvc.yaml`` is generated from this module
(``python -m pipelines dvc-yaml``) and the Airflow DAG builds one task per
stage from it; tests prove all three agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

DATA = "${data.path}"  # DVC template: the dataset directory from params.yaml


@dataclass(frozen=True)
class Stage:
    name: str
    args: dict[str, str | list[str]]  # CLI flag -> path(s) (inputs and outputs)
    deps: tuple[str, ...]  # data inputs (paths)
    outs: tuple[str, ...]  # outputs (paths); persisted, written atomically
    code: tuple[str, ...] = ()  # shared modules under pipelines/ it imports
    task_code: tuple[str, ...] = ()  # helper modules under tasks/ it imports (besides _cli.py)
    extra_params: tuple[str, ...] = ()  # dotted keys of other sections (e.g. data.path)
    metrics: tuple[str, ...] = ()
    plots: tuple[str | dict, ...] = ()
    pool: str = "default_pool"  # Airflow pool (train_encoder -> gpu)
    heavy: bool = False

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    def command(self, args: dict[str, str | list[str]] | None = None,
                params: str = "params.yaml") -> str:
        """The stage's command line (``dvc.yaml``'s ``cmd``); ``args`` replaces the paths (e.g.
        another output directory), ``params`` the params file."""
        parts = ["python", "-m", self.module]
        for flag, value in (self.args if args is None else args).items():
            vals = value if isinstance(value, list) else [value]
            parts.append(f"--{flag}")
            parts.extend(vals)
        parts += ["--params", params]
        return " ".join(parts)

    @property
    def code_deps(self) -> list[str]:
        return ([f"tasks/{self.name}.py"] + [f"tasks/{t}" for t in self.task_code]
                + [f"pipelines/{c}" for c in self.code])


BASE_CODE = ("io.py", "schema.py", "data.py")
FEATURE_DIRS = ("artifacts/preprocess_text", "artifacts/preprocess_image", "artifacts/preprocess_video")
FEATURE_CODE = ("io.py", "schema.py", "features.py", "encoders.py")
FEATURE_TASK_CODE = ("_feature_stage.py",)

STAGES: list[Stage] = [
    Stage(
        name="validate",
        args={"data": DATA, "out": "artifacts/validate", "report": "reports/validate"},
        deps=(DATA,),
        outs=("artifacts/validate", "reports/validate"),
        code=BASE_CODE + ("expectations.py",),
        extra_params=("data.path",),
        metrics=("reports/validate/summary.json",),
    ),
    Stage(
        name="split",
        args={"data": "artifacts/validate", "out": "artifacts/split"},
        deps=("artifacts/validate",),
        outs=("artifacts/split",),
        code=BASE_CODE,
        metrics=("artifacts/split/summary.json",),
    ),
    Stage(
        name="preprocess_text",
        args={"data": "artifacts/validate", "out": "artifacts/preprocess_text"},
        deps=("artifacts/validate",),
        outs=("artifacts/preprocess_text",),
        code=FEATURE_CODE,
        task_code=FEATURE_TASK_CODE,
        heavy=True,
    ),
    Stage(
        name="preprocess_image",
        args={"data": "artifacts/validate", "media-root": DATA, "out": "artifacts/preprocess_image"},
        deps=("artifacts/validate", DATA),
        outs=("artifacts/preprocess_image",),
        code=FEATURE_CODE + ("media.py",),
        task_code=FEATURE_TASK_CODE,
        heavy=True,
    ),
    Stage(
        name="preprocess_video",
        args={"data": "artifacts/validate", "media-root": DATA, "out": "artifacts/preprocess_video"},
        deps=("artifacts/validate", DATA),
        outs=("artifacts/preprocess_video",),
        code=FEATURE_CODE + ("media.py",),
        task_code=FEATURE_TASK_CODE,
        heavy=True,
    ),
    Stage(
        name="fit_cf",
        args={"split": "artifacts/split", "out": "artifacts/fit_cf"},
        deps=("artifacts/split",),
        outs=("artifacts/fit_cf",),
        code=BASE_CODE + ("metrics.py", "recommenders"),
        heavy=True,
    ),
    Stage(
        name="train_encoder",
        args={"split": "artifacts/split", "text": "artifacts/preprocess_text", "image": "artifacts/preprocess_image",
              "video": "artifacts/preprocess_video",
              "out": "artifacts/train_encoder"},
        deps=("artifacts/split",) + FEATURE_DIRS,
        outs=("artifacts/train_encoder",),
        code=BASE_CODE + ("recommenders", "features.py"),
        metrics=("artifacts/train_encoder/metrics.json",),
        plots=("artifacts/train_encoder/dvclive/plots",),
        pool="gpu",
        heavy=True,
    ),
    Stage(
        name="build_profiles",
        args={"split": "artifacts/split", "text": "artifacts/preprocess_text", "image": "artifacts/preprocess_image",
              "video": "artifacts/preprocess_video",
              "encoder": "artifacts/train_encoder", "out": "artifacts/build_profiles"},
        deps=("artifacts/split", "artifacts/train_encoder") + FEATURE_DIRS,
        outs=("artifacts/build_profiles",),
        code=BASE_CODE + ("profiles.py", "features.py", "recommenders"),
    ),
    Stage(
        name="fuse",
        args={"split": "artifacts/split", "cf": "artifacts/fit_cf", "encoder": "artifacts/train_encoder",
              "profiles": "artifacts/build_profiles", "text": "artifacts/preprocess_text", "image": "artifacts/preprocess_image",
              "video": "artifacts/preprocess_video",
              "out": "artifacts/fuse", "report": "reports/fuse"},
        deps=("artifacts/split", "artifacts/fit_cf", "artifacts/train_encoder",
              "artifacts/build_profiles") + FEATURE_DIRS,
        outs=("artifacts/fuse", "reports/fuse"),
        code=BASE_CODE + ("fusion.py", "recommenders", "features.py"),
        heavy=True,
    ),
    Stage(
        name="evaluate",
        args={"split": "artifacts/split", "models": ["artifacts/fit_cf", "artifacts/train_encoder"],
              "recs": ["hybrid=artifacts/fuse/recommendations.parquet"], "out": "reports/evaluate"},
        deps=("artifacts/split", "artifacts/fit_cf", "artifacts/train_encoder", "artifacts/fuse"),
        outs=("reports/evaluate",),
        code=BASE_CODE + ("metrics.py", "recommenders"),
        metrics=("reports/evaluate/metrics.json",),
        plots=({"reports/evaluate/recall_curve.csv": {"x": "k", "y": "recall",
                                                        "template": "linear"}},),
    ),
    Stage(
        name="publish",
        args={"metrics": "reports/evaluate/metrics.json", "profiles": "artifacts/build_profiles",
              "recs": "artifacts/fuse", "out": "artifacts/publish"},
        deps=("reports/evaluate/metrics.json", "artifacts/build_profiles", "artifacts/fuse"),
        outs=("artifacts/publish",),
        code=("io.py", "schema.py", "publish_s3.py", "privacy.py"),
        metrics=("artifacts/publish/decision.json",),
    ),
]


def by_name() -> dict[str, Stage]:
    return {s.name: s for s in STAGES}


def _inside(path: str, out: str) -> bool:
    p, o = PurePosixPath(path), PurePosixPath(out)
    return p == o or o in p.parents


def edges(stages: list[Stage] | None = None) -> set[tuple[str, str]]:
    """(upstream, downstream) pairs derived from deps/outs."""
    stages = STAGES if stages is None else stages
    result = set()
    for down in stages:
        for up in stages:
            if up is down:
                continue
            if any(_inside(d, o) for d in down.deps for o in up.outs):
                result.add((up.name, down.name))
    return result


def topological(stages: list[Stage] | None = None) -> list[str]:
    stages = STAGES if stages is None else stages
    e = edges(stages)
    order, done = [], set()
    names = [s.name for s in stages]
    while len(order) < len(names):
        ready = [n for n in names if n not in done and all(u in done for u, d in e if d == n)]
        if not ready:
            raise ValueError("stage graph has a cycle")
        for n in ready:
            order.append(n)
            done.add(n)
    return order


def upstream_closure(name: str) -> set[str]:
    e = edges()
    todo, seen = [name], set()
    while todo:
        n = todo.pop()
        for u, d in e:
            if d == n and u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def downstream_closure(name: str) -> set[str]:
    e = edges()
    todo, seen = [name], set()
    while todo:
        n = todo.pop()
        for u, d in e:
            if u == n and d not in seen:
                seen.add(d)
                todo.append(d)
    return seen
