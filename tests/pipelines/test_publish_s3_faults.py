"""S3 outages in the middle of a publish and of a ``dvc push`` (real moto server + FaultProxy).

The publish stage and DVC talk to the S3 server through :class:`tests.fault_proxy.FaultProxy`,
which takes the "server" down at an exact request: before it reaches the server, or after the
server applied it but before the client got the answer.  Every request of a publish is a cut
point.  Readers (a direct client, as another consumer would be) must see the previous
complete ``latest.json`` and its files, or the new complete version; the retry after the
server is back completes the publish; nothing is duplicated (one key set per version, no
second version for the same content, a re-publish uploads nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipelines.publish_s3 import S3Store
from tasks.publish import run as publish
from tests.fault_proxy import FaultProxy
from tests.fixtures import ROOT
from tests.s3_server import ACCESS_KEY, REGION, SECRET_KEY, moto_server

pytestmark = pytest.mark.integration
BUCKET = "models"


@pytest.fixture(scope="module")
def s3():
    with moto_server() as server:
        server.create_bucket(BUCKET)
        server.direct = server.client()  # a reader's client, not through the proxy
        yield server


@pytest.fixture()
def proxy(s3):
    p = FaultProxy(int(s3.endpoint_url.rsplit(":", 1)[1]))
    yield p
    p.close()


@pytest.fixture(autouse=True)
def s3_env(monkeypatch):
    """Credentials from the environment (as in production); one attempt per call (the server
    stays down until the test brings it back: retrying inside the call only costs time)."""
    for k, v in {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                 "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                 "MMREC_S3_CONNECT_TIMEOUT": "5", "MMREC_S3_READ_TIMEOUT": "10",
                 "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_RETRY_MODE", "MMREC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)


def make_run(base, value: float, name: str):
    d = base / name
    (d / "profiles").mkdir(parents=True)
    (d / "fuse").mkdir()
    (d / "metrics.json").write_text(json.dumps({"hybrid": {"all": {"ndcg@10": value}}}, sort_keys=True))
    (d / "profiles" / "profiles.parquet").write_bytes(f"profiles of {name}".encode() * 100)
    pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i1", name], "rank": [1, 1]}).to_parquet(
        d / "fuse" / "recommendations.parquet")
    return d


def do_publish(d, store):
    return publish(d / "metrics.json", d / "profiles", d / "fuse", {}, store=store)


def reader_view(s3, prefix: str) -> str | None:
    """What a reader sees: the version of latest.json, after checking it is complete."""
    store = S3Store(BUCKET, prefix, client=s3.direct)
    latest = store.get_json("latest.json")
    if latest is None:
        return None
    for key, digest in latest["files"].items():
        data = store.get_bytes(f"{latest['path']}{key}")
        assert data is not None, f"latest.json -> {latest['version']}: {key} missing"
        assert hashlib.sha256(data).hexdigest() == digest, \
            f"latest.json -> {latest['version']}: {key} differs"
    manifest = store.get_json(f"{latest['path']}manifest.json")
    assert manifest and manifest["files"] == latest["files"]
    return latest["version"]


@pytest.mark.slow
def test_outage_at_every_request_of_a_publish(s3, proxy, tmp_path):
    """v1 is live; v2's publish loses the server at request k (k = every request, both ways)."""
    v1_run, v2_run = make_run(tmp_path, 0.30, "v1"), make_run(tmp_path, 0.31, "v2")
    # how many requests a publish of v2 over v1 makes (a rehearsal on its own prefix)
    v1 = do_publish(v1_run, S3Store(BUCKET, "rehearsal", client=s3.direct))["version"]
    proxy.arm(None)
    v2 = do_publish(v2_run, S3Store(BUCKET, "rehearsal", endpoint_url=proxy.url))["version"]
    n_requests = len(proxy.requests)
    assert n_requests >= 8 and v1 != v2, proxy.requests
    expected_keys = None
    runs = 0
    for k in range(1, n_requests + 1):
        for mode in ("before", "after"):
            prefix = f"cut-{k}-{mode}"
            direct = S3Store(BUCKET, prefix, client=s3.direct)
            do_publish(v1_run, direct)
            assert reader_view(s3, prefix) == v1
            proxy.up()
            proxy.arm(k, mode)
            t0 = time.monotonic()
            try:
                do_publish(v2_run, S3Store(BUCKET, prefix, endpoint_url=proxy.url))
                failed = False
            except Exception as exc:  # botocore's connection errors: the task fails, Airflow retries
                failed = True
                assert "Could not connect" in str(exc) or "Connection was closed" in str(exc) \
                    or "Read timeout" in str(exc) or "reset" in str(exc).lower(), repr(exc)
            assert failed and time.monotonic() - t0 < 30, (k, mode, "a dead endpoint must fail fast")
            runs += 1
            # readers: the previous complete version, or (the last write landed) the new one
            seen = reader_view(s3, prefix)
            assert seen in (v1, v2), (k, mode, seen)
            if mode == "before" or k < n_requests:
                assert seen == v1, f"latest.json switched before v2 was complete (cut {k} {mode})"
            # the server comes back; the retry completes the publish
            proxy.up()
            proxy.arm(None)
            d = do_publish(v2_run, S3Store(BUCKET, prefix, endpoint_url=proxy.url))
            assert d["promoted"] and d["version"] == v2
            assert reader_view(s3, prefix) == v2
            keys = sorted(direct.list())
            assert sorted({k2.split("/")[1] for k2 in keys if k2.startswith("versions/")}) == sorted([v1, v2])
            assert sorted(k2 for k2 in keys if k2.startswith("decisions/")) == \
                sorted([f"decisions/{v1}.json", f"decisions/{v2}.json"])
            if expected_keys is None:
                expected_keys = keys
            assert keys == expected_keys, f"cut {k} {mode}: other keys than a clean publish"
            # idempotent: the same content again uploads nothing and changes no key
            again = do_publish(v2_run, direct)
            assert again["version"] == v2 and again["uploaded"] == []
            assert sorted(direct.list()) == keys
    print(f"\nS3 publish outages: {runs} cut points ({n_requests} requests x before/after)")


