"""Run ONE pipeline stage, safely alongside other stages running in parallel.

``python -m pipelines run-stage STAGE [--repo DIR] [--force]``

Why not ``dvc repro -s STAGE`` per task?  DVC 3.67 releases its repository
lock (``.dvc/tmp/lock``) while a stage's command runs, but holds it while it
collects the pipeline, checks status and commits, and a second DVC process
gives up after ~3 s (6 tries x 0.5 s) with "Unable to acquire lock".  Two
parallel ``dvc repro -s`` of small independent stages usually both succeed,
yet any DVC call holding the lock longer than 3 s (hashing a big dataset,
caching large outputs) makes the other task fail.  The Airflow DAG runs
independent stages at the same time, so each task runs its stage through
this runner instead:

1. under a short inter-process lock (``fcntl.flock`` on
   ``.dvc/tmp/mmrec-runner.lock``) ask DVC whether the stage is up to date
   (``Repo.status([stage])``, only this stage) and skip it if so;
2. run the stage's command (``Stage.command()`` from :mod:`pipelines.graph`,
   ``${data.path}``-style templates filled from ``params.yaml``) holding NO
   lock: stages write their outputs atomically, so parallel stages never see
   each other's half-written files;
3. under the lock, ``dvc commit --force STAGE``: record the stage in
   ``dvc.lock`` and store its outputs in the DVC cache.

Every DVC call of every runner happens under the same lock, so they never
fight over DVC's own lock or over ``dvc.lock``.  The stage's exit code is
returned; a failed stage is not committed, so ``dvc.lock`` and the previous
outputs are left as they were.  Waiting for the lock times out
(``--lock-timeout``, env ``MMREC_LOCK_TIMEOUT``, default 600 s) with an
error naming the holder.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

LOCK_FILE = "mmrec-runner.lock"
DEFAULT_LOCK_TIMEOUT = 600.0
EXIT_LOCK_TIMEOUT = 75  # EX_TEMPFAIL: try again later
EXIT_USAGE = 2
_TEMPLATE = re.compile(r"\$\{\s*([A-Za-z0-9_.\-]+)\s*\}")


class LockTimeout(RuntimeError):
    """The runner lock could not be acquired in time."""


class RunnerError(RuntimeError):
    """A configuration problem (unknown stage, stale dvc.yaml, bad template)."""


def _say(stage: str, msg: str) -> None:
    print(f"[run-stage {stage}] {msg}", file=sys.stderr, flush=True)


def lock_path(repo: str | os.PathLike) -> Path:
    return Path(repo) / ".dvc" / "tmp" / LOCK_FILE


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float, purpose: str = "") -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if missing), waiting at most ``timeout`` s.

    The lock belongs to the open file, so a killed holder never leaves a stale
    lock behind.  The holder writes who it is into the file (for the timeout
    message).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
                    raise LockTimeout(
                        f"timed out after {timeout:g}s waiting for the lock {path} "
                        f"(held by: {holder}); raise the timeout (--lock-timeout / "
                        f"MMREC_LOCK_TIMEOUT) or check for a hung process") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {purpose}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def repo_lock(repo: str | os.PathLike, timeout: float, purpose: str = ""):
    """The runner lock of a repository: every runner's DVC calls happen under it."""
    return file_lock(lock_path(repo), timeout, purpose)


# --------------------------------------------------------------------------- graph
def load_stages(graph_module: str = "pipelines.graph") -> dict[str, Any]:
    mod = importlib.import_module(graph_module)
    return {s.name: s for s in mod.STAGES}


def _lookup(params: dict, dotted: str) -> Any:
    cur: Any = params
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise RunnerError(f"template ${{{dotted}}}: no key '{dotted}' in params.yaml")
        cur = cur[part]
    if isinstance(cur, (dict, list)):
        raise RunnerError(f"template ${{{dotted}}}: params.yaml value is not a scalar")
    return cur


def substitute(text: str, params: dict) -> str:
    """Fill DVC-style ``${a.b}`` templates from the params dict."""
    return _TEMPLATE.sub(lambda m: str(_lookup(params, m.group(1))), text)


def stage_argv(stage, params: dict, python: str = sys.executable) -> list[str]:
    """The stage's command as an argv list, templates filled, ``python`` -> this interpreter."""
    argv = [substitute(tok, params) for tok in shlex.split(stage.command())]
    if argv and argv[0] in ("python", "python3"):
        argv[0] = python
    return argv


