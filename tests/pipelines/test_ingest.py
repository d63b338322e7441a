"""pipelines.ingest: landing-zone batches -> validated, idempotent, atomic merges."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.ingest import (BATCHES_FILE, LocalLanding, S3Landing, batch_hash, ingest,
                              merge_frames, read_batches)
from tests.fixtures import ROOT, write_blocks_dataset


@dataclass
class StubResult:
    passed: bool
    findings: list = field(default_factory=list)


def stub_validator(path, params):
    """Fast stand-in for tasks.validate.validate: ratings must lie in [1, 5]."""
    r = pd.read_csv(Path(path) / "ratings.csv")
    bad = r.index[(r["rating"] < 1) | (r["rating"] > 5)].tolist()
    findings = [f"{path}/ratings.csv, column 'rating', rule 'between': rows {bad}"] if bad else []
    return StubResult(not bad, findings)


def slow_stub_validator(path, params):
    import time

    time.sleep(0.5)  # widens the window in which concurrent ingests could interleave
    return stub_validator(path, params)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def make_batch(landing: Path, name: str, rows: list[tuple], items: list[str] | None = None,
               image: bool = False) -> Path:
    b = landing / name
    b.mkdir(parents=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"]).to_csv(
        b / "ratings.csv", index=False)
    if items:
        df = pd.DataFrame({"item_id": items, "title": [f"New {i}" for i in items]})
        if image:
            df["image"] = [f"images/{i}.png" for i in items]
            (b / "images").mkdir()
            for i in items:
                (b / "images" / f"{i}.png").write_bytes(b"\x89PNG fake " + i.encode())
        df.to_csv(b / "items.csv", index=False)
    return b


def test_merge_frames_appends_replaces_by_key_and_unions_columns():
    cur = pd.DataFrame({"item_id": ["i1", "i2"], "title": ["a", "b"]})
    new = pd.DataFrame({"item_id": ["i2", "i3"], "title": ["B", "c"], "year": ["1999", "2000"]})
    out = merge_frames(cur, new, ["item_id"])
    assert out["item_id"].tolist() == ["i1", "i2", "i3"]
    assert out.set_index("item_id").loc["i2", "title"] == "B"
    assert list(out.columns) == ["item_id", "title", "year"] and pd.isna(out.loc[0, "year"])
    # parquet-typed current table + CSV strings: strict conversion to the current dtype
    cur = pd.DataFrame({"user_id": ["u1"], "timestamp": [10]})
    out = merge_frames(cur, pd.DataFrame({"user_id": ["u2"], "timestamp": ["20"]}), ["user_id"])
    assert out["timestamp"].tolist() == [10, 20]
    # ... and a value that does not convert is kept as text (validation sees it), never dropped
    out = merge_frames(cur, pd.DataFrame({"user_id": ["u2"], "timestamp": ["soon"]}), ["user_id"])
    assert out["timestamp"].tolist() == ["10", "soon"]


def test_good_batch_merged_once_bad_batch_quarantined(tmp_path):
    data = write_blocks_dataset(tmp_path / "data" / "ds", n_users=6, n_items=6, per_user=3)
    landing, quarantine = tmp_path / "landing", tmp_path / "quarantine"
    n0 = len(pd.read_csv(data / "ratings.csv"))
    make_batch(landing, "b1", [("u100", "i1", 1_700_000_000, 4), ("u100", "i90", 1_700_000_100, 5)],
               items=["i90"], image=True)
    digest = batch_hash(landing / "b1")
    rep = ingest(LocalLanding(landing), data, quarantine, {}, validator=stub_validator, dvc=False)
    assert [(r.batch, r.status) for r in rep.results] == [("b1", "merged")]
    r = pd.read_csv(data / "ratings.csv")
    assert len(r) == n0 + 2 and "u100" in set(r["user_id"])
    items = pd.read_csv(data / "items.csv")
    assert "i90" in set(items["item_id"]) and (data / "images" / "i90.png").exists()
    assert [b["hash"] for b in json.loads((data / BATCHES_FILE).read_text())["batches"]] == [digest]
    assert not (landing / "b1").exists() and (landing / "_processed" / "b1").is_dir()
    assert not list(data.parent.glob(".ds.candidate-*"))

    # the same content delivered again (another name): recognised, merged once only
    make_batch(landing, "b1-again", [("u100", "i1", 1_700_000_000, 4),
                                     ("u100", "i90", 1_700_000_100, 5)], items=["i90"], image=True)
    before = tree_hash(data)
    rep = ingest(LocalLanding(landing), data, quarantine, {}, validator=stub_validator, dvc=False)
    assert [r.status for r in rep.results] == ["duplicate"]
    assert tree_hash(data) == before

    # a bad batch: quarantined with its report, dataset byte-for-byte unchanged
    make_batch(landing, "bad", [("u101", "i1", 1_700_000_000, 9)])
    rep = ingest(LocalLanding(landing), data, quarantine, {}, validator=stub_validator, dvc=False)
    assert [r.status for r in rep.results] == ["quarantined"]
    assert tree_hash(data) == before
    q = quarantine / "bad"
    info = json.loads((q / "_quarantine.json").read_text())
    assert info["hash"] == batch_hash(q) and info["validation"]["passed"] is False
    assert "rule 'between'" in (q / "_report.txt").read_text()
    assert (q / "ratings.csv").exists() and not (landing / "bad").exists()
    # a re-delivered bad batch is moved aside without a second validation report
    make_batch(landing, "bad", [("u101", "i1", 1_700_000_000, 9)])
    rep = ingest(LocalLanding(landing), data, quarantine, {}, validator=stub_validator, dvc=False)
    assert [r.status for r in rep.results] == ["already-quarantined"]
    assert tree_hash(data) == before


def test_batch_breaking_the_contract_is_quarantined_before_merging(tmp_path):
    data = write_blocks_dataset(tmp_path / "ds", n_users=4, n_items=4, per_user=2)
    landing = tmp_path / "landing"
    (landing / "nots").mkdir(parents=True)
    (landing / "nots" / "ratings.csv").write_text("user_id,item_id\nu1,i1\n")
    before = tree_hash(data)
    called = []
    rep = ingest(LocalLanding(landing), data, tmp_path / "q", {}, dvc=False,
                 validator=lambda p, prm: called.append(p))
    assert [r.status for r in rep.results] == ["quarantined"] and not called
    report = json.loads((tmp_path / "q" / "nots" / "_quarantine.json").read_text())
    assert report["validation"]["findings"][0]["rule"] == "required-columns"
    assert tree_hash(data) == before


def test_ignores_hidden_and_unmarked_batches(tmp_path):
    landing = tmp_path / "landing"
    make_batch(landing, ".incoming", [("u1", "i1", 1, 3)])
    make_batch(landing, "_tmp", [("u1", "i1", 1, 3)])
    make_batch(landing, "ready", [("u1", "i1", 1, 3)])
    make_batch(landing, "notyet", [("u1", "i1", 1, 3)])
    (landing / "ready" / "_SUCCESS").write_text("")
    assert LocalLanding(landing).list_batches() == ["notyet", "ready"]
    assert LocalLanding(landing, require_marker=True).list_batches() == ["ready"]
    # the marker is not part of the content hash
    assert batch_hash(landing / "ready") == batch_hash(landing / "notyet")


def git_dvc_repo(tmp_path):
    """An empty git + DVC repository and the environment to run the project's code in it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
    return repo, env


