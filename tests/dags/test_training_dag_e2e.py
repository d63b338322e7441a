"""End to end with real Airflow: ``dag.test()`` of both DAGs on a tiny dataset.

A temp copy of the project (git + DVC) with a tiny generated dataset; a temp
AIRFLOW_HOME with SQLite (``airflow db migrate``).  One long-lived subprocess
runs ``dag.test()`` on request (Airflow's in-process execution API starts
once, ~20 s), so the test can check the working tree between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines import graph
from tests.fixtures import ROOT, write_blocks_dataset
from tests.repo import make_repo

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVER = textwrap.dedent("""
    import json, sys, time
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    print("@@READY", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        bag = DagBag(dag_folder=req["dags"])
        if bag.import_errors:
            print("@@" + json.dumps({"errors": bag.import_errors}), flush=True)
            continue
        t0 = time.monotonic()
        dr = bag.dags[req["dag_id"]].test()
        seconds = time.monotonic() - t0
        with create_session() as s:
            events = [{"uri": e.asset.uri, "extra": e.extra, "dag": e.source_dag_id}
                      for e in s.scalars(select(AssetEvent)).all()]
        print("@@" + json.dumps({"state": str(dr.state), "seconds": seconds, "events": events,
                                 "tis": {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}}),
              flush=True)
    """)


def _env(home: Path, repo: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAG_DISCOVERY_SAFE_MODE": "False",
        "PYTHONPATH": "",  # tasks must use the copy of the project, found from dags/
        "MMREC_PYTHON": sys.executable,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    env.pop("MMREC_PROJECT_DIR", None)
    return env


class DagRunner:
    def __init__(self, home: Path, repo: Path):
        self.repo = repo
        self.log: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=repo, env=_env(home, repo),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._read()

    def _read(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return line[2:].strip()
            self.log.append(line)
        raise AssertionError("dag test process died:\n" + "".join(self.log[-80:]))

    def test(self, dag_id: str) -> dict:
        start = len(self.log)
        self.proc.stdin.write(json.dumps({"dag_id": dag_id, "dags": str(self.repo / "dags")}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._read())
        out["log"] = "".join(self.log[start:])
        assert "errors" not in out, out
        return out

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def tree_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for base in paths:
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def dvc(repo: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    repo = base / "repo"
    data = repo / "data" / "ds"
    repo.mkdir()
    if (ROOT / "pipelines" / "demo.py").exists():
        res = subprocess.run([sys.executable, "-m", "pipelines", "generate-demo", "--out", str(data),
                              "--users", "40", "--items", "30", "--seed", "1"], cwd=ROOT,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    else:
        write_blocks_dataset(data, n_users=40, n_items=30, per_user=10)
    make_repo(repo, data)
    home = base / "airflow_home"
    mig = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=_env(home, repo),
                         cwd=base, capture_output=True, text=True)
    assert mig.returncode == 0, mig.stdout[-2000:] + mig.stderr[-2000:]
    # the training DAG routes train_encoder to the `gpu` pool (as `make airflow` / compose create it)
    pool = subprocess.run([sys.executable, "-m", "airflow", "pools", "set", "gpu", "1", "GPU stages"],
                          env=_env(home, repo), cwd=base, capture_output=True, text=True)
    assert pool.returncode == 0, pool.stdout[-2000:] + pool.stderr[-2000:]
    runner = DagRunner(home, repo)
    yield {"repo": repo, "data": data, "runner": runner}
    runner.close()


def test_training_dag_runs_the_graph(world):
    repo, runner = world["repo"], world["runner"]
    out = runner.test("mmrec_training")
    assert out["state"] == "success", out["log"][-5000:]
    assert out["tis"] == {s.name: "success" for s in graph.STAGES}
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert metrics and all("all" in v for v in metrics.values())
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {s.name for s in graph.STAGES}
    st = dvc(repo, "status")
    assert st.returncode == 0 and "up to date" in st.stdout, st.stdout
    print(f"\ndag.test(mmrec_training): {out['seconds']:.1f}s for {len(graph.STAGES)} stages")


def test_retraining_flow_bad_batch_quarantined_good_batch_versioned(world):
    repo, data, runner = world["repo"], world["data"], world["runner"]
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the trained state of test_training_dag_runs_the_graph")
    ratings = pd.read_csv(data / "ratings.csv", dtype=str)
    users = sorted(ratings["user_id"].unique())[:2]
    items = sorted(set(pd.read_csv(data / "items.csv", dtype=str)["item_id"]))
    seen = set(zip(ratings["user_id"], ratings["item_id"]))
    fresh = [(u, i) for u in users for i in items if (u, i) not in seen][:4]
    ts = int(pd.to_numeric(ratings["timestamp"]).max()) + 60
    tracked = [data, repo / "artifacts", repo / "reports", repo / "dvc.lock"]
    before = tree_hash(*tracked)

    # a bad batch: quarantined, nothing changes, no asset event (task skipped)
    bad = repo / "landing" / "2024-bad"
    bad.mkdir(parents=True)
    pd.DataFrame([(u, i, 42, ts) for u, i in fresh], columns=["user_id", "item_id", "rating",
                                                              "timestamp"]).to_csv(bad / "ratings.csv",
                                                                                   index=False)
    out = runner.test("mmrec_ingest")
    assert out["tis"] == {"ingest_batches": "skipped"}, out["log"][-5000:]
    assert out["events"] == []
    assert (repo / "quarantine" / "2024-bad" / "_quarantine.json").exists()
    assert "rating" in (repo / "quarantine" / "2024-bad" / "_report.txt").read_text()
    assert tree_hash(*tracked) == before
    assert not (repo / "data" / "ds.dvc").exists()

    # a good batch: merged, the dataset grows, a new DVC version, an asset event for retraining
    good = repo / "landing" / "2024-good"
    good.mkdir()
    pd.DataFrame([(u, i, 4, ts + k) for k, (u, i) in enumerate(fresh)],
                 columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(good / "ratings.csv",
                                                                                index=False)
    out = runner.test("mmrec_ingest")
    assert out["tis"] == {"ingest_batches": "success"}, out["log"][-5000:]
    assert len(pd.read_csv(data / "ratings.csv")) == len(ratings) + len(fresh)
    dvcfile = yaml.safe_load((repo / "data" / "ds.dvc").read_text())
    ev = [e for e in out["events"] if e["uri"] == "mmrec://dataset/"]
    assert len(ev) == 1 and ev[0]["extra"]["batches"] == ["2024-good"]
    assert ev[0]["extra"]["dvc_md5"] == dvcfile["outs"][0]["md5"]
    rel = data.relative_to(repo).as_posix()
    old_md5 = next(d["md5"] for st in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values()
                   for d in st["deps"] if d["path"] == rel)
    assert dvcfile["outs"][0]["md5"] != old_md5  # a new dataset version
    assert (repo / "landing" / "_processed" / "2024-good").is_dir()
    # the runner now sees the first stage as changed (only it and its downstream will rerun)
    st = dvc(repo, "status", "validate")
    assert "data/ds" in st.stdout and "modified" in st.stdout, st.stdout
