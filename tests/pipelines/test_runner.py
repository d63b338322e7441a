"""pipelines.runner: one stage per process, safe when independent stages run in parallel.

A temp git + DVC repo with a tiny fake stage graph (two independent stages that
sleep and write, one stage joining them) exercises the runner in real
subprocesses, as the Airflow tasks do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipelines import dvcgen, graph
from pipelines.graph import Stage
from pipelines.runner import (LockTimeout, RunnerError, repo_lock, stage_argv, substitute)
from tests.fixtures import ROOT

pytestmark = pytest.mark.integration

FAKE_GRAPH = '''
from pipelines.graph import Stage

STAGES = [
    Stage(name="make_a", args={"data": "${data.path}", "out": "out/a"},
          deps=("${data.path}",), outs=("out/a",), extra_params=("data.path",)),
    Stage(name="make_b", args={"data": "${data.path}", "out": "out/b"},
          deps=("${data.path}",), outs=("out/b",), extra_params=("data.path",)),
    Stage(name="join", args={"a": "out/a", "b": "out/b", "out": "out/join"},
          deps=("out/a", "out/b"), outs=("out/join",)),
]
'''

FAKE_TASK = '''
"""Fake stage: reads inputs, sleeps, records its run window, writes its output dir atomically."""
import argparse, json, sys, time
from pathlib import Path
from pipelines.io import atomic_path, load_params

ap = argparse.ArgumentParser()
ap.add_argument("--data"); ap.add_argument("--a"); ap.add_argument("--b")
ap.add_argument("--out", required=True); ap.add_argument("--params", default="params.yaml")
args = ap.parse_args()
name = Path(__file__).stem
p = load_params(name, args.params)
start = time.time()
if p.get("fail"):
    print(f"{name}: failing on purpose", file=sys.stderr)
    sys.exit(3)
time.sleep(float(p.get("sleep", 0)))
if args.data:
    text = Path(args.data, "ratings.csv").read_text()
else:
    text = "".join(Path(x, "v.txt").read_text() for x in (args.a, args.b))
with atomic_path(args.out, is_dir=True) as tmp:
    (tmp / "v.txt").write_text(f"{name}:{text}")
    (tmp / "window.json").write_text(json.dumps({"start": start, "end": time.time()}))
'''


def _env() -> dict:
    import os

    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)  # `pipelines` (runner, io); the temp repo's own `tasks` wins (cwd)
    e["PYTHONDONTWRITEBYTECODE"] = "1"
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    return e


def _run(cmd, cwd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, **kw)


def _runner_cmd(stage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines", "run-stage", stage, "--graph", "fakegraph", *extra]


def _set_params(repo: Path, **sections) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    for k, v in sections.items():
        p[k] = {**p.get(k, {}), **v}
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture()
def fake_repo(tmp_path, monkeypatch) -> Path:
    repo = tmp_path / "repo"
    (repo / "tasks").mkdir(parents=True)
    (repo / "tasks" / "__init__.py").write_text("")
    for name in ("make_a", "make_b", "join"):
        (repo / "tasks" / f"{name}.py").write_text(textwrap.dedent(FAKE_TASK))
    (repo / "fakegraph.py").write_text(FAKE_GRAPH)
    (repo / "data" / "ds").mkdir(parents=True)
    (repo / "data" / "ds" / "ratings.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\n")
    params = {"data": {"path": "data/ds"}, "make_a": {"sleep": 1.5, "fail": False},
              "make_b": {"sleep": 1.5, "fail": False}, "join": {"sleep": 0}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sys.path.insert(0, str(repo))
    try:
        import importlib

        fake = importlib.import_module("fakegraph")
        fake = importlib.reload(fake)
        monkeypatch.setattr(graph, "STAGES", fake.STAGES)
        (repo / "dvc.yaml").write_text(dvcgen.render(params))
    finally:
        sys.path.remove(str(repo))
        sys.modules.pop("fakegraph", None)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        res = _run(cmd, repo)
        assert res.returncode == 0, res.stderr
    return repo


def _lock_entry(repo: Path, stage: str):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return lock["stages"].get(stage)


@pytest.mark.slow
def test_parallel_stages_complete_commit_and_skip(fake_repo):
    repo = fake_repo
    t0 = time.monotonic()
    procs = [subprocess.Popen(_runner_cmd(s), cwd=repo, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in ("make_a", "make_b")]
    outs = [p.communicate(timeout=120) for p in procs]
    wall = time.monotonic() - t0
    for p, (_o, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Unable to acquire lock" not in err
    # the two stages really overlapped in time (neither waited for the other to finish)
    wa = json.loads((repo / "out/a/window.json").read_text())
    wb = json.loads((repo / "out/b/window.json").read_text())
    assert wa["start"] < wb["end"] and wb["start"] < wa["end"], (wa, wb)
    assert _lock_entry(repo, "make_a") and _lock_entry(repo, "make_b")
    print(f"parallel make_a+make_b via runner: {wall:.1f}s")

    res = _run(_runner_cmd("join"), repo)
    assert res.returncode == 0, res.stderr
    assert (repo / "out/join/v.txt").read_text().startswith("join:make_a:")
    status = _run([sys.executable, "-m", "dvc", "status"], repo)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout

    # second invocation: up to date -> skipped, outputs untouched
    before = (repo / "out/a/window.json").read_text()
    res = _run(_runner_cmd("make_a"), repo)
    assert res.returncode == 0 and "skipped" in res.stderr, res.stderr
    assert (repo / "out/a/window.json").read_text() == before

    # only the stage whose inputs changed recomputes (runner started from another directory)
    _set_params(repo, join={"sleep": 0.1})
    res_a = _run(_runner_cmd("make_a", "--repo", str(repo)), repo.parent)
    res_j = _run(_runner_cmd("join"), repo)
    assert "skipped" in res_a.stderr and "running" in res_j.stderr, (res_a.stderr, res_j.stderr)


def test_failed_stage_leaves_output_and_lock_unchanged(fake_repo):
    repo = fake_repo
    _set_params(repo, make_a={"sleep": 0})
    assert _run(_runner_cmd("make_a"), repo).returncode == 0
    window = (repo / "out/a/window.json").read_text()
    res = _run(_runner_cmd("make_a", "--force"), repo)  # --force runs an up-to-date stage
    assert res.returncode == 0 and "running" in res.stderr, res.stderr
    assert (repo / "out/a/window.json").read_text() != window
    out_before = (repo / "out/a/v.txt").read_text()
    entry_before = _lock_entry(repo, "make_a")
    (repo / "data/ds/ratings.csv").write_text("user_id,item_id,timestamp\nu2,i2,2\n")
    _set_params(repo, make_a={"fail": True})
    res = _run(_runner_cmd("make_a"), repo)
    assert res.returncode == 3, res.stderr
    assert "not committed" in res.stderr
    assert (repo / "out/a/v.txt").read_text() == out_before
    assert _lock_entry(repo, "make_a") == entry_before
    assert not (repo / "out" / "a.tmp").exists()


def test_a_torn_dvc_rwlock_file_left_by_a_killed_writer_is_repaired(fake_repo):
    """DVC rewrites .dvc/tmp/rwlock in place: a writer killed between truncate and write leaves
    it empty, and plain DVC then fails on every command; the runner removes it and goes on."""
    repo = fake_repo
    _set_params(repo, make_a={"sleep": 0})
    rw = repo / ".dvc" / "tmp" / "rwlock"
    rw.parent.mkdir(parents=True, exist_ok=True)
    rw.write_text("")  # what the killed writer left
    plain = _run([sys.executable, "-m", "dvc", "status"], repo)
    assert plain.returncode != 0 and "RWLock" in plain.stderr + plain.stdout
    rw.write_text("")
    res = _run(_runner_cmd("make_a"), repo)
    assert res.returncode == 0, res.stderr
    assert "removed a torn DVC rwlock file" in res.stderr
    assert _lock_entry(repo, "make_a") is not None
    json.loads(rw.read_text())  # DVC wrote it again, whole
    # a whole file is left to DVC
    res = _run(_runner_cmd("make_a"), repo)
    assert res.returncode == 0 and "removed a torn" not in res.stderr, res.stderr


def test_stale_dvc_yaml_and_unknown_stage_are_rejected(fake_repo):
    repo = fake_repo
    res = _run(_runner_cmd("nope"), repo)
    assert res.returncode == 2 and "unknown stage 'nope'" in res.stderr
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    spec["stages"]["make_a"]["cmd"] = "python -m tasks.make_a --other"
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    res = _run(_runner_cmd("make_a"), repo)
    assert res.returncode == 2 and "out of date" in res.stderr


def test_lock_wait_times_out_with_clear_error(tmp_path):
    (tmp_path / ".dvc").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pipelines.runner import repo_lock
        with repo_lock({str(tmp_path)!r}, 5, "commit somestage"):
            print("locked", flush=True)
            time.sleep(30)
        """)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=r"timed out after 0.5s .*commit somestage"):
            with repo_lock(tmp_path, 0.5, "status x"):
                pass
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    with repo_lock(tmp_path, 1, "after holder died"):  # a dead holder leaves no stale lock
        pass