def check_dvc_yaml(repo: Path, stage) -> None:
    """dvc.yaml must hold the same (templated) command as the graph."""
    path = repo / "dvc.yaml"
    if not path.exists():
        raise RunnerError(f"{path} is missing: run `python -m pipelines dvc-yaml`")
    spec = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})
    if stage.name not in spec:
        raise RunnerError(f"stage '{stage.name}' is not in {path}: run `python -m pipelines dvc-yaml`")
    cmd = spec[stage.name].get("cmd")
    if " ".join(shlex.split(str(cmd))) != " ".join(shlex.split(stage.command())):
        raise RunnerError(f"{path}: command of stage '{stage.name}' differs from the stage graph "
                          f"(dvc.yaml is out of date: run `python -m pipelines dvc-yaml`)")


# --------------------------------------------------------------------------- DVC
def atomic_dvc_files() -> None:
    """Make DVC write its YAML/JSON files (``dvc.lock``, ``*.dvc``) atomically in this process.

    DVC 3.67 rewrites ``dvc.lock`` in place (``open(path, "w+")`` then a ruamel dump,
    ~0.2 s for this project's lock file): a SIGKILL during ``dvc commit`` -- a killed
    Airflow task -- left it cut at 8 KiB in 2 of 12 commit-phase kills (the procedure
    of ``tests/test_fault_injection.py``), and then every DVC call of the repository
    fails.  Here the same dump goes to a temp file next to it
    (fsynced, renamed into place), so a kill leaves the previous or the new file.
    Temp files of killed writers are removed by the next write.
    """
    from dvc.utils import serialize

    from .io import remove_stale_temps, temp_prefix

    common = serialize._common
    original = common._dump_data
    if getattr(original, "mmrec_atomic", False):
        return

    def _dump_data(path, data, dumper, fs=None, **dumper_args):
        if fs is not None and getattr(fs, "protocol", None) != "local":
            return original(path, data, dumper, fs=fs, **dumper_args)
        path = os.path.abspath(os.fspath(path))
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                dumper(data, fh, **dumper_args)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
            except FileNotFoundError:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    _dump_data.mmrec_atomic = True
    common._dump_data = _dump_data
    for mod in list(sys.modules.values()):  # the modules that imported it by name (_yaml, _json, ...)
        if getattr(mod, "__name__", "").startswith("dvc.utils.serialize.") and \
                getattr(mod, "_dump_data", None) is original:
            mod._dump_data = _dump_data


def open_dvc(repo: Path):
    """Open the DVC repo (imports + config + SCM: ~1.5 s) *before* taking the runner lock.

    Safe to reuse across locked calls: DVC resets its cached index whenever it
    takes its own lock, so each status/commit sees the current dvc.yaml/dvc.lock.
    DVC's file writes are made atomic first (:func:`atomic_dvc_files`).
    """
    from dvc.repo import Repo

    atomic_dvc_files()
    return Repo(str(repo))


def repair_rwlock(dvc_repo) -> bool:
    """Remove DVC's ``.dvc/tmp/rwlock`` when it does not parse (True if it did so).

    DVC rewrites that file in place (``open(path, "w")`` then ``json.dump``), so a process
    killed between the two leaves it empty, and every later DVC command of the repository then
    fails with "Unable to read RWLock-file" (seen once in ``tests/test_fault_injection.py``).
    The file only records the path locks of running DVC commands: a torn one is left by a dead
    writer.  The check runs under DVC's own guard of that file (``rwlock.lock``), so no live
    DVC process is between its read and its write; a missing file is what DVC reads as "no
    locks"."""
    from dvc.lock import make_lock
    from dvc.rwlock import RWLOCK_FILE, RWLOCK_LOCK

    tmp_dir = dvc_repo.tmp_dir
    path = os.path.join(tmp_dir, RWLOCK_FILE)
    if not os.path.exists(path):
        return False
    guard = make_lock(os.path.join(tmp_dir, RWLOCK_LOCK), tmp_dir=tmp_dir,
                      hardlink_lock=dvc_repo.config["core"].get("hardlink_lock", False))
    with guard:
        try:
            with open(path, encoding="utf-8") as fh:
                json.load(fh)
            return False
        except FileNotFoundError:
            return False
        except ValueError as exc:
            os.unlink(path)
            print(f"[run-stage] removed a torn DVC rwlock file ({exc}): its writer was killed "
                  f"mid-write", file=sys.stderr, flush=True)
            return True


