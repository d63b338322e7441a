"""pipelines.io: atomic writes under a concurrent reader and after a killed writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipelines import io as pio
from pipelines.io import atomic_path, exchange, replace_dir
from tests.fixtures import ROOT

READER = textwrap.dedent("""
    import json, os, sys, time
    target, stop = sys.argv[1], sys.argv[2]
    checks = missing = torn = 0
    while not os.path.exists(stop):
        checks += 1
        try:  # read one version through its directory handle, as a careful reader does
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            missing += 1
            continue
        try:
            ino = os.fstat(fd).st_ino
            names = sorted(os.listdir(fd))
            vals = [json.load(open(n, opener=lambda p, f: os.open(p, f, dir_fd=fd))) for n in names]
        except FileNotFoundError:
            continue  # an old version, deleted after it was replaced: read the current one
        finally:
            os.close(fd)
        try:
            if os.stat(target).st_ino != ino:
                continue  # replaced while it was read: read the current one
        except FileNotFoundError:
            missing += 1
            continue
        if names != ["a.json", "b.json"] or vals[0] != vals[1]:
            torn += 1  # the current directory holds part of a version, or two versions
    print(json.dumps({"checks": checks, "missing": missing, "torn": torn}))
    """)


def _write_version(target, n):
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.json").write_text(json.dumps(n))
        (tmp / "b.json").write_text(json.dumps(n))


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("A")
    (b / "x").write_text("B")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not supported here (fallback covered below)")
    assert (a / "x").read_text() == "B" and (b / "x").read_text() == "A"


def test_a_reader_never_sees_a_directory_output_missing_or_mixed(tmp_path):
    """300 replacements of a directory while another process reads it in a tight loop."""
    if not exchange(tmp_path, tmp_path):  # same path twice: a no-op that probes support
        pytest.skip("renameat2(RENAME_EXCHANGE) not supported on this filesystem")
    target, stop = tmp_path / "out", tmp_path / "stop"
    _write_version(target, 0)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    for n in range(1, 301):
        _write_version(target, n)
    stop.write_text("")
    seen = json.loads(reader.communicate(timeout=60)[0])
    assert seen["checks"] > 300, seen
    assert seen["missing"] == 0 and seen["torn"] == 0, seen
    assert json.loads((target / "a.json").read_text()) == 300
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_fallback_without_exchange_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(pio, "exchange", lambda a, b: False)
    target = tmp_path / "out"
    _write_version(target, 1)
    _write_version(target, 2)
    assert json.loads((target / "b.json").read_text()) == 2
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("x")
    replace_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["f"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


WRITER = textwrap.dedent("""
    import sys, time
    from pipelines.io import atomic_path
    with atomic_path(sys.argv[1], is_dir=True) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
    """)


def test_killed_writer_leaves_the_old_version_and_its_temp_is_cleaned_next_time(tmp_path):
    target = tmp_path / "out"
    _write_version(target, 1)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "writing"
    temps = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(temps) == 1 and f"-{proc.pid}-" in temps[0].name
    # a live writer's temp dir is not touched by another writer of the same target
    assert pio.remove_stale_temps(target) == [] and temps[0].exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((target / "a.json").read_text()) == 1  # the previous version, complete
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "b.json"]
    _write_version(target, 2)  # the next write removes what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((target / "a.json").read_text()) == 2


def test_publish_store_sweeps_temps_of_killed_writers(tmp_path):
    """A writer killed after its rename, before its clean-up, leaves a temp dir that no later
    write of the same key removes (a complete version is never rewritten): the store's first
    write sweeps them (this host, dead pid only)."""
    from pipelines.publish_s3 import LocalStore

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    root = tmp_path / "store"
    (root / "versions" / "v1").mkdir(parents=True)
    (root / "versions" / "v1" / "manifest.json").write_text("{}")
    stale = root / "versions" / "v1" / f".manifest.json.tmp-{pio._HOST}-{dead.pid}-abc"
    other_host = root / "versions" / "v1" / f".manifest.json.tmp-elsewhere-{dead.pid}-abc"
    running = root / "versions" / "v1" / f".manifest.json.tmp-{pio._HOST}-{live}-abc"
    for d in (stale, other_host, running):
        d.mkdir()
        (d / "manifest.json").write_text("{")
    store = LocalStore(root)
    assert store.list() == ["versions/v1/manifest.json"]  # temp paths are not keys
    store.put_json("latest.json", {"version": "v1"})
    assert not stale.exists() and other_host.exists() and running.exists()
