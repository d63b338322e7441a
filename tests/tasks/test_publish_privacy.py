"""Privacy of published artifacts: keyed pseudonyms for user ids, the key never leaks.

Real artifacts: a tiny dataset with distinctive user ids goes through the
validate, split and build_profiles stage CLIs; recommendations come from a
fitted popularity model in the fuse stage's format.  Everything the publish
stage uploads is then scanned (raw bytes, and decoded parquet / JSON) for the
raw ids and for the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.data import Split
from pipelines.privacy import Pseudonymizer, PseudonymizationError
from pipelines.publish_s3 import LocalStore
from pipelines.recommenders.popularity import Popularity
from tasks import build_profiles, publish, split, validate
from tests.fixtures import ROOT, write_blocks_dataset

KEY = "k3y-f0r-tests-0nly-9f8e7d6c5b4a"
ENV = "MMREC_PSEUDONYM_KEY"
N_USERS = 24


def raw_id(u: int) -> str:
    return f"rawuser-{u:03d}-zq"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """metrics.json, profiles dir and recommendations dir built by the real stages."""
    base = tmp_path_factory.mktemp("priv")
    data = write_blocks_dataset(base / "data", n_users=N_USERS, n_items=16, per_user=6)
    ids = {f"u{u}": raw_id(u) for u in range(N_USERS)}
    for name in ("ratings.csv", "users.csv"):
        df = pd.read_csv(data / name, dtype=str)
        df["user_id"] = df["user_id"].map(ids)
        df.to_csv(data / name, index=False)
    params = base / "params.yaml"
    params.write_text(yaml.safe_dump({"validate": {"data_docs": False},
                                      "split": {"seed": 1, "ratio": 0.7},
                                      "build_profiles": {"min_segment_users": 2}}))
    assert validate.main(["--data", str(data), "--out", str(base / "validated"), "--report",
                          str(base / "report"), "--params", str(params)]) == 0
    assert split.main(["--data", str(base / "validated"), "--out", str(base / "split"),
                       "--params", str(params)]) == 0
    assert build_profiles.main(["--split", str(base / "split"), "--out", str(base / "profiles"),
                                "--params", str(params)]) == 0
    model = Popularity().fit(Split.load(base / "split").interactions())
    users = list(model.user_ids)
    recs, scores = model.recommend(users, k=3, return_scores=True)
    rows = [(u, i, r + 1, float(sc), "popular in your segment", "popularity")
            for u, row, srow in zip(users, recs, scores) for r, (i, sc) in enumerate(zip(row, srow))
            if i is not None]
    (base / "fuse").mkdir()
    pd.DataFrame(rows, columns=["user_id", "item_id", "rank", "score", "reason", "sources"]).to_parquet(
        base / "fuse" / "recommendations.parquet", index=False)
    metrics = {"hybrid": {"all": {"ndcg@10": 0.3, "n_users": N_USERS}}}
    (base / "metrics.json").write_text(json.dumps(metrics))
    return {"metrics": base / "metrics.json", "profiles": base / "profiles", "recs": base / "fuse"}


def published_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def leaks(root: Path, needles: list[str]) -> dict[str, list[str]]:
    """needle occurrences per published file: in the raw bytes or the decoded content."""
    found = {}
    for f in published_files(root):
        data = f.read_bytes()
        texts = [data.decode("utf-8", errors="replace")]
        if f.suffix == ".parquet":
            texts.append(json.dumps(pq.read_table(f).to_pylist(), default=str))
            texts.append(str(pq.read_metadata(f).metadata))
        hits = sorted({n for n in needles if any(n in t for t in texts) or n.encode() in data})
        if hits:
            found[str(f.relative_to(root))] = hits
    return found


RAW_IDS = [raw_id(u) for u in range(N_USERS)]


def _publish(artifacts, target, params):
    return publish.run(artifacts["metrics"], artifacts["profiles"], artifacts["recs"], params,
                       store=LocalStore(target))


def test_published_artifacts_carry_pseudonyms_not_raw_ids(artifacts, tmp_path, monkeypatch):
    # control: without pseudonymisation the scan finds the raw ids (it can fail)
    plain = tmp_path / "plain"
    _publish(artifacts, plain, {})
    assert {"profiles/profiles.parquet", "profiles/sample.json", "recommendations.parquet"} <= {
        str(f.relative_to(plain).as_posix()).split("/", 2)[-1] for f in published_files(plain)}
    assert leaks(plain, RAW_IDS)

    monkeypatch.setenv(ENV, KEY)
    target = tmp_path / "pseudo"
    d = _publish(artifacts, target, {"pseudonymize": True})
    assert d["promoted"] and d["pseudonymized"] is True
    names = {str(f.relative_to(target).as_posix()) for f in published_files(target)}
    base = f"versions/{d['version']}"
    for key in ("profiles/profiles.parquet", "profiles/sample.json", "profiles/summary.json",
                "recommendations.parquet", "metrics.json", "model_card.md", "manifest.json"):
        assert f"{base}/{key}" in names, key
    assert leaks(target, RAW_IDS + [KEY]) == {}

    # the pseudonyms are HMAC-SHA256(key, id), the same in every file (tables still join)
    expect = {u: "u_" + hmac.new(KEY.encode(), u.encode(), hashlib.sha256).hexdigest()[:32] for u in RAW_IDS}
    local = pq.read_table(artifacts["profiles"] / "profiles.parquet")
    pub = pq.read_table(target / base / "profiles" / "profiles.parquet")
    assert pub.column("user_id").to_pylist() == [expect[u] for u in local.column("user_id").to_pylist()]
    assert pub.drop_columns(["user_id"]).equals(local.drop_columns(["user_id"]))  # nothing else changed
    recs = pd.read_parquet(target / base / "recommendations.parquet")
    assert set(recs["user_id"]) <= set(expect.values()) and len(set(recs["user_id"])) > 1
    sample = json.loads((target / base / "profiles" / "sample.json").read_text())
    assert sample and all(r["user_id"] in expect.values() for r in sample)
    card = (target / base / "model_card.md").read_text()
    assert "pseudonymised (HMAC-SHA256" in card and ENV in card

    # deterministic: the same key re-publishes the same version (nothing uploaded) ...
    again = _publish(artifacts, target, {"pseudonymize": True})
    assert again["version"] == d["version"] and again["uploaded"] == []
    # ... another key gives other pseudonyms, hence another version
    monkeypatch.setenv(ENV, KEY[::-1])
    other = _publish(artifacts, tmp_path / "other", {"pseudonymize": True, "force": True})
    assert other["version"] != d["version"]


@pytest.mark.parametrize("env_value, match", [(None, "is not set"), ("", "is not set"),
                                               ("s3kr1t", "too short")])
def test_missing_or_weak_key_is_a_clear_error_and_nothing_is_published(artifacts, tmp_path, monkeypatch,
                                                                        env_value, match):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("OTHER_KEY_VAR", raising=False)
    if env_value is not None:
        monkeypatch.setenv("OTHER_KEY_VAR", env_value)
    target = tmp_path / "t"
    with pytest.raises(PseudonymizationError, match=match) as info:
        _publish(artifacts, target, {"pseudonymize": True, "pseudonym_key_env": "OTHER_KEY_VAR"})
    assert "OTHER_KEY_VAR" in str(info.value)
    if env_value:
        assert env_value not in str(info.value)
    assert not target.exists() or not published_files(target)


def test_a_file_type_that_cannot_be_pseudonymised_is_refused(artifacts, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv(ENV, KEY)
    prof = tmp_path / "profiles"
    shutil.copytree(artifacts["profiles"], prof)
    (prof / "notes.txt").write_text(f"top user: {RAW_IDS[0]}\n")
    target = tmp_path / "t"
    with pytest.raises(PseudonymizationError, match="notes.txt"):
        publish.run(artifacts["metrics"], prof, artifacts["recs"], {"pseudonymize": True},
                    store=LocalStore(target))
    assert not target.exists() or not published_files(target)


def _cli(args, cwd, env):
    return subprocess.run([sys.executable, "-m", "tasks.publish", *args], cwd=cwd,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)


def test_cli_key_never_in_output_reports_or_published_files(artifacts, tmp_path):
    target = tmp_path / "pub"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"publish": {"local_dir": str(target), "pseudonymize": True}}))
    args = ["--metrics", str(artifacts["metrics"]), "--profiles", str(artifacts["profiles"]),
            "--recs", str(artifacts["recs"]), "--out", str(tmp_path / "out"), "--params", "params.yaml"]
    env = {k: v for k, v in os.environ.items() if k != ENV}
    res = _cli(args, tmp_path, env)  # no key: exit 1, one readable line naming the variable
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert any(ln.startswith("ERROR:") and ENV in ln for ln in res.stderr.splitlines()), res.stderr
    assert not (tmp_path / "out").exists() and not target.exists()
    res = _cli(args, tmp_path, {**env, ENV: KEY})
    assert res.returncode == 0, res.stderr
    texts = [res.stdout, res.stderr] + [p.read_text(errors="replace")
                                         for p in published_files(tmp_path / "out")]
    assert not any(KEY in t for t in texts)
    assert leaks(target, RAW_IDS + [KEY]) == {}
    decision = json.loads((tmp_path / "out" / "decision.json").read_text())
    assert decision["pseudonymized"] is True


def test_pseudonymizer_is_keyed_deterministic_and_hides_its_key():
    p, q = Pseudonymizer(KEY.encode()), Pseudonymizer(KEY[::-1].encode())
    assert p("42") == p(42) == "u_" + hmac.new(KEY.encode(), b"42", hashlib.sha256).hexdigest()[:32]
    assert p("42") != q("42") and p("42") != p("43")
    assert p(None) is None and np.isnan(p(float("nan")))
    assert KEY not in repr(p) and KEY not in str(vars(p).get("_memo", {}))
    with pytest.raises(PseudonymizationError):
        Pseudonymizer(b"short")
