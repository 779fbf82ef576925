#!/usr/bin/env bash
# Prefect + MLflow servers on 127.0.0.1 for this machine, no Docker (what `make up/down/status` run).
#
#   infra/local-servers.sh up       start both in the background (idempotent), wait until healthy,
#                                   create the process work pool "cpu", print the export lines
#   infra/local-servers.sh down     stop both (their whole process groups), remove the pid files
#   infra/local-servers.sh status   say what runs where
#
# Pid files and logs: .run/{prefect,mlflow}.{pid,log} (PEFTFLOW_RUN_DIR moves them).
# Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000). Prefect keeps its state in $PREFECT_HOME
# (default ~/.prefect); MLflow serves the project's own store (mlflow.db + mlruns/, the one
# the embedded mode writes) unless MLFLOW_BACKEND_STORE_URI says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR="${PEFTFLOW_RUN_DIR:-.run}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
STARTUP_TIMEOUT_S="${STARTUP_TIMEOUT_S:-180}"
PY=.venv/bin/python
PREFECT_API="http://127.0.0.1:${PREFECT_PORT}/api"
# With PREFECT_SERVER_API_AUTH_STRING (user:password) the Prefect server asks every client
# for it; this script's own client calls (the work pool) send the same string.
if [[ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]]; then
  export PREFECT_API_AUTH_STRING="${PREFECT_API_AUTH_STRING:-$PREFECT_SERVER_API_AUTH_STRING}"
fi
MLFLOW_URL="http://127.0.0.1:${MLFLOW_PORT}"

health_url() {  # name -> URL that answers 200 when the server is ready
  case "$1" in
    prefect) echo "${PREFECT_API}/health" ;;
    mlflow) echo "${MLFLOW_URL}/health" ;;
  esac
}

port_of() {
  case "$1" in
    prefect) echo "$PREFECT_PORT" ;;
    mlflow) echo "$MLFLOW_PORT" ;;
  esac
}

healthy() {
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
  setsid "infra/${name}-server.sh" "$(port_of "$name")" >"$RUN_DIR/$name.log" 2>&1 </dev/null &
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
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
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
  for name in prefect mlflow; do
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
    start prefect
    start mlflow
    wait_healthy prefect
    wait_healthy mlflow
    ensure_pool
    echo
    echo "# Use the servers from this shell:"
    echo "export PREFECT_API_URL=$PREFECT_API"
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
    echo "# UIs: http://127.0.0.1:${PREFECT_PORT} (Prefect), $MLFLOW_URL (MLflow)"
    ;;
  down)
    stop mlflow
    stop prefect
    ;;
  status)
    status
    ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
