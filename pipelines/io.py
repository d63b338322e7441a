"""Atomic, idempotent artifact I/O and params loading.

Every stage writes its outputs through these helpers: the new content is
written to a temporary sibling path and renamed into place only once it is
complete, so a failed or killed stage leaves the last good artifact intact and
no half-written file is ever visible at an output path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

PARAMS_FILE = "params.yaml"


def load_params(section: str, params_file: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """Return one section of params.yaml (a stage reads only its own section)."""
    path = Path(params_file)
    with path.open(encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    if section not in params:
        raise KeyError(f"{path}: no section '{section}'")
    value = params[section]
    return dict(value) if isinstance(value, dict) else {"value": value}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it into place on success.

    On an exception the temporary path is removed and ``target`` is untouched.
    For directories the old directory is swapped out and deleted only after the
    new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp = tmp_root / target.name
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir:
            for root, _dirs, files in os.walk(tmp):
                for name in files:
                    with open(os.path.join(root, name), "rb+") as fh:
                        os.fsync(fh.fileno())
        elif tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            raise FileNotFoundError(f"atomic write of {target}: nothing was written")
        if is_dir and target.exists():
            old = tmp_root / (target.name + ".old")
            os.replace(target, old)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n",
                       encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_parquet(path: str | os.PathLike, df) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
