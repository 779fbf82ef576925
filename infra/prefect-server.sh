#!/usr/bin/env bash
# Start a Prefect API + UI on 127.0.0.1 (state in $PREFECT_HOME, default ~/.prefect).
# Usage: infra/prefect-server.sh [PORT]   then: export PREFECT_API_URL=http://127.0.0.1:PORT/api
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-4200}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/prefect server start --host 127.0.0.1 --port "$port"