def test_substitution_and_argv():
    st = Stage(name="s", args={"data": "${data.path}", "out": "o"}, deps=("${data.path}",), outs=("o",))
    argv = stage_argv(st, {"data": {"path": "data/x y"}}, python="/py")
    assert argv[:3] == ["/py", "-m", "tasks.s"]
    assert argv[argv.index("--data") + 1] == "data/x y"
    assert substitute("a ${ data.path } b", {"data": {"path": "p"}}) == "a p b"
    with pytest.raises(RunnerError, match="no key 'data.nope'"):
        substitute("${data.nope}", {"data": {"path": "p"}})


@pytest.mark.slow
def test_dvc_lock_held_elsewhere_breaks_plain_repro_but_runner_waits(fake_repo):
    """The trap the runner avoids.

    DVC 3.67 releases its repository lock while a stage's command runs, but
    takes it for status/commit and gives up after ~3 s (6 tries x 0.5 s) with
    "Unable to acquire lock".  Any DVC process holding the lock longer than
    that (hashing a big dataset, caching large outputs) makes a parallel
    `dvc repro -s` fail.  The runner serialises its DVC calls under its own
    flock and keeps retrying DVC's lock until its (long) timeout.
    """
    repo = fake_repo
    _set_params(repo, make_a={"sleep": 0}, make_b={"sleep": 0})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from dvc.repo import Repo
        r = Repo(".")
        r.lock.lock()
        print("locked", flush=True)
        time.sleep(7)
        r.lock.unlock()
        """)], cwd=repo, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-s", "make_a"], cwd=repo,
                                 env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runner = subprocess.Popen(_runner_cmd("make_b"), cwd=repo, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        _o, repro_err = repro.communicate(timeout=120)
        _o, runner_err = runner.communicate(timeout=120)
    finally:
        holder.wait(timeout=30)
    assert repro.returncode != 0 and "Unable to acquire lock" in repro_err, repro_err
    assert runner.returncode == 0, runner_err
    assert _lock_entry(repo, "make_b") and not (repo / "out/a").exists()
