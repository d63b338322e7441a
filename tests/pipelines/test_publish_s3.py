"""pipelines.publish_s3 against a real S3-compatible server process, and DVC's S3 remote."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.publish_s3 import LocalStore, S3Store, open_store, parse_s3_url
from tests.fixtures import ROOT
from tests.s3_server import SECRET_KEY, moto_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3():
    with moto_server() as server:
        yield server


def test_parse_and_open():
    assert parse_s3_url("s3://b/x/y/") == ("b", "x/y")
    assert parse_s3_url("s3://b") == ("b", "")
    with pytest.raises(ValueError):
        parse_s3_url("/local/path")
    assert isinstance(open_store("publish"), LocalStore)


def test_local_store_rejects_escaping_keys(tmp_path):
    store = LocalStore(tmp_path / "t")
    store.put_json("a/b.json", {"x": 1})
    assert store.get_json("a/b.json") == {"x": 1} and store.get_json("nope.json") is None
    assert store.list() == ["a/b.json"]
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")


def test_s3_store_roundtrip_list_move_download(s3, tmp_path):
    s3.create_bucket("store-test")
    store = S3Store("store-test", "pre/fix", client=s3.client())
    assert store.get_json("missing.json") is None and not store.exists("missing.json")
    store.put_json("b1/meta.json", {"a": 1})
    src = tmp_path / "f.bin"
    src.write_bytes(b"\x00\x01payload")
    store.put_file("b1/sub/f.bin", src)
    store.put_bytes("b2/x.txt", b"x")
    assert store.exists("b1/meta.json") and store.get_json("b1/meta.json") == {"a": 1}
    assert store.list() == ["b1/meta.json", "b1/sub/f.bin", "b2/x.txt"]
    assert store.list_dirs() == ["b1", "b2"]
    files = store.download_dir("b1", tmp_path / "dl")
    assert sorted(p.relative_to(tmp_path / "dl").as_posix() for p in files) == ["meta.json", "sub/f.bin"]
    assert (tmp_path / "dl" / "sub" / "f.bin").read_bytes() == b"\x00\x01payload"
    store.move_dir("b1", "_done/b1")
    assert store.list() == ["_done/b1/meta.json", "_done/b1/sub/f.bin", "b2/x.txt"]
    assert str(store) == "s3://store-test/pre/fix"


@pytest.mark.slow
def test_dvc_push_pull_roundtrip_with_endpointurl(s3, tmp_path):
    """A DVC S3 remote at the server's endpoint: push, lose the cache + data, pull it back."""
    s3.create_bucket("dvc-remote")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = s3.env()
    env["PYTHONPATH"] = str(ROOT)

    def run(*cmd):
        res = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd}: {res.stdout}\n{res.stderr}"
        return res

    dvc = [sys.executable, "-m", "dvc"]
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    # = `dvc remote add -d s3remote s3://dvc-remote/cache` + `dvc remote modify s3remote endpointurl URL`
    with open(repo / ".dvc" / "config", "a") as fh:
        fh.write(f"[core]\n    remote = s3remote\n['remote \"s3remote\"']\n"
                 f"    url = s3://dvc-remote/cache\n    endpointurl = {s3.endpoint_url}\n")
    (repo / "data").mkdir()
    (repo / "data" / "a.csv").write_text("user_id,item_id\nu1,i1\n")
    (repo / "data" / "b.bin").write_bytes(bytes(range(256)) * 10)
    run(*dvc, "add", "data")
    push = run(*dvc, "push")
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="dvc-remote")["Contents"]]
    assert len(keys) == 3 and all(k.startswith("cache/files/md5/") for k in keys)  # 2 files + .dir
    import shutil

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    pull = run(*dvc, "pull")
    assert (repo / "data" / "a.csv").read_text() == "user_id,item_id\nu1,i1\n"
    assert (repo / "data" / "b.bin").read_bytes() == bytes(range(256)) * 10
    # credentials came from the environment only: not in the repo config, not in any output
    config = (repo / ".dvc" / "config").read_text()
    assert SECRET_KEY not in config
    assert not any(SECRET_KEY in r.stdout + r.stderr for r in (push, pull))
