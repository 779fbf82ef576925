#!/usr/bin/env bash
# The production-shaped stack on 127.0.0.1, no Docker (what `make up/down/status` run):
# PostgreSQL (the database of MLflow and Prefect), an S3-API object store (MLflow's artifacts
# and the DVC remote), the MLflow server and the Prefect server. infra/docker-compose.yml is
# the same topology in containers.
#
#   infra/local-servers.sh up       start all four in the background (idempotent), wait until
#                                   healthy, create the databases and the process work pool
#                                   "cpu", print the client's export lines (also written to
#                                   $RUN_DIR/stack.env)
#   infra/local-servers.sh down     stop all four (their whole process groups); data is kept
#   infra/local-servers.sh status   say what runs where
#
# Pid files and logs: .run/<server>.{pid,log} (PEFTFLOW_RUN_DIR moves them). Everything the
# servers store (Postgres data, S3 buckets) lives in .stack/ (PEFTFLOW_STATE_DIR moves it),
# so `down` then `up` keeps every run, model version, flow run and data version.
# Ports: PG_PORT (5432), S3_PORT (9000), PREFECT_PORT (4200), MLFLOW_PORT (5000).
# MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION and PREFECT_API_DATABASE_CONNECTION_URL
# override the stores (for example a managed Postgres and a real bucket: docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. infra/pg-bin.sh

RUN_DIR="${PEFTFLOW_RUN_DIR:-.run}"
export PEFTFLOW_STATE_DIR="${PEFTFLOW_STATE_DIR:-.stack}"
PG_PORT="${PG_PORT:-5432}"
S3_PORT="${S3_PORT:-9000}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
STARTUP_TIMEOUT_S="${STARTUP_TIMEOUT_S:-180}"
PY=.venv/bin/python
SERVERS=(postgres s3 prefect mlflow)  # start order; `down` stops them in reverse
PREFECT_API="http://127.0.0.1:${PREFECT_PORT}/api"
# With PREFECT_SERVER_API_AUTH_STRING (user:password) the Prefect server asks every client
# for it; this script's own client calls (the work pool) send the same string.
if [[ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]]; then
  export PREFECT_API_AUTH_STRING="${PREFECT_API_AUTH_STRING:-$PREFECT_SERVER_API_AUTH_STRING}"
fi
MLFLOW_URL="http://127.0.0.1:${MLFLOW_PORT}"
S3_URL="http://127.0.0.1:${S3_PORT}"
# The local store's fixed key pair (infra/s3-server.sh); a real bucket uses your own.
S3_KEY="${AWS_ACCESS_KEY_ID:-S3RVER}"
S3_SECRET="${AWS_SECRET_ACCESS_KEY:-S3RVER}"
PG_URL="127.0.0.1:${PG_PORT}"

server_env() {  # name -> the environment its start script runs with
  case "$1" in
    mlflow)
      echo "MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-postgresql+psycopg://mlflow:mlflow@${PG_URL}/mlflow}"
      echo "MLFLOW_ARTIFACTS_DESTINATION=${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow/}"
      echo "MLFLOW_S3_ENDPOINT_URL=${MLFLOW_S3_ENDPOINT_URL:-$S3_URL}"
      echo "AWS_ACCESS_KEY_ID=$S3_KEY"
      echo "AWS_SECRET_ACCESS_KEY=$S3_SECRET"
      ;;
    prefect)
      echo "PREFECT_API_DATABASE_CONNECTION_URL=${PREFECT_API_DATABASE_CONNECTION_URL:-postgresql+asyncpg://prefect:prefect@${PG_URL}/prefect}"
      ;;
  esac
}

client_env() {  # what a client (CLI, flow, worker) of this stack exports
  echo "PREFECT_API_URL=$PREFECT_API"
  echo "MLFLOW_TRACKING_URI=$MLFLOW_URL"
  echo "PEFTFLOW_DVC_REMOTE=s3://dvc/peftflow"
  echo "AWS_ENDPOINT_URL_S3=$S3_URL"
  echo "AWS_ACCESS_KEY_ID=$S3_KEY"
  echo "AWS_SECRET_ACCESS_KEY=$S3_SECRET"
}

health_url() {  # name -> where it answers when ready
  case "$1" in
    postgres) echo "postgresql://${PG_URL}" ;;
    s3) echo "$S3_URL/" ;;
    prefect) echo "${PREFECT_API}/health" ;;
    mlflow) echo "${MLFLOW_URL}/health" ;;
  esac
}

port_of() {
  case "$1" in
    postgres) echo "$PG_PORT" ;;
    s3) echo "$S3_PORT" ;;
    prefect) echo "$PREFECT_PORT" ;;
    mlflow) echo "$MLFLOW_PORT" ;;
  esac
}