@pytest.mark.integration
def test_concurrent_ingests_merge_each_batch_exactly_once(tmp_path):
    data = write_blocks_dataset(tmp_path / "data" / "ds", n_users=6, n_items=6, per_user=3)
    landing = tmp_path / "landing"
    n0 = len(pd.read_csv(data / "ratings.csv"))
    make_batch(landing, "b1", [("u201", "i1", 1_700_000_000, 3)])
    make_batch(landing, "b2", [("u202", "i2", 1_700_000_000, 4), ("u202", "i3", 1_700_000_001, 4)])
    script = textwrap.dedent(f"""
        import json, sys
        from pipelines.ingest import ingest, LocalLanding
        from tests.pipelines.test_ingest import slow_stub_validator
        rep = ingest(LocalLanding({str(landing)!r}), {str(data)!r}, {str(tmp_path / 'q')!r}, {{}},
                     validator=slow_stub_validator, dvc=False)
        print(json.dumps([[r.batch, r.status] for r in rep.results]))
        """)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    statuses = sorted(tuple(x) for o, _ in outs for x in json.loads(o.strip().splitlines()[-1]))
    merged = [b for b, s in statuses if s == "merged"]
    assert sorted(merged) == ["b1", "b2"], statuses  # each batch merged by exactly one process
    r = pd.read_csv(data / "ratings.csv")
    assert len(r) == n0 + 3
    entries = json.loads((data / BATCHES_FILE).read_text())["batches"]
    assert sorted(e["batch"] for e in entries) == ["b1", "b2"]


