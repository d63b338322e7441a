"""Settings shared by the mmrec DAGs.

Parse-time rules: this module and the DAG files only read environment
variables and import pure-Python modules (``pipelines.graph``); no file or
database access happens when the DAG processor parses them.  Everything that
touches data runs inside tasks, in the project directory, with the project's
Python (``python -m pipelines run-stage STAGE``).

Environment (all optional):

``MMREC_PROJECT_DIR``   project checkout (default: the parent of this dags/ folder)
``MMREC_PYTHON``        interpreter with the project's requirements (default: the one
                        running Airflow); both are read again at run time by the tasks
``MMREC_EXECUTION``     ``local`` (default: BashOperator) or ``kubernetes``
                        (KubernetesPodOperator; needs apache-airflow-providers-cncf-kubernetes)
``MMREC_GPU_POOL``      Airflow pool of stages whose ``Stage.pool`` is ``gpu`` (default ``gpu``)
``MMREC_GPU_QUEUE``     executor queue for those stages (default: the default queue)
``MMREC_S3_CONN_ID``    Airflow connection whose login/password/extra.endpoint_url are
                        exported as AWS_* env vars to the stages in ``MMREC_S3_STAGES``
                        (default ``publish``); otherwise boto3's default chain applies
``MMREC_TRAINING_CRON`` time-based part of the training schedule (default weekly, Mon 03:00 UTC)
``MMREC_INGEST_CRON``   how often the landing zone is scanned (default every 15 minutes)
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

from airflow.sdk import Asset

PROJECT_DIR = Path(os.environ.get("MMREC_PROJECT_DIR") or Path(__file__).resolve().parent.parent)
if str(PROJECT_DIR) not in sys.path:  # so that `pipelines.graph` imports at parse time
    sys.path.insert(0, str(PROJECT_DIR))

PYTHON = os.environ.get("MMREC_PYTHON") or sys.executable
START_DATE = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
TAGS = ["mmrec"]

# The dataset: updated (asset event) by mmrec_ingest, consumed by mmrec_training.
DATASET_ASSET = Asset(name="mmrec_dataset", uri="mmrec://dataset", group="mmrec")

DEFAULT_ARGS = {
    "owner": "mmrec",
    "retries": 2,
    "retry_delay": dt.timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,  # 1 min, then 2 min
    "max_retry_delay": dt.timedelta(minutes=30),
}


def in_project(command: str) -> str:
    """A bash command run in the project dir with the project's Python.

    Defaults are baked in at parse time, but ``MMREC_PROJECT_DIR`` / ``MMREC_PYTHON``
    in the worker's environment win at run time.
    """
    return (f'cd "${{MMREC_PROJECT_DIR:-{PROJECT_DIR}}}" && '
            f'exec "${{MMREC_PYTHON:-{PYTHON}}}" {command}')
