"""`make airflow` (scripts/airflow_local.sh): Airflow 3 starts with the project's DAGs, and the
address and login it prints work.

The script runs for real (``airflow standalone``: api-server, scheduler, dag-processor,
triggerer) with a temp AIRFLOW_HOME and free ports; the test reads the printed banner, logs in
through the simple auth manager's token endpoint with the printed password, and asks the REST
API for the DAGs, the ``gpu`` pool and import errors.  Then it stops the whole process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures import ROOT
from tests.s3_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _get(url: str, token: str | None = None, data: dict | None = None):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_make_airflow_starts_the_ui_with_the_project_dags_and_a_working_login(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                "VENV": str(Path(sys.executable).parent.parent), "PYTHONPATH": ""})
    out = tmp_path / "out.log"
    with out.open("w") as fh:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "airflow_local.sh")], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, text, dags = time.monotonic() + 300, "", {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()[-4000:]
            text = out.read_text()
            if "login:" in text:
                break
            time.sleep(2)
        ui = re.search(r"Airflow UI:\s+(http://\S+)", text)
        login = re.search(r"login:\s+admin / (\S+)", text)
        assert ui and login, text[-4000:]
        assert ui.group(1) == f"http://localhost:{port}"
        token = _get(f"{ui.group(1)}/auth/token", data={"username": "admin", "password": login.group(1)})
        token = token["access_token"]
        while time.monotonic() < deadline:  # the dag-processor parses dags/ shortly after start
            dags = {d["dag_id"]: d for d in _get(f"{ui.group(1)}/api/v2/dags", token)["dags"]}
            if {"mmrec_training", "mmrec_ingest"} <= set(dags):
                break
            time.sleep(3)
        assert {"mmrec_training", "mmrec_ingest"} <= set(dags), (dags, text[-3000:])
        assert all(dags[d]["is_paused"] for d in ("mmrec_training", "mmrec_ingest"))
        assert str(ROOT / "dags") in dags["mmrec_training"]["fileloc"]
        assert _get(f"{ui.group(1)}/api/v2/importErrors", token)["total_entries"] == 0
        pools = {p["name"]: p for p in _get(f"{ui.group(1)}/api/v2/pools", token)["pools"]}
        assert pools["gpu"]["slots"] == 1
        tasks = {t["task_id"] for t in _get(f"{ui.group(1)}/api/v2/dags/mmrec_training/tasks", token)["tasks"]}
        assert "train_encoder" in tasks and "publish" in tasks
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(2)
        try:  # nothing of the group may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