@pytest.mark.integration
@pytest.mark.slow
def test_real_validation_and_dvc_versioning(tmp_path):
    """Same GE suites as the validate stage; a merge makes a new DVC version of the dataset."""
    import os

    repo, env = git_dvc_repo(tmp_path)
    data = write_blocks_dataset(repo / "data" / "ds", n_users=8, n_items=8, per_user=4)
    landing = repo / "landing"
    make_batch(landing, "a-good", [("u1", "i1", 1_700_000_000, 4), ("u1", "i3", 1_700_000_050, 3)])
    make_batch(landing, "b-bad", [("u2", "i1", 1_700_000_000, 4), ("u2", "i2", 1_700_000_050, 42)])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["validate"]
    params["min_ratings"] = 5
    rep = ingest(LocalLanding(landing), data, repo / "quarantine", params, repo=repo)
    assert {r.batch: r.status for r in rep.results} == {"a-good": "merged", "b-bad": "quarantined"}
    ratings = pd.read_csv(data / "ratings.csv")
    assert len(ratings[ratings["timestamp"] == 1_700_000_050]) == 1 and ratings["rating"].max() <= 5
    report = json.loads((repo / "quarantine" / "b-bad" / "_quarantine.json").read_text())
    errors = [f for f in report["validation"]["findings"] if f["severity"] == "error"]
    assert [(f["column"], f["rule"]) for f in errors] == [("rating", "rating-range")], errors
    dvcfile = yaml.safe_load((repo / "data" / "ds.dvc").read_text())
    assert dvcfile["outs"][0]["md5"] == rep.dvc_md5
    assert rep.untrained  # no dvc.lock records this dataset version yet
    st = subprocess.run([sys.executable, "-m", "dvc", "status", "data/ds.dvc"], cwd=repo, env=env,
                        capture_output=True, text=True)
    assert st.returncode == 0 and "up to date" in st.stdout, st.stdout + st.stderr


@pytest.mark.integration
def test_s3_landing_zone(tmp_path):
    from tests.s3_server import moto_server

    data = write_blocks_dataset(tmp_path / "ds", n_users=6, n_items=6, per_user=3)
    n0 = len(pd.read_csv(data / "ratings.csv"))
    local = tmp_path / "src"
    make_batch(local, "b1", [("u400", "i1", 1_700_000_000, 4)], items=["i77"], image=True)
    make_batch(local, "bad", [("u401", "i1", 1_700_000_000, 0)])
    with moto_server() as s3:
        s3.create_bucket("landing-zone")
        client = s3.client()
        for p in sorted(local.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), "landing-zone", f"incoming/{p.relative_to(local).as_posix()}")
        client.put_object(Bucket="landing-zone", Key="incoming/README.txt", Body=b"not a batch")
        from pipelines.publish_s3 import S3Store

        store = S3Store("landing-zone", "incoming", client=client)
        land = S3Landing("s3://landing-zone/incoming", store=store)
        assert land.list_batches() == ["b1", "bad"]
        rep = ingest(land, data, tmp_path / "q", {}, validator=stub_validator, dvc=False)
        assert {r.batch: r.status for r in rep.results} == {"b1": "merged", "bad": "quarantined"}
        keys = store.list()
        assert not any(k.startswith(("b1/", "bad/")) for k in keys)
        assert any(k.startswith("_processed/b1-") for k in keys)
        assert any(k.startswith("_quarantine/bad-") for k in keys)
        assert land.list_batches() == []
    assert len(pd.read_csv(data / "ratings.csv")) == n0 + 1
    assert (data / "images" / "i77.png").exists()
    assert (tmp_path / "q" / "bad" / "_report.txt").exists()


