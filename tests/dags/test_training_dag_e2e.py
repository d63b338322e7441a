"""End to end with real Airflow: ``dag.test()`` of both DAGs on a tiny dataset, S3 on moto.

A temp copy of the project (git + DVC) with a tiny generated dataset; a temp
AIRFLOW_HOME with SQLite (``airflow db migrate``); a real S3-compatible server
(moto, on loopback) as the publish target, the DVC remote and an S3 landing zone.
The publish stage gets its S3 credentials from an Airflow connection
(``MMREC_S3_CONN_ID``): the DAG process itself has no AWS credentials.  One
long-lived subprocess runs ``dag.test()`` on request (Airflow's in-process
execution API starts once, ~20 s), so the tests can check the working tree and
the bucket between runs.

The tests form one story and run in file order, each on the state the previous
one left: train -> bad batch (quarantined, nothing changes) -> good batch
(retrained, promoted) -> a worse model (not promoted, nothing changes) -> DVC push /
pull through S3 -> a batch from an S3 landing prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
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
from tests.s3_server import ACCESS_KEY, SECRET_KEY, moto_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONN_ID = "mmrec_s3"
MODELS, PREFIX, DVC_BUCKET, LANDING_BUCKET = "mmrec-models", "mmrec/e2e", "mmrec-dvc", "mmrec-landing"
FEATURES = ("preprocess_text", "preprocess_image", "preprocess_video")

SERVER = textwrap.dedent("""
    import json, os, sys, time
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    print("@@READY", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        saved = {k: os.environ.get(k) for k in req.get("env", {})}
        os.environ.update(req.get("env", {}))  # read by the tasks at run time
        try:
            bag = DagBag(dag_folder=req["dags"])
            if bag.import_errors:
                print("@@" + json.dumps({"errors": bag.import_errors}), flush=True)
                continue
            t0 = time.monotonic()
            dr = bag.dags[req["dag_id"]].test()
            seconds = time.monotonic() - t0
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        with create_session() as s:
            events = [{"uri": e.asset.uri, "extra": e.extra, "dag": e.source_dag_id, "run": e.source_run_id}
                      for e in s.scalars(select(AssetEvent)).all()]
        print("@@" + json.dumps({"state": str(dr.state), "seconds": seconds, "run_id": dr.run_id,
                                 "events": [e for e in events if e["run"] == dr.run_id],
                                 "tis": {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}}),
              flush=True)
    """)


def _env(home: Path, repo: Path) -> dict:
    env = dict(os.environ)
    for k in list(env):  # S3 credentials reach the publish stage only through the Airflow connection
        if k.startswith("AWS_"):
            env.pop(k)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAG_DISCOVERY_SAFE_MODE": "False",
        "PYTHONPATH": "",  # tasks must use the copy of the project, found from dags/
        "MMREC_PYTHON": sys.executable,
        "MMREC_S3_CONN_ID": CONN_ID,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
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

    def test(self, dag_id: str, env: dict | None = None) -> dict:
        start = len(self.log)
        self.proc.stdin.write(json.dumps({"dag_id": dag_id, "dags": str(self.repo / "dags"),
                                          "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._read())
        out["log"] = "".join(self.log[start:])
        assert "errors" not in out, out
        return out

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ran_and_skipped(log: str) -> tuple[set[str], set[str]]:
    """Stages the runner executed / found up to date, from the task logs of one DAG run."""
    return (set(re.findall(r"\[run-stage (\w+)\] running:", log)),
            set(re.findall(r"\[run-stage (\w+)\] up to date", log)))


def tree_hash(*paths: Path, exclude: tuple[Path, ...] = ()) -> str:
    h = hashlib.sha256()
    for base in paths:
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            if not any(p.is_relative_to(x) for x in exclude):
                h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def bucket(client, name: str, prefix: str = "") -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=name, Key=k)["Body"].read() for k in sorted(keys)}


def dvc(repo: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = ""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=e, capture_output=True,
                          text=True)


def set_params(repo: Path, section: str, **values) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def fresh_ratings(data: Path, n: int, rating: float) -> pd.DataFrame:
    """``n`` new interactions of existing users with existing items, after the last timestamp."""
    ratings = pd.read_csv(data / "ratings.csv", dtype=str)
    users = sorted(ratings["user_id"].unique())[:3]
    items = sorted(set(pd.read_csv(data / "items.csv", dtype=str)["item_id"]))
    seen = set(zip(ratings["user_id"], ratings["item_id"]))
    pairs = [(u, i) for u in users for i in items if (u, i) not in seen][:n]
    ts = int(pd.to_numeric(ratings["timestamp"]).max()) + 60
    return pd.DataFrame([(u, i, rating, ts + k) for k, (u, i) in enumerate(pairs)],
                        columns=["user_id", "item_id", "rating", "timestamp"])


def decision(repo: Path) -> dict:
    return json.loads((repo / "artifacts" / "publish" / "decision.json").read_text())


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
    # Publish to S3. A generous tolerance, so that the retrained model (on 40 users a few new
    # interactions move the metric either way) is promoted; the strict gate is tested below.
    make_repo(repo, data, params={"publish": {"s3_bucket": MODELS, "s3_prefix": PREFIX, "tolerance": 1.0}})
    home = base / "airflow_home"
    with moto_server() as s3:
        for b in (MODELS, DVC_BUCKET, LANDING_BUCKET):
            s3.create_bucket(b)

        def airflow(*args):
            res = subprocess.run([sys.executable, "-m", "airflow", *args], env=_env(home, repo), cwd=base,
                                 capture_output=True, text=True)
            assert res.returncode == 0, f"airflow {args[:2]}: {res.stdout[-2000:]}{res.stderr[-2000:]}"

        airflow("db", "migrate")
        # the training DAG routes train_encoder to the `gpu` pool (as `make airflow` / compose create it)
        airflow("pools", "set", "gpu", "1", "GPU stages")
        # S3 credentials and endpoint live in an Airflow connection, nowhere else
        airflow("connections", "add", CONN_ID, "--conn-type", "aws", "--conn-login", ACCESS_KEY,
                "--conn-password", SECRET_KEY, "--conn-extra", json.dumps({"endpoint_url": s3.endpoint_url}))
        runner = DagRunner(home, repo)
        yield {"repo": repo, "data": data, "runner": runner, "s3": s3, "client": s3.client(), "state": {}}
        runner.close()


def need(world, key):
    if key not in world["state"]:
        pytest.skip(f"needs the state left by an earlier test of this module ({key})")
    return world["state"][key]


def no_secret_in(repo: Path, log: str) -> None:
    assert SECRET_KEY not in log, "the S3 secret appeared in the DAG run's log"
    for p in [repo / "params.yaml", repo / "dvc.lock", *(repo / "artifacts").rglob("*"),
              *(repo / "reports").rglob("*")]:
        if p.is_file():
            assert SECRET_KEY.encode() not in p.read_bytes(), f"the S3 secret leaked into {p}"


def test_training_dag_runs_the_graph_and_publishes_to_s3(world):
    repo, runner, client = world["repo"], world["runner"], world["client"]
    out = runner.test("mmrec_training")
    assert out["state"] == "success", out["log"][-5000:]
    assert out["tis"] == {s.name: "success" for s in graph.STAGES}
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert metrics and all("all" in v for v in metrics.values())
    assert (repo / "artifacts/build_profiles/profiles.parquet").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {s.name for s in graph.STAGES}
    st = dvc(repo, "status")
    assert st.returncode == 0 and "up to date" in st.stdout, st.stdout
    # published to S3 (credentials from the Airflow connection only), latest.json -> the version
    d = decision(repo)
    assert d["promoted"] and d["reason"].startswith("no champion yet") and d["target"] == f"s3://{MODELS}/{PREFIX}"
    objects = bucket(client, MODELS, PREFIX)
    latest = json.loads(objects[f"{PREFIX}/latest.json"])
    assert latest["version"] == d["version"] and latest["model"] == d["model"]
    for key in ("metrics.json", "recommendations.parquet", "model_card.md", "manifest.json",
                "profiles/profiles.parquet"):
        assert f"{PREFIX}/versions/{d['version']}/{key}" in objects, key
    manifest = json.loads(objects[f"{PREFIX}/versions/{d['version']}/manifest.json"])
    for key, digest in manifest["files"].items():
        assert hashlib.sha256(objects[f"{PREFIX}/versions/{d['version']}/{key}"]).hexdigest() == digest, key
    no_secret_in(repo, out["log"])
    world["state"]["v1"] = d["version"]
    print(f"\ndag.test(mmrec_training): {out['seconds']:.1f}s for {len(graph.STAGES)} stages")


def test_bad_batch_is_quarantined_and_changes_nothing(world):
    repo, data, runner, client = world["repo"], world["data"], world["runner"], world["client"]
    need(world, "v1")
    tracked = [data, repo / "artifacts", repo / "reports", repo / "dvc.lock"]
    before, objects = tree_hash(*tracked), bucket(client, MODELS)
    bad = repo / "landing" / "2024-bad"
    bad.mkdir(parents=True)
    fresh_ratings(data, 4, 42).to_csv(bad / "ratings.csv", index=False)  # rating out of range
    out = runner.test("mmrec_ingest")
    assert out["tis"] == {"ingest_batches": "skipped"}, out["log"][-5000:]
    assert out["events"] == []  # no asset event: the training DAG is not triggered
    assert (repo / "quarantine" / "2024-bad" / "_quarantine.json").exists()
    assert "rating" in (repo / "quarantine" / "2024-bad" / "_report.txt").read_text()
    assert not bad.exists()
    assert tree_hash(*tracked) == before  # dataset, artifacts, reports, dvc.lock
    assert bucket(client, MODELS) == objects  # published versions, champion.json, latest.json
    assert not (repo / "data" / "ds.dvc").exists()
    world["state"]["bad_done"] = True


def test_good_batch_retrains_only_what_changed_and_promotes_a_new_version(world):
    repo, data, runner, client = world["repo"], world["data"], world["runner"], world["client"]
    v1 = need(world, "v1")
    n0 = len(pd.read_csv(data / "ratings.csv"))
    good = repo / "landing" / "2024-good"
    good.mkdir(parents=True)
    batch = fresh_ratings(data, 6, 4)
    batch.to_csv(good / "ratings.csv", index=False)
    lock0 = yaml.safe_load((repo / "dvc.lock").read_text())
    out = runner.test("mmrec_ingest")
    assert out["tis"] == {"ingest_batches": "success"}, out["log"][-5000:]
    assert len(pd.read_csv(data / "ratings.csv")) == n0 + len(batch)
    dvcfile = yaml.safe_load((repo / "data" / "ds.dvc").read_text())
    ev = [e for e in out["events"] if e["uri"] == "mmrec://dataset/"]
    assert len(ev) == 1 and ev[0]["extra"]["batches"] == ["2024-good"]
    assert ev[0]["extra"]["dvc_md5"] == dvcfile["outs"][0]["md5"]
    rel = data.relative_to(repo).as_posix()
    old_md5 = next(d["md5"] for st in lock0["stages"].values() for d in st["deps"] if d["path"] == rel)
    assert dvcfile["outs"][0]["md5"] != old_md5  # a new dataset version
    assert (repo / "landing" / "_processed" / "2024-good").is_dir()

    # the asset event schedules mmrec_training: run it
    out = runner.test("mmrec_training")
    assert out["state"] == "success", out["log"][-5000:]
    ran, skipped = ran_and_skipped(out["log"])
    assert ran | skipped == {s.name for s in graph.STAGES}, out["log"][-3000:]
    assert {"validate", "split", "fit_cf", "train_encoder", "evaluate", "publish"} <= ran
    # the items did not change: the feature stages re-encoded nothing (content-hash cache)
    for stage in FEATURES:
        meta = json.loads((repo / "artifacts" / stage / "meta.json").read_text())
        assert meta["n_encoded_this_run"] == 0, (stage, meta)
        assert meta["n_reused_from_cache"] == meta["n_present"] > 0, (stage, meta)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert next(d["md5"] for d in lock["stages"]["validate"]["deps"] if d["path"] == rel) == dvcfile["outs"][0]["md5"]
    assert dvc(repo, "status").stdout.strip().endswith("up to date.")
    # a new version is promoted: champion and latest.json switch to it, the old version stays
    d = decision(repo)
    assert d["promoted"] and d["version"] != v1 and d["champion"]["version"] == v1, d
    objects = bucket(client, MODELS, PREFIX)
    assert json.loads(objects[f"{PREFIX}/latest.json"])["version"] == d["version"]
    assert json.loads(objects[f"{PREFIX}/champion.json"])["version"] == d["version"]
    assert f"{PREFIX}/versions/{v1}/manifest.json" in objects
    no_secret_in(repo, out["log"])
    world["state"]["v2"] = d


def test_a_worse_model_is_not_promoted_and_nothing_published_changes(world):
    """The gate on a real run: publish the weakest trained model with tolerance 0."""
    repo, data, runner, client = world["repo"], world["data"], world["runner"], world["client"]
    champion = need(world, "v2")
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    scores = {m: v["all"]["ndcg@10"] for m, v in metrics.items() if "ndcg@10" in v.get("all", {})}
    weakest = min(sorted(scores), key=scores.get)
    assert scores[weakest] < champion["value"], scores  # otherwise there is no worse model to gate
    set_params(repo, "publish", model=weakest, tolerance=0.0)
    untouched = [data, repo / "artifacts", repo / "reports"]
    before = tree_hash(*untouched, exclude=(repo / "artifacts" / "publish",))
    lock0 = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    published = bucket(client, MODELS)

    out = runner.test("mmrec_training")
    assert out["state"] == "success", out["log"][-5000:]  # not promoting is not a failure
    ran, skipped = ran_and_skipped(out["log"])
    assert ran == {"publish"} and skipped == {s.name for s in graph.STAGES} - {"publish"}, out["log"][-3000:]
    d = decision(repo)
    assert d["promoted"] is False and d["model"] == weakest and "regression" in d["reason"], d
    assert d["champion"]["version"] == champion["version"]
    assert (repo / "artifacts" / "publish" / "decision.md").read_text().startswith("# Publish decision: NOT")
    # nothing that consumers read changed: only the decision record was added
    after = bucket(client, MODELS)
    assert set(after) - set(published) == {f"{PREFIX}/decisions/{d['version']}.json"}
    assert {k: after[k] for k in published} == published
    assert json.loads(after[f"{PREFIX}/latest.json"])["version"] == champion["version"]
    assert not any(k.startswith(f"{PREFIX}/versions/{d['version']}") for k in after)
    # and no other artifact changed
    assert tree_hash(*untouched, exclude=(repo / "artifacts" / "publish",)) == before
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {k: v for k, v in lock.items() if k != "publish"} == {k: v for k, v in lock0.items() if k != "publish"}
    world["state"]["gated"] = True


def test_dvc_push_pull_of_the_trained_pipeline_through_s3(world):
    """`dvc remote add -d` + `endpointurl` as README says; lose cache and outputs; pull them back."""
    repo, data, s3 = world["repo"], world["data"], world["s3"]
    need(world, "gated")
    env = s3.env()
    for args in (("remote", "add", "-d", "s3", f"s3://{DVC_BUCKET}/cache"),
                 ("remote", "modify", "s3", "endpointurl", s3.endpoint_url)):
        res = dvc(repo, *args, env=env)
        assert res.returncode == 0, res.stderr
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    outs = sorted({repo / o["path"] for st in lock.values() for o in st["outs"]} | {data})
    assert len(outs) > len(graph.STAGES)
    before = tree_hash(*outs)
    push = dvc(repo, "push", env=env)
    assert push.returncode == 0, push.stdout + push.stderr
    pushed = world["client"].list_objects_v2(Bucket=DVC_BUCKET, Prefix="cache/files/md5/")
    assert pushed["KeyCount"] > 10, pushed
    for p in (*outs, repo / ".dvc" / "cache"):  # every DVC-managed output, and the local cache
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    pull = dvc(repo, "pull", env=env)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert tree_hash(*outs) == before
    st = dvc(repo, "status", env=env)
    assert st.returncode == 0 and st.stdout.strip().endswith("up to date."), st.stdout
    assert SECRET_KEY not in (repo / ".dvc" / "config").read_text()
    assert not any(SECRET_KEY in r.stdout + r.stderr for r in (push, pull))


def test_ingest_dag_reads_batches_from_an_s3_landing_prefix(world):
    repo, data, runner, s3, client = world["repo"], world["data"], world["runner"], world["s3"], world["client"]
    need(world, "bad_done")
    n0 = len(pd.read_csv(data / "ratings.csv"))
    md5_0 = yaml.safe_load((repo / "data" / "ds.dvc").read_text())["outs"][0]["md5"]
    good, bad = fresh_ratings(data, 5, 3), fresh_ratings(data, 2, 0)
    client.put_object(Bucket=LANDING_BUCKET, Key="incoming/s3-good/ratings.csv", Body=good.to_csv(index=False))
    client.put_object(Bucket=LANDING_BUCKET, Key="incoming/s3-bad/ratings.csv", Body=bad.to_csv(index=False))
    env = {k: v for k, v in s3.env({}).items() if k.startswith("AWS_")}
    env.update({"MMREC_LANDING": f"s3://{LANDING_BUCKET}/incoming", "MMREC_S3_ENDPOINT_URL": s3.endpoint_url})
    out = runner.test("mmrec_ingest", env=env)
    assert out["tis"] == {"ingest_batches": "success"}, out["log"][-5000:]
    ev = [e for e in out["events"] if e["uri"] == "mmrec://dataset/"]
    assert len(ev) == 1 and ev[0]["extra"]["batches"] == ["s3-good"], out["events"]
    ratings = pd.read_csv(data / "ratings.csv")
    assert len(ratings) == n0 + len(good) and ratings["rating"].min() > 0
    md5 = yaml.safe_load((repo / "data" / "ds.dvc").read_text())["outs"][0]["md5"]
    assert md5 != md5_0 and ev[0]["extra"]["dvc_md5"] == md5
    keys = list(bucket(client, LANDING_BUCKET))
    assert not any(k.startswith(("incoming/s3-good/", "incoming/s3-bad/")) for k in keys), keys
    assert any(k.startswith("incoming/_processed/s3-good") for k in keys), keys
    assert any(k.startswith("incoming/_quarantine/s3-bad") for k in keys), keys
    assert "rating" in (repo / "quarantine" / "s3-bad" / "_report.txt").read_text()
    assert SECRET_KEY not in out["log"]
