"""mmrec_training: the stage graph as an Airflow DAG (thin config, no logic).

One task per stage of ``pipelines.graph.STAGES``, edges ``graph.edges()``.
Each task runs ``python -m pipelines run-stage <stage>`` in the project
directory: DVC decides whether the stage is up to date (only stages whose
inputs changed recompute), the stage runs without holding any lock, and
its result is committed to ``dvc.lock`` under a short lock, so independent
stages run in parallel safely (see ``pipelines/runner.py``).

Schedule: whenever ``mmrec_ingest`` merges a new batch (asset
``mmrec://dataset``) OR weekly.  ``max_active_runs=1``: two runs would
share one working tree.

Environment knobs: see ``dags/_common.py``.
"""

from __future__ import annotations

import datetime as dt
import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # dags/ itself, for _common
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DATASET_ASSET, DEFAULT_ARGS, PROJECT_DIR, START_DATE, TAGS, in_project  # noqa: E402
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable  # noqa: E402

from pipelines import graph  # noqa: E402  (importable: _common puts the project on sys.path)

EXECUTION = os.environ.get("MMREC_EXECUTION", "local").strip().lower()
GPU_POOL = os.environ.get("MMREC_GPU_POOL", "gpu")
GPU_QUEUE = os.environ.get("MMREC_GPU_QUEUE") or None
S3_CONN_ID = os.environ.get("MMREC_S3_CONN_ID") or None
S3_STAGES = {s.strip() for s in os.environ.get("MMREC_S3_STAGES", "publish").split(",") if s.strip()}
CRON = os.environ.get("MMREC_TRAINING_CRON", "0 3 * * 1")


def pool_of(stage: graph.Stage) -> str:
    return GPU_POOL if stage.pool == "gpu" else stage.pool


def timeout_of(stage: graph.Stage) -> dt.timedelta:
    return dt.timedelta(hours=6) if (stage.heavy or stage.pool == "gpu") else dt.timedelta(hours=1)


def stage_doc(stage: graph.Stage, ups: list[str]) -> str:
    lines = [f"### Stage `{stage.name}`", "", f"Module `{stage.module}` (params section `{stage.name}`).", "",
             f"- command: `{stage.command()}`",
             f"- upstream: {', '.join(f'`{u}`' for u in ups) or '-'}",
             f"- deps: {', '.join(f'`{d}`' for d in stage.deps)}",
             f"- outs: {', '.join(f'`{o}`' for o in stage.outs)}",
             f"- pool: `{pool_of(stage)}`"]
    return "\n".join(lines)


def s3_env() -> dict[str, str]:
    """AWS_* variables templated from an Airflow connection (rendered at run time only)."""
    if not S3_CONN_ID:
        return {}
    c = f"conn['{S3_CONN_ID}']"
    return {"AWS_ACCESS_KEY_ID": f"{{{{ {c}.login }}}}",
            "AWS_SECRET_ACCESS_KEY": f"{{{{ {c}.password }}}}",
            "MMREC_S3_ENDPOINT_URL": f"{{{{ {c}.extra_dejson.get('endpoint_url', '') }}}}"}


def local_task(stage: graph.Stage, **kw):
    from airflow.providers.standard.operators.bash import BashOperator

    env = s3_env() if stage.name in S3_STAGES else {}
    return BashOperator(
        bash_command=in_project(f"-m pipelines run-stage {stage.name}"),
        env=env or None, append_env=True, **kw)


def kubernetes_task(stage: graph.Stage, **kw):
    try:
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s
    except ImportError as exc:
        raise RuntimeError(
            "MMREC_EXECUTION=kubernetes needs apache-airflow-providers-cncf-kubernetes "
            "(pip install -c constraints.txt apache-airflow-providers-cncf-kubernetes); "
            "unset MMREC_EXECUTION to run stages with BashOperator") from exc
    workdir = os.environ.get("MMREC_K8S_WORKDIR", "/workspace")
    pvc = os.environ.get("MMREC_K8S_PVC", "mmrec-workspace")
    resources = None
    if stage.pool == "gpu":
        resources = k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"})
    return KubernetesPodOperator(
        name=f"mmrec-{stage.name.replace('_', '-')}",
        namespace=os.environ.get("MMREC_K8S_NAMESPACE", "default"),
        image=os.environ.get("MMREC_IMAGE_CUDA" if stage.pool == "gpu" else "MMREC_IMAGE", "mmrec:latest"),
        cmds=["bash", "-c", f'cd "{workdir}" && exec python -m pipelines run-stage {stage.name}'],
        volumes=[k8s.V1Volume(name="workspace", persistent_volume_claim=(
            k8s.V1PersistentVolumeClaimVolumeSource(claim_name=pvc)))],
        volume_mounts=[k8s.V1VolumeMount(name="workspace", mount_path=workdir)],
        container_resources=resources,
        get_logs=True, on_finish_action="delete_pod", **kw)


if EXECUTION not in ("local", "kubernetes"):
    raise ValueError(f"MMREC_EXECUTION={EXECUTION!r}: expected 'local' or 'kubernetes'")
make_task = kubernetes_task if EXECUTION == "kubernetes" else local_task

with DAG(
    dag_id="mmrec_training",
    description="mmrec stage graph (DVC-aware): validate -> ... -> evaluate -> publish",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(CRON, timezone="UTC"),
                                 assets=[DATASET_ASSET]),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS + ["training"],
    doc_md=__doc__ + f"\n\nProject directory at parse time: `{PROJECT_DIR}`.",
) as dag:
    edges = graph.edges()
    tasks = {}
    for stage in graph.STAGES:
        ups = sorted(u for u, d in edges if d == stage.name)
        extra = {"queue": GPU_QUEUE} if (stage.pool == "gpu" and GPU_QUEUE) else {}
        tasks[stage.name] = make_task(
            stage, task_id=stage.name, pool=pool_of(stage), execution_timeout=timeout_of(stage),
            doc_md=stage_doc(stage, ups), **extra)
    for up, down in sorted(edges):
        tasks[up] >> tasks[down]