# --------------------------------------------------------------------------- faults
INGEST_PROC = textwrap.dedent("""
    import json, sys
    from pipelines.ingest import ingest, LocalLanding
    from tests.pipelines.test_ingest import slow_stub_validator
    landing, data, quarantine, dvc = sys.argv[1:5]
    rep = ingest(LocalLanding(landing), data, quarantine, {}, validator=slow_stub_validator,
                 dvc=dvc == "dvc")
    print(json.dumps({"results": [[r.batch, r.status] for r in rep.results], "notes": rep.notes,
                      "dvc_md5": rep.dvc_md5, "untrained": rep.untrained}))
    """)


def _ingest_proc(landing, data, quarantine, dvc=False, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", INGEST_PROC, str(landing), str(data), str(quarantine),
                             "dvc" if dvc else "no"], env=env, cwd=cwd or ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _state(data: Path) -> tuple:
    """The dataset's content; _batches.json by batch hashes (its merge times differ per run)."""
    files = {p.relative_to(data).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(data.rglob("*")) if p.is_file() and p.name != BATCHES_FILE}
    return tuple(sorted(files.items())), tuple(b["hash"] for b in read_batches(data))


@pytest.mark.integration
def test_same_batch_delivered_twice_at_the_same_moment_is_merged_once(tmp_path):
    """Two ingest processes, each with its own landing zone, get the same content (two names)."""
    data = write_blocks_dataset(tmp_path / "data" / "ds", n_users=6, n_items=6, per_user=3)
    n0 = len(pd.read_csv(data / "ratings.csv"))
    rows = [("u301", "i1", 1_700_000_000, 4), ("u301", "i2", 1_700_000_060, 5)]
    make_batch(tmp_path / "land-a", "2024-06-01", rows)
    make_batch(tmp_path / "land-b", "2024-06-01-resent", rows)
    procs = [_ingest_proc(tmp_path / f"land-{x}", data, tmp_path / "q") for x in "ab"]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    statuses = sorted(s for o, _ in outs for _b, s in json.loads(o.strip().splitlines()[-1])["results"])
    assert statuses == ["duplicate", "merged"], outs
    r = pd.read_csv(data / "ratings.csv")
    assert len(r) == n0 + 2 and (r["user_id"] == "u301").sum() == 2
    assert len(json.loads((data / BATCHES_FILE).read_text())["batches"]) == 1


def test_validator_crashing_halfway_leaves_the_dataset_untouched(tmp_path):
    """Not a clean validation failure: the validator itself dies in the middle of its checks."""
    data = write_blocks_dataset(tmp_path / "ds", n_users=4, n_items=4, per_user=2)
    make_batch(tmp_path / "landing", "b1", [("u9", "i1", 1_700_000_000, 4)])
    before = tree_hash(data)
    checked = []

    def crashing(path, params):
        checked.append(pd.read_csv(Path(path) / "ratings.csv"))  # the merged candidate is complete
        raise MemoryError("validator died halfway")

    with pytest.raises(MemoryError, match="halfway"):
        ingest(LocalLanding(tmp_path / "landing"), data, tmp_path / "q", {}, validator=crashing, dvc=False)
    assert len(checked) == 1 and "u9" in set(checked[0]["user_id"])
    assert tree_hash(data) == before
    assert (tmp_path / "landing" / "b1" / "ratings.csv").exists()  # still there for the next try
    assert not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir() if ".candidate-" in p.name]
    rep = ingest(LocalLanding(tmp_path / "landing"), data, tmp_path / "q", {}, validator=stub_validator,
                 dvc=False)
    assert [r.status for r in rep.results] == ["merged"]


