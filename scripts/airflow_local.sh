#!/usr/bin/env bash
# Run Airflow 3 locally for mmrec (SQLite, LocalExecutor, no examples):
#   scripts/airflow_local.sh            # `airflow standalone`: api-server + scheduler + dag-processor + triggerer
#   scripts/airflow_local.sh --init     # only migrate the DB and create the pools, then exit
#
# AIRFLOW_HOME=airflow_home (git-ignored), DAGs from dags/, the project's venv.
# Login: simple auth manager, user "admin"; its password is generated on the first start into
# airflow_home/simple_auth_manager_passwords.json.generated and printed below.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/airflow_home}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
export MMREC_PROJECT_DIR="$ROOT"
export MMREC_PYTHON="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
GPU_POOL="${MMREC_GPU_POOL:-gpu}"
GPU_SLOTS="${MMREC_GPU_SLOTS:-1}"
PASSWORDS="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"

mkdir -p "$AIRFLOW_HOME"
cd "$ROOT"
airflow db migrate >/dev/null
airflow pools set "$GPU_POOL" "$GPU_SLOTS" "mmrec stages with Stage.pool == gpu" >/dev/null
echo "pools: default_pool, $GPU_POOL ($GPU_SLOTS slot(s))"
[[ "${1:-}" == "--init" ]] && exit 0

airflow standalone &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true' INT TERM EXIT

for _ in $(seq 1 180); do  # the password file appears once the api-server has started
    [[ -s "$PASSWORDS" ]] && break
    kill -0 "$PID" 2>/dev/null || { echo "airflow standalone exited" >&2; exit 1; }
    sleep 1
done
for _ in $(seq 1 180); do  # ... and the UI answers a little later: print the address only then
    python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://localhost:$AIRFLOW__API__PORT/api/v2/version" 2>/dev/null && break
    kill -0 "$PID" 2>/dev/null || { echo "airflow standalone exited" >&2; exit 1; }
    sleep 1
done
echo
echo "================================================================"
echo " Airflow UI:  http://localhost:$AIRFLOW__API__PORT"
if [[ -s "$PASSWORDS" ]]; then
    echo " login:       $(python -c 'import json,sys; d=json.load(open(sys.argv[1])); print("  ".join(f"{u} / {p}" for u, p in d.items()))' "$PASSWORDS")"
else
    echo " login:       admin / (see $PASSWORDS once the api-server is up)"
fi
echo " DAGs:        mmrec_training (asset mmrec://dataset OR weekly), mmrec_ingest (landing/ every 15 min)"
echo " AIRFLOW_HOME=$AIRFLOW_HOME   stop with Ctrl-C"
echo "================================================================"
wait "$PID"
