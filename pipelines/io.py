"""Atomic, idempotent artifact I/O and params loading.

Every stage writes its outputs through these helpers: the new content is
written to a temporary sibling path and renamed into place only once it is
complete, so a failed or killed stage leaves the last good artifact intact and
no half-written file is ever visible at an output path.  A directory replaces
the previous one in a single ``renameat2(RENAME_EXCHANGE)`` on Linux, so the
output path never goes missing, not even for an instant.  Temp paths carry the
writer's host and pid: the next write of the same target removes the ones left
by a killed writer of this host.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import sys
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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the OS or filesystem cannot do it (the caller falls back
    to two renames).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 / musl without renameat2
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move directory ``new`` to ``target``; an existing ``target`` is deleted afterwards.

    With ``exchange`` a reader of ``target`` sees the old tree or the new one and
    nothing in between; the fallback leaves ``target`` missing between two renames.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if exchange(new, target):  # `new` now holds the old tree
        shutil.rmtree(new, ignore_errors=True)
        return
    old = new.with_name(new.name + ".old")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
_TMP = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temp_prefix(target: str | os.PathLike) -> str:
    """Name prefix of this process's temp paths for ``target`` (host + pid: see below)."""
    return f".{Path(target).name}.tmp-{_HOST}-{os.getpid()}-"


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Delete temp paths of ``target`` left by killed writers on this host; returns them."""
    target = Path(target)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for p in target.parent.iterdir():
            m = _TMP.match(p.name[len(target.name) + 1:] if p.name.startswith(f".{target.name}.") else "")
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


_ANY_TMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-")


def sweep_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Remove, anywhere under ``root``, temp paths of killed writers on this host.

    For trees whose files are written once and then only read (a publish store): a
    writer killed between its rename and the clean-up leaves a temp dir that no later
    write of the same target would remove.
    """
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            m = _ANY_TMP.match(name)
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
                p = Path(dirpath) / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    dirnames.remove(name)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it into place on success.

    On an exception the temporary path is removed and ``target`` is untouched.
    For directories the new tree is exchanged with the old one in one atomic
    step (see :func:`replace_dir`) and the old one deleted afterwards.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp_root = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
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
        if is_dir:
            replace_dir(tmp, target)
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
