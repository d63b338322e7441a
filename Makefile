# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONDONTWRITEBYTECODE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DEMO ?= data/demo
DATA ?= ../shared/datasets/ml100k-mm
PYTEST_ARGS ?=

.PHONY: venv run test test-fast bench bench-scale airflow lock dvc-yaml clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -r requirements.lock
	touch $@

# Re-resolve direct dependencies (requirements.in) into the lock file.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q -c constraints.txt -r requirements.in
	.venv-lock/bin/pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements.lock
	rm -rf .venv-lock

$(DEMO)/ratings.csv: | venv
	python -m pipelines generate-demo --out $(DEMO)

# Main job: demo data (generated once, deterministic) -> dvc repro -> results.
run: venv $(DEMO)/ratings.csv
	python -m pipelines dvc-yaml --check
	dvc repro
	@echo
	@echo "Results:"
	@echo "  metrics     reports/evaluate/metrics.json   (report: reports/evaluate/report.md)"
	@test ! -d artifacts/build_profiles || echo "  profiles    artifacts/build_profiles/profiles.parquet  (try: python -m pipelines profile <user_id>)"
	@test ! -d artifacts/fuse || echo "  top-K recs  artifacts/fuse/recommendations.parquet  (try: python -m pipelines recommend <user_id>)"
	@echo "  validation  reports/validate/index.html"
	@echo
	@python -m pipelines metrics reports/evaluate/metrics.json
	@echo "  (all metrics: dvc metrics show; plots: dvc plots show)"

test: venv
	python -m pytest $(PYTEST_ARGS)

test-fast: venv
	python -m pytest -m "not slow" $(PYTEST_ARGS)

dvc-yaml: venv
	python -m pipelines dvc-yaml

clean:
	rm -rf artifacts reports/validate reports/evaluate

# Benchmark: two protocols (stratified, coldstart) on DATA -> reports/bench.json
# (FUSE_SEEDS="1 2": also the hybrid at those fuse seeds, on the same upstream artifacts)
bench: venv
	python -m pipelines.bench --data $(DATA) --out reports/bench.json \
		$(if $(strip $(FUSE_SEEDS)),--fuse-seeds $(FUSE_SEEDS),)

# Scale benchmark: synthetic datasets of SIZES interactions (streamed by the generator), the whole
# graph on each plus a +5% incremental rerun -> reports/bench-scale.json and reports/bench-scale.png
SIZES ?= 1000000 5000000
bench-scale: venv
	nice -n 5 python -m pipelines.bench_scale --sizes $(SIZES) --workdir bench_runs/scale \
		--out reports/bench-scale.json

# Airflow 3 locally (SQLite, DAGs from dags/): prints the UI address and login.
airflow: venv
	scripts/airflow_local.sh

# One ingest pass over the landing zone (what the mmrec_ingest DAG runs).
ingest: venv
	python -m pipelines.ingest --landing landing --quarantine quarantine
