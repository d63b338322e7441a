"""Every DAG file parses, with no database, and the training DAG *is* the stage graph.

The DAGs are parsed in a subprocess (fresh Airflow config: temp AIRFLOW_HOME,
examples off) whose metadata DB URL points to a file that cannot exist, so any
database access at parse time would be an import error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipelines import graph
from tests.fixtures import ROOT

DAGS = ROOT / "dags"

PARSE = textwrap.dedent("""
    import json, os, sys
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=sys.argv[1], safe_mode=False)
    out = {"errors": {k: str(v)[-600:] for k, v in bag.import_errors.items()},
           "files": sorted(os.path.basename(d.fileloc) for d in bag.dags.values()), "dags": {}}
    for dag_id, dag in bag.dags.items():
        out["dags"][dag_id] = {
            "tags": sorted(dag.tags), "catchup": dag.catchup, "doc": bool(dag.doc_md),
            "max_active_runs": dag.max_active_runs, "start_date": str(dag.start_date),
            "timetable": type(dag.timetable).__name__, "timetable_repr": repr(dag.timetable),
            "tasks": {t.task_id: {"retries": t.retries, "backoff": t.retry_exponential_backoff,
                                  "pool": t.pool, "queue": t.queue, "doc": bool(t.doc_md),
                                  "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                                  "type": type(t).__name__, "cmd": getattr(t, "bash_command", None),
                                  "outlets": [getattr(o, "uri", str(o)) for o in t.outlets]}
                      for t in dag.tasks},
            "edges": sorted([u.task_id, d] for u in dag.tasks for d in u.downstream_task_ids),
        }
    print("@@" + json.dumps(out))
    """)


def parse(tmp_path, **env_extra) -> dict:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(tmp_path / "airflow_home"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        # any DB access during parsing fails: the directory does not exist
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/no/such/dir/airflow.db",
        "PYTHONPATH": "",  # the DAG files must find the project by themselves
    })
    env.update(env_extra)
    res = subprocess.run([sys.executable, "-c", PARSE, str(DAGS)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("@@")][-1]
    return json.loads(line[2:])


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    return parse(tmp_path_factory.mktemp("parse"), MMREC_GPU_POOL="gpu_test_pool", MMREC_GPU_QUEUE="gpu_test_queue")


def test_every_dag_file_imports_without_errors_or_db(parsed):
    assert parsed["errors"] == {}
    dag_files = sorted(p.name for p in DAGS.glob("*.py") if not p.name.startswith("_"))
    assert sorted(set(parsed["files"])) == dag_files
    assert set(parsed["dags"]) == {"mmrec_training", "mmrec_ingest"}


def test_dags_have_tags_retries_docs_static_start(parsed):
    for dag_id, dag in parsed["dags"].items():
        assert "mmrec" in dag["tags"] and len(dag["tags"]) >= 2, dag_id
        assert dag["catchup"] is False and dag["max_active_runs"] == 1 and dag["doc"], dag_id
        assert dag["start_date"].startswith("2025-01-01"), dag_id
        for tid, t in dag["tasks"].items():
            assert t["retries"] == 2 and t["backoff"] > 1, (dag_id, tid)
            assert t["timeout"] and t["doc"], (dag_id, tid)


def test_training_dag_is_the_stage_graph(parsed):
    dag = parsed["dags"]["mmrec_training"]
    assert set(dag["tasks"]) == {s.name for s in graph.STAGES}
    assert {tuple(e) for e in dag["edges"]} == graph.edges()
    for s in graph.STAGES:
        t = dag["tasks"][s.name]
        assert t["type"] == "BashOperator"
        assert t["cmd"].endswith(f"-m pipelines run-stage {s.name}") and "cd " in t["cmd"]
        assert t["pool"] == ("gpu_test_pool" if s.pool == "gpu" else s.pool)
        assert (t["queue"] == "gpu_test_queue") == (s.pool == "gpu"), (s.name, t["queue"])
        assert t["timeout"] == (6 * 3600 if (s.heavy or s.pool == "gpu") else 3600)
    # triggered by the dataset asset OR weekly
    assert dag["timetable"] == "AssetOrTimeSchedule"
    assert "mmrec://dataset" in dag["timetable_repr"] and "0 3 * * 1" in dag["timetable_repr"]


def test_ingest_dag_emits_the_dataset_asset(parsed):
    dag = parsed["dags"]["mmrec_ingest"]
    assert list(dag["tasks"]) == ["ingest_batches"]
    assert dag["tasks"]["ingest_batches"]["outlets"] == ["mmrec://dataset/"]
    assert dag["timetable"] == "CronTriggerTimetable"


def test_kubernetes_mode_without_provider_is_a_clear_import_error(tmp_path):
    try:
        import airflow.providers.cncf.kubernetes  # noqa: F401
        pytest.skip("cncf.kubernetes provider installed here")
    except ImportError:
        pass
    out = parse(tmp_path, MMREC_EXECUTION="kubernetes")
    err = [v for k, v in out["errors"].items() if k.endswith("mmrec_training.py")]
    assert err and "apache-airflow-providers-cncf-kubernetes" in err[0]
    assert "mmrec_ingest" in out["dags"]  # the other DAG still loads