psql_() {  # psql as the superuser, against the stack's Postgres
  "$(pg_bin)/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

healthy() {
  if [[ "$1" == postgres ]]; then
    "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
    return
  fi
  "$PY" - "$(health_url "$1")" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

port_busy() {
  "$PY" - "$1" <<'EOF'
import socket, sys
with socket.socket() as sock:
    sys.exit(0 if sock.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
EOF
}

running_pid() {  # prints the pid when the pid file names a live process
  local pid_file="$RUN_DIR/$1.pid"
  [[ -f "$pid_file" ]] || return 1
  local pid
  pid="$(cat "$pid_file")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    echo "$pid"
    return 0
  fi
  rm -f "$pid_file"  # stale: the process is gone
  return 1
}

start() {
  local name="$1" pid
  if pid="$(running_pid "$name")"; then
    echo "$name: already running (pid $pid)"
    return 0
  fi
  if port_busy "$(port_of "$name")"; then
    echo "$name: port $(port_of "$name") on 127.0.0.1 is taken by a process not started here;" \
      "stop it or choose another port (make up ${name^^}_PORT=...)" >&2
    return 1
  fi
  # setsid: the server leads its own process group, so `down` stops uvicorn/gunicorn children too.
  local -a environment
  mapfile -t environment < <(server_env "$name")
  env "${environment[@]}" setsid "infra/${name}-server.sh" "$(port_of "$name")" \
    >"$RUN_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  echo "$name: starting (pid $!, log $RUN_DIR/$name.log)"
}

wait_healthy() {
  local name="$1" waited=0
  until healthy "$name"; do
    if ! running_pid "$name" >/dev/null; then
      echo "$name: exited during start-up; last lines of $RUN_DIR/$name.log:" >&2
      tail -n 30 "$RUN_DIR/$name.log" >&2 || true
      return 1
    fi
    if ((waited >= STARTUP_TIMEOUT_S)); then
      echo "$name: not healthy after ${STARTUP_TIMEOUT_S} s (see $RUN_DIR/$name.log)" >&2
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "$name: healthy at $(health_url "$name")"
}

stop() {
  local name="$1" pid
  if ! pid="$(running_pid "$name")"; then
    echo "$name: not running"
    rm -f "$RUN_DIR/$name.pid"
    return 0
  fi
  # Postgres waits for its clients to leave on TERM; INT is its fast, clean shutdown.
  local signal=TERM
  [[ "$name" == postgres ]] && signal=INT
  kill "-$signal" -- "-$pid" 2>/dev/null || kill "-$signal" "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN_DIR/$name.pid"
  echo "$name: stopped (pid $pid)"
}

ensure_databases() {  # infra/postgres-init.sql once, as compose's Postgres image does
  if [[ "$(psql_ -c "SELECT 1 FROM pg_database WHERE datname = 'prefect'")" == 1 ]]; then
    echo "postgres: databases mlflow and prefect exist"
  else
    psql_ -f infra/postgres-init.sql >/dev/null
    echo "postgres: databases mlflow and prefect created"
  fi
}

ensure_pool() {
  if PREFECT_API_URL="$PREFECT_API" .venv/bin/prefect work-pool inspect cpu >/dev/null 2>&1; then
    echo "work pool cpu: exists"
  else
    PREFECT_API_URL="$PREFECT_API" .venv/bin/prefect work-pool create cpu --type process >/dev/null
    echo "work pool cpu: created (process)"
  fi
}

status() {
  local name pid rc=0
  for name in "${SERVERS[@]}"; do
    if pid="$(running_pid "$name")"; then
      if healthy "$name"; then
        echo "$name: running (pid $pid), healthy at $(health_url "$name")"
      else
        echo "$name: running (pid $pid), not answering yet at $(health_url "$name")"
      fi
    else
      echo "$name: not running"
      rc=3
    fi
  done
  return "$rc"
}

case "${1:-}" in
  up)
    mkdir -p "$RUN_DIR"
    start postgres
    start s3
    wait_healthy postgres
    ensure_databases
    start prefect
    start mlflow
    wait_healthy s3
    wait_healthy prefect
    wait_healthy mlflow
    ensure_pool
    client_env >"$RUN_DIR/stack.env"
    echo
    echo "# Use the stack from this shell (also in $RUN_DIR/stack.env):"
    client_env | sed 's/^/export /'
    echo "# UIs: http://127.0.0.1:${PREFECT_PORT} (Prefect), $MLFLOW_URL (MLflow)"
    ;;
  down)
    stop mlflow
    stop prefect
    stop s3
    stop postgres
    ;;
  status)
    status
    ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
