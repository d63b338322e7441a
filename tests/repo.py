"""Build a throw-away copy of the project as a git + DVC repo, for DVC/Airflow tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fixtures import ROOT

COPY = ("pipelines", "tasks", "dags", "params.yaml", "dvc.yaml", ".dvcignore")

# Small, fast settings for tiny fixture data (merged into params.yaml of the copy).
TINY_PARAMS: dict = {
    "validate": {"min_ratings": 5},
    "train_encoder": {"epochs": 2, "d_model": 32, "n_layers": 1, "n_heads": 2, "batch_size": 32},
    "split": {"val_ratio": 0.3},
    "fuse": {"n_estimators": 20, "min_child_samples": 2},
}


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONDONTWRITEBYTECODE"] = "1"
    e["HF_HUB_OFFLINE"] = "1"
    e["PYTHONPATH"] = ""
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_repo(dest: Path, data_dir: Path, params: dict | None = None) -> Path:
    """Copy the project into ``dest`` (git init + dvc init), dataset path -> ``data_dir``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    p = yaml.safe_load((dest / "params.yaml").read_text())
    tiny = {k: v for k, v in TINY_PARAMS.items() if k in p}
    p = _merge(_merge(p, tiny), params or {})
    p["data"]["path"] = os.path.relpath(data_dir, dest) if data_dir.is_relative_to(dest) else str(data_dir)
    (dest / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "t@example.com"], dest)
    run(["git", "config", "user.name", "t"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    # a first commit, as in a real clone (dvclive and DVC experiments need a non-empty git repo)
    # project files only: the dataset is versioned by DVC (`dvc add`), never by git
    run(["git", "add", "--", *[n for n in COPY + (".dvc",) if (dest / n).exists()]], dest)
    run(["git", "commit", "-q", "-m", "initial"], dest)
    return dest


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)
