"""publish stage: champion gate, versioned idempotent publishing, latest.json last, no secrets."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from pipelines.publish_s3 import LocalStore
from tasks import publish
from tasks.publish import decide, merge_params, run, select_model
from tests.fixtures import ROOT


def metrics_for(values: dict[str, float], metric: str = "ndcg@10") -> dict:
    return {m: {"all": {metric: v, "recall@10": v / 2, "n_users": 10},
                "cold_users": {metric: v / 3, "n_users": 2}} for m, v in values.items()}


@pytest.fixture()
def inputs(tmp_path):
    def make(values: dict[str, float], name="run"):
        d = tmp_path / name
        (d / "profiles").mkdir(parents=True)
        (d / "fuse").mkdir()
        (d / "metrics.json").write_text(json.dumps(metrics_for(values), sort_keys=True))
        (d / "profiles" / "users.parquet").write_bytes(b"profile bytes")
        pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "rank": [1]}).to_parquet(
            d / "fuse" / "recommendations.parquet")
        return d
    return make


def test_select_model_prefers_configured_then_best_available():
    p = merge_params({})
    assert select_model(metrics_for({"hybrid": 0.2, "itemknn": 0.3}), p)[:2] == ("hybrid", 0.2)
    model, value, notes = select_model(metrics_for({"popularity": 0.1, "itemknn": 0.3}), p)
    assert (model, value) == ("itemknn", 0.3) and "best available" in notes[0]
    with pytest.raises(ValueError, match="no model has 'map@3'"):
        select_model(metrics_for({"itemknn": 0.3}), merge_params({"primary": "map@3"}))


def test_gate():
    p = merge_params({"tolerance": 0.01})
    champ = {"version": "v0", "metric": "ndcg@10", "slice": "all", "value": 0.30}
    assert decide(0.295, "v1", champ, p)[0] is True  # within tolerance
    ok, why = decide(0.28, "v1", champ, p)
    assert ok is False and "regression" in why and "-0.020000" in why
    assert decide(0.1, "v1", None, p) == (True, "no champion yet: first published model")
    assert decide(0.1, "v0", champ, p)[0] is True  # same content re-published
    assert decide(0.9, "v1", {**champ, "metric": "recall@10"}, p)[0] is False
    assert decide(0.1, "v1", champ, merge_params({"force": True}))[0] is True
    with pytest.raises(ValueError, match="credentials never go in params.yaml"):
        merge_params({"aws_secret_access_key": "x"})


def test_publish_promote_idempotent_reject_and_latest_last(tmp_path, inputs):
    store = LocalStore(tmp_path / "target")
    first = inputs({"hybrid": 0.30, "itemknn": 0.25}, "first")
    d1 = run(first / "metrics.json", first / "profiles", first / "fuse", {}, store=store)
    assert d1["promoted"] and d1["model"] == "hybrid"
    v1 = d1["version"]
    latest = store.get_json("latest.json")
    assert latest["version"] == v1 and latest["path"] == f"versions/{v1}/"
    for key in ("metrics.json", "profiles/users.parquet", "recommendations.parquet", "model_card.md",
                "manifest.json"):
        assert store.exists(f"versions/{v1}/{key}"), key
    assert latest["files"]["metrics.json"] == publish.sha256_file(first / "metrics.json")
    assert store.get_json("champion.json")["value"] == 0.30
    card = store.get_bytes(f"versions/{v1}/model_card.md").decode()
    assert "| **hybrid** | 0.3000 | 0.1000 |" in card  # slices all, cold_users

    # the same content again: same version id, nothing uploaded, nothing changed
    snapshot = {k: store.get_bytes(k) for k in store.list() if not k.startswith("decisions/")}
    again = inputs({"hybrid": 0.30, "itemknn": 0.25}, "again")
    d2 = run(again / "metrics.json", again / "profiles", again / "fuse", {}, store=store)
    assert d2["version"] == v1 and d2["promoted"] and d2["uploaded"] == []
    assert {k: store.get_bytes(k) for k in store.list() if not k.startswith("decisions/")} == snapshot

    # a worse model: not promoted, champion/latest untouched, decision recorded (exit 0 semantics)
    worse = inputs({"hybrid": 0.20, "itemknn": 0.25}, "worse")
    d3 = run(worse / "metrics.json", worse / "profiles", worse / "fuse", {}, store=store)
    assert d3["promoted"] is False and "regression" in d3["reason"]
    assert {k: store.get_bytes(k) for k in store.list() if not k.startswith("decisions/")} == snapshot
    assert store.get_json(f"decisions/{d3['version']}.json")["promoted"] is False
    assert not any(k.startswith(f"versions/{d3['version']}") for k in store.list())

    # a better model: new version, and latest.json is the very last object written
    class Recording(LocalStore):
        writes: list[str] = []

        def put_bytes(self, key, data):
            self.writes.append(key)
            super().put_bytes(key, data)

        def put_file(self, key, path):
            self.writes.append(key)
            super().put_file(key, path)

    rec = Recording(tmp_path / "target")
    better = inputs({"hybrid": 0.40}, "better")
    d4 = run(better / "metrics.json", better / "profiles", better / "fuse", {}, store=rec)
    assert d4["promoted"] and d4["version"] != v1
    assert rec.writes[-1] == "latest.json"
    assert rec.writes.index(f"versions/{d4['version']}/manifest.json") < rec.writes.index("champion.json")
    assert store.get_json("latest.json")["version"] == d4["version"]
    assert store.exists(f"versions/{v1}/manifest.json")  # older versions stay


def _cli(args, cwd, env=None):
    import os

    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "tasks.publish", *args], cwd=cwd, env=e,
                          capture_output=True, text=True)


def test_cli_local_target_skips_missing_inputs(tmp_path, inputs):
    src = inputs({"itemknn": 0.3})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"publish": {"local_dir": str(tmp_path / "pub"), "tolerance": 0.0}}))
    res = _cli(["--metrics", str(src / "metrics.json"), "--profiles", str(tmp_path / "nope"),
                "--recs", str(tmp_path / "nope2"), "--out", str(tmp_path / "out"),
                "--params", "params.yaml"], tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads((tmp_path / "out" / "decision.json").read_text())
    assert d["promoted"] and d["model"] == "itemknn" and len(d["notes"]) == 3
    assert set(d["files"]) == {"metrics.json"}
    assert (tmp_path / "out" / "model_card.md").exists()
    assert json.loads((tmp_path / "pub" / "latest.json").read_text())["version"] == d["version"]
    res = _cli(["--metrics", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out2"),
                "--params", "params.yaml"], tmp_path)
    assert res.returncode == 1 and "missing.json" in res.stderr and not (tmp_path / "out2").exists()


PSEUDONYM_KEY = "pseudonym-key-for-the-s3-test-31337"


@pytest.mark.integration
@pytest.mark.slow
def test_cli_publishes_to_s3_without_leaking_credentials(tmp_path, inputs):
    from tests.s3_server import SECRET_KEY, moto_server

    src = inputs({"hybrid": 0.3})
    pd.DataFrame({"user_id": ["u1"], "segment": ["F"]}).to_parquet(src / "profiles" / "users.parquet")
    with moto_server() as s3:
        s3.create_bucket("models")
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"publish": {
            "s3_bucket": "models", "s3_prefix": "mmrec/prod", "s3_endpoint_url": s3.endpoint_url,
            "pseudonymize": True}}))
        args = ["--metrics", str(src / "metrics.json"), "--profiles", str(src / "profiles"),
                "--recs", str(src / "fuse"), "--out", str(tmp_path / "out"), "--params", "params.yaml"]
        env = {**s3.env(), "MMREC_PSEUDONYM_KEY": PSEUDONYM_KEY}
        res = _cli(args, tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        client = s3.client()
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="models")["Contents"])
        d = json.loads((tmp_path / "out" / "decision.json").read_text())
        v = d["version"]
        assert f"mmrec/prod/versions/{v}/recommendations.parquet" in keys
        assert f"mmrec/prod/versions/{v}/profiles/users.parquet" in keys
        latest = json.loads(client.get_object(Bucket="models", Key="mmrec/prod/latest.json")["Body"].read())
        assert latest["version"] == v and d["target"] == "s3://models/mmrec/prod"
        res2 = _cli(args, tmp_path, env=env)  # idempotent re-publish
        assert res2.returncode == 0, res2.stderr
        keys2 = sorted(o["Key"] for o in client.list_objects_v2(Bucket="models")["Contents"])
        assert keys2 == keys
        blobs = [client.get_object(Bucket="models", Key=k)["Body"].read() for k in keys]
    texts = [res.stdout, res.stderr, res2.stdout, res2.stderr]
    texts += [p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for secret in (SECRET_KEY, PSEUDONYM_KEY):  # S3 credentials and the pseudonym key
        assert not any(secret in t for t in texts)
        assert not any(secret.encode() in b for b in blobs)
    recs = [b for k, b in zip(keys, blobs) if k.endswith("recommendations.parquet")]
    assert recs and b"u1" not in recs[0] and b"u_" in recs[0]  # the raw user id is pseudonymised


def test_same_files_for_a_weaker_model_are_gated_not_taken_for_the_champion(tmp_path, inputs):
    """Switching ``publish.model`` to a weaker model publishes the same files: a new version,
    compared with the champion (not a re-publication of it); latest.json keeps the champion."""
    store = LocalStore(tmp_path / "target")
    src = inputs({"hybrid": 0.30, "popularity": 0.10})
    d1 = run(src / "metrics.json", src / "profiles", src / "fuse", {"tolerance": 0.0}, store=store)
    assert d1["promoted"] and d1["model"] == "hybrid"
    snapshot = {k: store.get_bytes(k) for k in store.list()}
    d2 = run(src / "metrics.json", src / "profiles", src / "fuse", {"tolerance": 0.0, "model": "popularity"},
             store=store)
    assert d2["version"] != d1["version"] and d2["files"] == d1["files"]
    assert d2["promoted"] is False and "regression" in d2["reason"] and "0.100000" in d2["reason"]
    after = {k: store.get_bytes(k) for k in store.list() if k != f"decisions/{d2['version']}.json"}
    assert after == snapshot  # champion.json, latest.json and every version untouched
    assert store.get_json("latest.json")["model"] == "hybrid"
