"""mmrec_ingest: watch the landing zone, merge valid batches, trigger retraining.

Every ``MMREC_INGEST_CRON`` (default 15 min) the task runs
``python -m pipelines.ingest --json`` in the project directory: each new
batch in the landing zone (``MMREC_LANDING``: a folder, default
``<project>/landing``, or ``s3://bucket/prefix`` with ``MMREC_S3_ENDPOINT_URL``
for MinIO) is validated, merged into ``data.path`` together with the current
dataset (same Great Expectations suites as the ``validate`` stage) and
versioned with ``dvc add``; a bad batch goes to ``quarantine/<batch>/`` with
its report and changes nothing.

When at least one batch was merged -- or the DVC-tracked dataset is still
newer than the version recorded in ``dvc.lock`` (a merge whose event was
lost, e.g. the task failed after merging and its retry found nothing new) --
the task emits an event on the asset ``mmrec://dataset`` (extra: batches,
hashes, DVC md5), which schedules ``mmrec_training``.  Otherwise the task is
*skipped*, so no event is emitted and nothing retrains.  Quarantined batches are logged as
warnings and listed in the task's return value (XCom).
"""

from __future__ import annotations

import datetime as dt
import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # dags/ itself, for _common
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DATASET_ASSET, DEFAULT_ARGS, PROJECT_DIR, PYTHON, START_DATE, TAGS  # noqa: E402
from airflow.sdk import DAG, task  # noqa: E402

CRON = os.environ.get("MMREC_INGEST_CRON", "*/15 * * * *")


@task(task_id="ingest_batches", outlets=[DATASET_ASSET], execution_timeout=dt.timedelta(hours=2),
      doc_md="Validate + merge new landing-zone batches; emits the dataset asset when something merged.")
def ingest_batches(*, outlet_events=None):
    import json
    import logging
    import subprocess

    from airflow.sdk.exceptions import AirflowSkipException

    log = logging.getLogger("mmrec.ingest")
    project = os.environ.get("MMREC_PROJECT_DIR") or str(PROJECT_DIR)
    python = os.environ.get("MMREC_PYTHON") or PYTHON
    landing = os.environ.get("MMREC_LANDING") or os.path.join(project, "landing")
    quarantine = os.environ.get("MMREC_QUARANTINE") or os.path.join(project, "quarantine")
    cmd = [python, "-m", "pipelines.ingest", "--json", "--landing", landing, "--quarantine", quarantine,
           "--params", "params.yaml", "--repo", project]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    for line in res.stderr.splitlines():
        log.info("%s", line)
    if res.returncode != 0:
        raise RuntimeError(f"pipelines.ingest failed with exit code {res.returncode} (see log above)")
    report = json.loads(res.stdout)
    for r in report["results"]:
        (log.warning if r["status"] in ("quarantined", "already-quarantined") else log.info)(
            "batch %s: %s %s %s", r["batch"], r["status"], r.get("rows_added") or "", r.get("message") or "")
    merged = [r for r in report["results"] if r["status"] == "merged"]
    # `untrained`: the DVC-tracked dataset is newer than the version in dvc.lock, e.g. a batch
    # merged by an earlier try of this task that failed afterwards: announce it again.
    if not merged and not report.get("untrained"):
        raise AirflowSkipException(f"no new batch merged ({len(report['results'])} seen): nothing to retrain")
    outlet_events[DATASET_ASSET].extra = {"batches": [r["batch"] for r in merged],
                                          "hashes": [r["hash"] for r in merged],
                                          "dvc_md5": report.get("dvc_md5"), "dataset": report["dataset"]}
    return report


with DAG(
    dag_id="mmrec_ingest",
    description="landing zone -> validated, versioned dataset -> asset mmrec://dataset",
    schedule=CRON,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS + ["ingest"],
    doc_md=__doc__,
) as dag:
    ingest_batches()