@pytest.mark.integration
@pytest.mark.slow
def test_ingest_killed_at_random_points_merges_exactly_once(tmp_path):
    """SIGKILL an ingest of two batches at 6 seeded random points; each time the dataset is
    as before, or holds complete batches only; the retry merges each batch exactly once."""
    import random
    import shutil
    import signal
    import time

    seed_data = write_blocks_dataset(tmp_path / "seed" / "ds", n_users=6, n_items=6, per_user=3)
    make_batch(tmp_path / "seed" / "landing", "b1", [("u501", "i1", 1_700_000_000, 4)],
               items=["i70"], image=True)
    make_batch(tmp_path / "seed" / "landing", "b2", [("u502", "i2", 1_700_000_000, 3)])

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(tmp_path / "seed", d)
        return d / "landing", d / "ds", d / "q"

    # a clean run: its duration places the kills, its states are the only allowed ones
    states = {"before": _state(seed_data)}
    landing, data, q = fresh("clean-1")
    make_batch(tmp_path / "only-b1", "b1", [("u501", "i1", 1_700_000_000, 4)], items=["i70"], image=True)
    ingest(LocalLanding(tmp_path / "only-b1"), data, q, {}, validator=stub_validator, dvc=False)
    states["b1"] = _state(data)
    landing, data, q = fresh("clean")
    t0 = time.monotonic()
    out, err = _ingest_proc(landing, data, q).communicate(timeout=120)
    clean_seconds = time.monotonic() - t0
    assert [s for _b, s in json.loads(out.strip().splitlines()[-1])["results"]] == ["merged", "merged"], err
    states["both"] = _state(data)
    rng = random.Random(20240611)
    killed = 0
    for k in range(6):
        landing, data, q = fresh(f"kill-{k}")
        delay = rng.uniform(0.1, 0.95) * clean_seconds
        proc = _ingest_proc(landing, data, q)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed += 1
        proc.communicate()
        after_kill = _state(data)
        assert after_kill in states.values(), f"kill {k} at {delay:.2f}s left a mixed dataset"
        out, err = _ingest_proc(landing, data, q).communicate(timeout=120)  # the retry
        rep = json.loads(out.strip().splitlines()[-1])
        assert _state(data) == states["both"], (k, delay, rep, err[-2000:])
        assert not [p for p in data.parent.iterdir() if ".candidate-" in p.name]
        assert sorted(p.name for p in (landing / "_processed").iterdir()) == ["b1", "b2"]
    assert killed >= 4, f"only {killed} of 6 kills landed while the ingest ran"


@pytest.mark.integration
@pytest.mark.slow
def test_kill_between_merge_and_dvc_add_is_versioned_by_the_next_ingest(tmp_path):
    import signal
    import time

    repo, env = git_dvc_repo(tmp_path)
    data = write_blocks_dataset(repo / "data" / "ds", n_users=6, n_items=6, per_user=3)
    subprocess.run([sys.executable, "-m", "dvc", "add", "data/ds"], cwd=repo, check=True, env=env,
                   capture_output=True)
    md5_before = yaml.safe_load((repo / "data" / "ds.dvc").read_text())["outs"][0]["md5"]
    make_batch(repo / "landing", "b1", [("u601", "i1", 1_700_000_000, 4)])
    digest = batch_hash(repo / "landing" / "b1")
    proc = _ingest_proc(repo / "landing", data, repo / "q", dvc=True, cwd=repo)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # merged, `dvc add` not done yet
        if (data / BATCHES_FILE).exists() and digest in (data / BATCHES_FILE).read_text():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the ingest finished before the kill"
    assert yaml.safe_load((repo / "data" / "ds.dvc").read_text())["outs"][0]["md5"] == md5_before
    assert (data.parent / ".ds.ingest-pending.json").exists()
    out, err = _ingest_proc(repo / "landing", data, repo / "q", dvc=True, cwd=repo).communicate(timeout=120)
    rep = json.loads(out.strip().splitlines()[-1])
    # killed before or after the batch was archived: then it is archived now, never merged again
    assert [s for _b, s in rep["results"]] in ([], ["duplicate"]), err
    assert not (repo / "landing" / "b1").exists()
    assert any("dvc add" in n for n in rep["notes"]), rep
    assert rep["dvc_md5"] != md5_before and rep["untrained"]
    assert not (data.parent / ".ds.ingest-pending.json").exists()
    st = subprocess.run([sys.executable, "-m", "dvc", "status", "data/ds.dvc"], cwd=repo, env=env,
                        capture_output=True, text=True)
    assert "up to date" in st.stdout, st.stdout + st.stderr
    assert (pd.read_csv(data / "ratings.csv")["user_id"] == "u601").sum() == 1
