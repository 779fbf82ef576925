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
# MLFLOW_AUTH=basic turns on MLflow's basic-auth app (users, per-experiment permissions).
# It needs MLFLOW_AUTH_CONFIG_PATH (an ini naming the admin user, its password and the
# users database) and MLFLOW_FLASK_SERVER_SECRET_KEY: MLflow's built-in admin password
# is public, so this script refuses to start auth without both. Clients then set
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. See docs/reliability.md.
auth_args=()
case "${MLFLOW_AUTH:-none}" in
  none) ;;
  basic)
    : "${MLFLOW_AUTH_CONFIG_PATH:?MLFLOW_AUTH=basic needs MLFLOW_AUTH_CONFIG_PATH (an auth ini with your own admin password)}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_AUTH=basic needs MLFLOW_FLASK_SERVER_SECRET_KEY (a long random string)}"
    auth_args=(--app-name basic-auth) ;;
  *) echo "MLFLOW_AUTH must be none or basic, got '${MLFLOW_AUTH}'" >&2; exit 2 ;;
esac
exec .venv/bin/mlflow server "${auth_args[@]}" \
  --host 127.0.0.1 --port "$port" --workers 1 \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlruns}"
