"""DVC behaviour of the whole stage graph on a tiny generated dataset in a temp repo."""

import hashlib
import json
import sys

import pytest
import yaml

from pipelines import graph
from tests.fixtures import write_blocks_dataset
from tests.repo import make_repo, ran_stages, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DVC = [sys.executable, "-m", "dvc"]


def _hash_tree(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvcrepo")
    data = write_blocks_dataset(root / "data" / "ds", n_users=40, n_items=30, per_user=10)
    make_repo(root, data, {"split": {"ratio": 0.7}})
    res = run(DVC + ["repro"], root)
    return root, res.stdout


def test_repro_runs_every_stage_end_to_end(repo):
    root, out = repo
    assert set(ran_stages(out)) == {s.name for s in graph.STAGES}
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert "itemknn" in metrics and metrics["itemknn"]["all"]["ndcg@10"] > 0
    assert (root / "dvc.lock").exists()


def test_second_repro_runs_nothing(repo):
    root, _ = repo
    res = run(DVC + ["repro"], root)
    assert ran_stages(res.stdout) == []
    assert run(DVC + ["status"], root).stdout.strip().endswith("up to date.") or \
        "Data and pipelines are up to date" in run(DVC + ["status"], root).stdout


def test_param_change_reruns_only_that_stage_and_downstream(repo):
    root, _ = repo
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["evaluate"]["ks"] = [1, 5, 10, 15]
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    res = run(DVC + ["repro"], root)
    assert set(ran_stages(res.stdout)) == {"evaluate"} | graph.downstream_closure("evaluate")
    assert "fit_cf" not in ran_stages(res.stdout)
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert "ndcg@15" in metrics["itemknn"]["all"]

    p["split"]["seed"] = 7
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    res = run(DVC + ["repro"], root)
    ran = set(ran_stages(res.stdout))
    assert "split" in ran and "validate" not in ran
    assert ran == {"split"} | graph.downstream_closure("split")


def test_failed_stage_keeps_last_good_outputs(repo):
    root, _ = repo
    before = _hash_tree(root / "artifacts/split")
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["split"]["protocol"] = "does-not-exist"
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    res = run(DVC + ["repro"], root, check=False)
    assert res.returncode != 0
    assert "split.protocol" in res.stderr + res.stdout
    assert _hash_tree(root / "artifacts/split") == before
    leftovers = [q for q in (root / "artifacts").iterdir() if ".tmp-" in q.name]
    assert leftovers == []
