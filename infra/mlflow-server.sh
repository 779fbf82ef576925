#!/usr/bin/env bash
# Start an MLflow tracking server on 127.0.0.1 over the project's SQLite store.
# Usage: infra/mlflow-server.sh [PORT]   then: export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT
# MLFLOW_BACKEND_STORE_URI / MLFLOW_ARTIFACTS_DESTINATION override the store (default: the
# project's mlflow.db and mlruns/, the same store the embedded mode writes).
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-5000}"
export MLFLOW_DISABLE_TELEMETRY=true
# MLflow's job runner (GenAI scorers) forks ~8 processes; browsing and tracking runs need none.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec .venv/bin/mlflow server \
  --host 127.0.0.1 --port "$port" --workers 1 \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlruns}"
