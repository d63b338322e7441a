"""Nothing the product loads from disk or S3 goes through pickle (static check of the source).

Scans every module of ``pipelines/``, ``tasks/``, ``dags/`` and ``bench/`` with
:mod:`ast` and fails on: importing pickle-based serialisers (pickle, cPickle,
dill, cloudpickle, joblib, shelve, marshal), ``read_pickle`` / ``to_pickle``,
``np.load(..., allow_pickle=True)``, ``torch.load`` without
``weights_only=True``, and unsafe YAML loading (``yaml.load`` without
``SafeLoader``, ``yaml.unsafe_load``, ``full_load``).  The runtime side is
tested by the tampering contract in ``tests/recommender_mixin.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.fixtures import ROOT

PACKAGES = ("pipelines", "tasks", "dags", "bench")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
BANNED_ATTRS = {"read_pickle", "to_pickle", "unsafe_load", "full_load", "unsafe_load_all", "full_load_all"}


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20, files  # the scan really sees the code base
    return files


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def problems_in(source: str, name: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            out.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_ATTRS:
            out.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            attr = node.func.attr
            if attr == "load" and owner == "torch":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append(f"{where}: torch.load without weights_only=True")
            elif attr == "load" and owner in ("np", "numpy"):
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    out.append(f"{where}: np.load with allow_pickle")
            elif attr in ("load", "load_all") and owner == "yaml":
                loader = _kw(node, "Loader")
                if loader is None or "Safe" not in ast.unparse(loader):
                    out.append(f"{where}: yaml.{attr} without SafeLoader")
    return out


def test_product_code_never_unpickles():
    found = [p for f in _sources() for p in problems_in(f.read_text(encoding="utf-8"),
                                                         str(f.relative_to(ROOT)))]
    assert not found, found


@pytest.mark.parametrize("snippet", [
    "import pickle", "from joblib import load", "import dill as d", "df = pd.read_pickle(p)",
    "w = torch.load(f)", "w = torch.load(f, weights_only=False)", "a = np.load(f, allow_pickle=True)",
    "c = yaml.load(text)", "c = yaml.load(text, Loader=yaml.Loader)", "c = yaml.unsafe_load(text)",
])
def test_the_scan_catches_each_unsafe_pattern(snippet):
    assert problems_in(snippet, "x.py"), snippet


@pytest.mark.parametrize("snippet", [
    "w = torch.load(f, map_location='cpu', weights_only=True)", "a = np.load(f, allow_pickle=False)",
    "a = np.load(f)", "c = yaml.safe_load(text)", "c = yaml.load(text, Loader=yaml.SafeLoader)",
    "from safetensors.numpy import load_file",
])
def test_the_scan_accepts_safe_loading(snippet):
    assert not problems_in(snippet, "x.py"), snippet
