#!/usr/bin/env bash
# Start an MLflow tracking server on 127.0.0.1 over the project's SQLite store.
# Usage: infra/mlflow-server.sh [PORT]   then: export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-5000}"
export MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/mlflow server \
  --host 127.0.0.1 --port "$port" --workers 1 \
  --backend-store-uri "sqlite:///$PWD/mlflow.db" \
  --artifacts-destination "$PWD/mlruns"
