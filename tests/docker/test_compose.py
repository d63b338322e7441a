"""docker/: the compose stack and the Dockerfiles, validated without a Docker engine.

This machine has a Docker client but neither an engine nor the ``compose`` plugin
(``docker compose version`` fails), so ``docker compose config`` cannot run here; the test
that runs it is skipped unless the plugin is present.  What is checked instead:

* the compose file against the Compose Specification's JSON schema
  (``compose-spec.schema.json``: the ``compose-spec`` project's ``compose-spec.json``, Apache-2.0,
  as shipped in the npm package ``dclint`` 3.1.0), before and after ``${VAR:-default}``
  interpolation, which is done here as compose does it for the forms the file uses;
* what the schema cannot see: references between services, volumes and build files, the
  Airflow 3 components, every ``AIRFLOW__SECTION__KEY`` being a real option of the installed
  Airflow, the paths the project expects inside the containers, the S3 wiring, secrets only
  as overridable ``${...}`` defaults;
* the Dockerfiles' ``COPY`` sources exist and ``docker build`` context exclusions keep data out.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jsonschema
import pytest
import yaml

from tests.fixtures import ROOT

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
SCHEMA = json.loads((ROOT / "tests" / "docker" / "compose-spec.schema.json").read_text())
AIRFLOW_COMPONENTS = {"api-server", "scheduler", "dag-processor", "triggerer"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves anchors and `<<` merge keys


def interpolate(node, env: dict):
    """``${VAR}`` / ``${VAR:-default}`` / ``${VAR-default}`` as compose does; ``$$`` -> ``$``."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        out = _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), node)
        return out.replace("$$", "$")
    return node


def schema_errors(doc: dict) -> list[str]:
    v = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load()


@pytest.fixture(scope="module")
def resolved(compose) -> dict:
    return interpolate(compose, {})  # no .env: the defaults must give a complete stack


def test_compose_file_matches_the_compose_specification(compose, resolved):
    assert schema_errors(compose) == []
    assert schema_errors(resolved) == []


def test_the_schema_check_rejects_broken_files(compose):
    """The validator is not vacuous: typical mistakes are reported with their path."""
    bad = copy.deepcopy(compose)
    bad["services"]["airflow-scheduler"]["depends_on"]["postgres"]["condition"] = "service_ready"
    bad["services"]["postgres"]["healthcheck"]["interval"] = ["5s"]
    bad["services"]["minio"]["portz"] = ["9000:9000"]
    errs = schema_errors(bad)
    assert any(e.startswith("services/airflow-scheduler/depends_on") and "service_ready" in e for e in errs), errs
    assert any(e.startswith("services/postgres/healthcheck/interval") for e in errs), errs
    assert any(e.startswith("services/minio") and "portz" in e for e in errs), errs


def test_every_variable_has_a_default_and_secrets_are_overridable(compose):
    text = COMPOSE.read_text()
    no_default = [m.group(0) for m in _VAR.finditer(text) if m.group(2) is None]
    assert no_default == [], f"{COMPOSE.name}: variables without a default: {no_default}"
    env = compose["x-airflow-common"]["environment"]
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        assert _VAR.fullmatch(str(env[key])), f"{key} must come from a ${{VAR:-dev default}} (docker/.env)"
    assert "${POSTGRES_PASSWORD" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


def test_services_references_and_airflow_components(resolved):
    services = resolved["services"]
    declared_volumes = set(resolved.get("volumes") or {})
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"service {name}: depends_on unknown service {dep!r}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") in (None, "no"), f"{dep} is a one-shot job"
        assert "image" in svc or "build" in svc, name
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (DOCKER / src).resolve() == ROOT, f"{name}: bind mount {src} is not the checkout"
            else:
                assert src in declared_volumes, f"{name}: volume {src!r} not declared at top level"
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"]).resolve() == ROOT, name
            assert (ROOT / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"

    # no dependency cycle (compose refuses one)
    order, seen = [], set()

    def visit(n, stack=()):
        assert n not in stack, f"depends_on cycle: {' -> '.join(stack + (n,))}"
        if n not in seen:
            for d in services[n].get("depends_on") or {}:
                visit(d, stack + (n,))
            seen.add(n)
            order.append(n)

    for n in services:
        visit(n)
    commands = {tuple(s.get("command") or ()) for s in services.values() if s.get("entrypoint") == ["airflow"]}
    assert {c[0] for c in commands if c} >= AIRFLOW_COMPONENTS  # Airflow 3: dag-processor is separate
    assert order.index("airflow-init") < order.index("airflow-scheduler")
    init = " ".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init and "pools set gpu" in init


def test_environment_is_what_the_project_and_airflow_expect(resolved, tmp_path):
    services = resolved["services"]
    env = services["airflow-scheduler"]["environment"]
    mount = next(v.split(":")[1] for v in services["airflow-scheduler"]["volumes"] if v.startswith(".."))
    assert env["MMREC_PROJECT_DIR"] == mount and env["AIRFLOW__CORE__DAGS_FOLDER"] == f"{mount}/dags"
    assert env["MMREC_GPU_POOL"] == "gpu"
    assert "@postgres:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-api-server:8080/")
    # S3: MinIO from the other services, buckets created by minio-init, credentials shared
    assert env["MMREC_S3_ENDPOINT_URL"] == "http://minio:9000"
    bucket = env["MMREC_LANDING"].removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(services["minio-init"]["command"])
    minio = services["minio"]["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (minio["MINIO_ROOT_USER"],
                                                                        minio["MINIO_ROOT_PASSWORD"])
    # every AIRFLOW__SECTION__KEY is an option of the installed Airflow (typos, renamed options)
    options = sorted({k for s in services.values() for k in (s.get("environment") or {})
                      if k.startswith("AIRFLOW__")})
    probe = textwrap.dedent("""
        import json, sys
        from airflow.configuration import conf
        desc = conf.configuration_description
        print(json.dumps([k for k in sys.argv[1:]
                          if k.split("__")[2].lower() not in desc.get(k.split("__")[1].lower(), {}).get("options", {})]))
        """)
    e = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    e["AIRFLOW_HOME"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", probe, *options], env=e, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [], "unknown Airflow options in compose"
    assert len(options) >= 8


def test_dockerfiles_copy_existing_files_and_keep_data_out():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        assert re.search(r"^FROM \S+", text, re.M), name
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            *srcs, _dest = line.split()
            for src in srcs:
                assert src == "." or (ROOT / src).exists(), f"{name}: COPY source {src} missing"
        assert re.search(r'^ENTRYPOINT \["python", "-m", "pipelines"\]', text, re.M), name
        ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
        for path in (".git", ".venv", "data", "artifacts", ".dvc/cache", "airflow_home"):
            assert path in ignore, f"{name}.dockerignore must exclude {path}"


def _compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    res = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return res.returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="`docker compose` plugin not installed here")
def test_docker_compose_config():
    res = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