def test_brief_outage_is_ridden_out_by_the_client_retries(s3, proxy, tmp_path, monkeypatch):
    """The server is gone for 0.5 s from the 4th request on: the standard retry mode (5
    attempts, jittered back-off) completes the publish in the same call."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    v1_run = make_run(tmp_path, 0.30, "v1")
    import threading

    def back_up(n):
        if n == 4:
            threading.Timer(0.5, proxy.up).start()

    proxy.arm(4, "before")
    proxy.on_request = back_up
    try:
        d = do_publish(v1_run, S3Store(BUCKET, "brief", endpoint_url=proxy.url))
    finally:
        proxy.on_request = None
    assert d["promoted"] and reader_view(s3, "brief") == d["version"]
    assert proxy.requests[3] == proxy.requests[4], proxy.requests  # the 4th request, retried


def test_server_frozen_mid_publish_fails_fast_and_retry_completes(s3, proxy, tmp_path, monkeypatch):
    """SIGSTOP the S3 server at the 5th request: connections hang; the publish gives up within
    the configured timeouts (2 attempts x 2 s here) instead of boto3's default 5 x 60 s; after
    SIGCONT the server also applies what was queued, and the retry completes the publish
    without duplicates."""
    monkeypatch.setenv("MMREC_S3_READ_TIMEOUT", "2")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    v1_run, v2_run = make_run(tmp_path, 0.30, "v1"), make_run(tmp_path, 0.31, "v2")
    prefix = "frozen"
    direct = S3Store(BUCKET, prefix, client=s3.direct)
    v1 = do_publish(v1_run, direct)["version"]
    frozen = []

    def freeze(n):
        if n == 5 and not frozen:
            os.kill(s3.process.pid, signal.SIGSTOP)
            frozen.append(time.monotonic())

    proxy.arm(None)
    proxy.on_request = freeze
    t0 = time.monotonic()
    try:
        with pytest.raises(Exception, match="(?i)timeout|timed out"):
            do_publish(v2_run, S3Store(BUCKET, prefix, endpoint_url=proxy.url))
        elapsed = time.monotonic() - t0
    finally:
        proxy.on_request = None
        os.kill(s3.process.pid, signal.SIGCONT)
    assert frozen and elapsed < 20, elapsed  # 2 attempts x 2 s read timeout + back-off
    assert reader_view(s3, prefix) == v1
    d = do_publish(v2_run, S3Store(BUCKET, prefix, endpoint_url=proxy.url))
    assert reader_view(s3, prefix) == d["version"] != v1
    versions = {k.split("/")[1] for k in direct.list("versions/")}
    assert versions == {v1, d["version"]}


DVC = [sys.executable, "-m", "dvc"]


@pytest.mark.slow
def test_dvc_push_interrupted_by_an_outage_then_retried(s3, proxy, tmp_path):
    """`dvc push` loses the server in the middle; `dvc pull` elsewhere still gets nothing half
    written; the retried push completes, the remote holds each object once."""
    s3.create_bucket("dvc-faults")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = s3.env()
    env.update({"PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"})

    def run(*cmd, check=True, cwd=repo):
        res = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert not check or res.returncode == 0, f"{cmd}: {res.stdout}\n{res.stderr}"
        return res

    run("git", "init", "-q")
    run(*DVC, "init", "-q")
    run("git", "config", "user.email", "t@example.com")
    run("git", "config", "user.name", "t")
    with open(repo / ".dvc" / "config", "a") as fh:
        fh.write(f"[core]\n    remote = s3\n['remote \"s3\"']\n    url = s3://dvc-faults/store\n"
                 f"    endpointurl = {proxy.url}\n    connect_timeout = 5\n    read_timeout = 30\n")
    (repo / "data").mkdir()
    for i in range(12):  # 12 files + the .dir object = 13 uploads
        (repo / "data" / f"part-{i}.bin").write_bytes(hashlib.sha256(str(i).encode()).digest() * (500 + i))
    run(*DVC, "add", "data")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "data")
    client = s3.client()

    def remote_keys():
        out = client.list_objects_v2(Bucket="dvc-faults").get("Contents", [])
        return sorted(o["Key"] for o in out)

    # a rehearsal counts the requests of a full push (then the remote is emptied again); one
    # upload at a time (-j 1): with parallel uploads in-flight objects are cut with the 6th, and
    # the order of the other requests varies (the cut once came at the 4th object)
    proxy.arm(None)
    run(*DVC, "push", "-r", "s3", "-j", "1")
    puts = [i for i, r in enumerate(proxy.requests, 1) if r.startswith("PUT ")]
    assert len(puts) == 13 and ".dir " in proxy.requests[puts[-1] - 1], proxy.requests  # index last
    for key in remote_keys():
        client.delete_object(Bucket="dvc-faults", Key=key)
    # the server goes away once it has stored the 6th object (its answer is lost)
    proxy.arm(6, "after", method="PUT")
    res = run(*DVC, "push", "-r", "s3", "-j", "1", check=False)
    assert res.returncode != 0, "the push did not notice the outage"
    partial = remote_keys()
    assert 6 <= len(partial) < 13, (partial, proxy.requests)
    assert not any(k.endswith(".dir") for k in partial), "the directory index went up before its files"
    # what is on the remote is complete: every object's bytes hash to its content address
    for key in partial:
        body = client.get_object(Bucket="dvc-faults", Key=key)["Body"].read()
        assert hashlib.md5(body).hexdigest() == key.split("/files/md5/")[1].replace("/", ""), key
    # a reader (a fresh clone) cannot check out the half-pushed version: a clear failure
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    run(*DVC, "remote", "modify", "--local", "s3", "endpointurl", s3.endpoint_url, cwd=clone)  # direct
    pull = run(*DVC, "pull", "-r", "s3", check=False, cwd=clone)
    assert pull.returncode != 0 and not (clone / "data").exists(), pull.stdout + pull.stderr
    assert "failed to pull" in (pull.stdout + pull.stderr).lower(), pull.stdout + pull.stderr
    proxy.up()
    proxy.arm(None)
    run(*DVC, "push", "-r", "s3")
    keys = remote_keys()
    assert len(keys) == 13 and len(set(keys)) == 13, keys  # each object once
    assert "are in sync" in run(*DVC, "status", "-c", "-r", "s3").stdout
    # the reader's pull now gets the complete data
    run(*DVC, "pull", "-r", "s3", cwd=clone)
    for f in (repo / "data").iterdir():
        assert (clone / "data" / f.name).read_bytes() == f.read_bytes()


def test_client_config_from_environment(monkeypatch):
    from pipelines.publish_s3 import client_config, s3_client

    cfg = client_config()  # the fixture's environment
    assert (cfg.connect_timeout, cfg.read_timeout) == (5.0, 10.0)
    assert cfg.retries == {"mode": "standard", "max_attempts": 1}
    for k in ("MMREC_S3_CONNECT_TIMEOUT", "MMREC_S3_READ_TIMEOUT", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(k)
    cfg = s3_client("http://127.0.0.1:9").meta.config  # defaults reach the real client
    assert (cfg.connect_timeout, cfg.read_timeout, cfg.retries["mode"]) == (10.0, 60.0, "standard")
    monkeypatch.setenv("MMREC_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MMREC_S3_READ_TIMEOUT='soon': not a number"):
        client_config()