def _with_dvc(dvc_repo, fn: Callable, timeout: float):
    """Call ``fn(dvc_repo)``; retry while someone outside the runner holds DVC's own lock."""
    from dvc.lock import LockError

    repair_rwlock(dvc_repo)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn(dvc_repo)
        except LockError as exc:
            if time.monotonic() >= deadline:
                raise LockTimeout(f"DVC's repository lock is held by another DVC process "
                                  f"(not a run-stage runner) for more than {timeout:g}s: {exc}") from exc
            time.sleep(0.5)


def _target(dvc_repo, name: str) -> str:
    # absolute "dvc.yaml:stage" address: DVC resolves bare targets against the cwd
    return f"{os.path.join(dvc_repo.root_dir, 'dvc.yaml')}:{name}"


def stage_status(dvc_repo, name: str, timeout: float) -> dict:
    """``dvc status STAGE`` (this stage only): {} when up to date."""
    return _with_dvc(dvc_repo, lambda r: r.status(targets=[_target(r, name)]), timeout)


def commit_stage(dvc_repo, name: str, timeout: float) -> None:
    """``dvc commit --force STAGE``: write the dvc.lock entry and cache the outputs."""
    _with_dvc(dvc_repo, lambda r: r.commit(_target(r, name), force=True), timeout)


# --------------------------------------------------------------------------- run
def _run_command(argv: list[str], cwd: Path, env: dict) -> int:
    """Run the stage; forward SIGTERM/SIGINT to it (Airflow kills tasks with SIGTERM)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env)
    previous = {}

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not in the main thread
            previous[sig] = signal.signal(sig, forward)
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


def run_stage(name: str, repo: str | os.PathLike = ".", *, force: bool = False,
              lock_timeout: float | None = None, graph_module: str = "pipelines.graph",
              python: str = sys.executable) -> int:
    """Run one stage (status check -> command -> commit). Returns the exit code."""
    repo = Path(repo).resolve()
    timeout = float(lock_timeout if lock_timeout is not None
                    else os.environ.get("MMREC_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT))
    if str(repo) not in sys.path:  # a graph module of the repository itself (--graph)
        sys.path.append(str(repo))
    stages = load_stages(graph_module)
    if name not in stages:
        raise RunnerError(f"unknown stage '{name}' (stages: {', '.join(stages)})")
    stage = stages[name]
    if not (repo / ".dvc").is_dir():
        raise RunnerError(f"{repo} is not a DVC repository (no .dvc/): run `dvc init`")
    check_dvc_yaml(repo, stage)
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8")) or {}
    argv = stage_argv(stage, params, python)

    t0 = time.monotonic()
    with contextlib.closing(open_dvc(repo)) as dvc_repo:
        if not force:
            with repo_lock(repo, timeout, f"status {name}"):
                status = stage_status(dvc_repo, name, timeout)
            if not status:
                _say(name, "up to date (dvc status clean): skipped")
                return 0
            changed = json.dumps(status.get(name, status), default=str)
            _say(name, "changed: " + (changed if len(changed) <= 400 else changed[:400] + " ..."))
        _say(name, "running: " + " ".join(shlex.quote(a) for a in argv))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        t1 = time.monotonic()
        rc = _run_command(argv, repo, env)
        if rc != 0:
            _say(name, f"FAILED with exit code {rc}: not committed (dvc.lock and previous outputs "
                       "left as they were)")
            return rc
        t2 = time.monotonic()
        with repo_lock(repo, timeout, f"commit {name}"):
            commit_stage(dvc_repo, name, timeout)
    _say(name, f"done: status {t1 - t0:.1f}s, ran {t2 - t1:.1f}s, committed {time.monotonic() - t2:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines run-stage", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage")
    ap.add_argument("--repo", default=".", help="repository root (default: current directory)")
    ap.add_argument("--force", action="store_true", help="run even when DVC says it is up to date")
    ap.add_argument("--lock-timeout", type=float, default=None,
                    help=f"seconds to wait for the lock (env MMREC_LOCK_TIMEOUT, default {DEFAULT_LOCK_TIMEOUT:g})")
    ap.add_argument("--graph", default=os.environ.get("MMREC_GRAPH", "pipelines.graph"),
                    help="module holding STAGES (default pipelines.graph; tests use a fake graph)")
    args = ap.parse_args(argv)
    try:
        return run_stage(args.stage, args.repo, force=args.force, lock_timeout=args.lock_timeout,
                         graph_module=args.graph)
    except LockTimeout as exc:
        _say(args.stage, f"ERROR: {exc}")
        return EXIT_LOCK_TIMEOUT
    except RunnerError as exc:
        _say(args.stage, f"ERROR: {exc}")
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
