#!/usr/bin/env bash
# PostgreSQL on 127.0.0.1 for the local stack: the one database server of MLflow and Prefect.
# Usage: infra/postgres-server.sh [PORT]      (what `make up` runs; foreground, TCP only)
#
# Data: $PEFTFLOW_STATE_DIR/postgres (default .stack/postgres), created by initdb on the
# first start and kept by `make down`. The binaries: infra/pg-bin.sh (PG_BIN, PATH, or
# Debian's /usr/lib/postgresql/*/bin). initdb and postgres refuse to
# run as root, so as root they run as the system user "postgres", which owns the folder.
# Connections from 127.0.0.1 are trusted: the server never listens anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-5432}"
state="$(realpath -m "${PEFTFLOW_STATE_DIR:-.stack}")"
data="$state/postgres"

. infra/pg-bin.sh
bin="$(pg_bin)"

owner=()  # initdb and postgres run as the data folder's owner
[[ "$EUID" -eq 0 ]] && owner=(runuser -u postgres --)

mkdir -p "$data"
if [[ "$EUID" -eq 0 ]]; then
  chown postgres: "$data"
  if ! runuser -u postgres -- test -w "$data"; then
    echo "the system user postgres cannot reach $data (a parent folder is private to root);" \
      "set PEFTFLOW_STATE_DIR to a folder whose parents others may enter" >&2
    exit 1
  fi
fi
if [[ ! -s "$data/PG_VERSION" ]]; then
  "${owner[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 >/dev/null
fi
# No Unix socket: clients reach it on 127.0.0.1 only, as they would a managed Postgres.
exec "${owner[@]}" "$bin/postgres" -D "$data" -h 127.0.0.1 -p "$port" -c unix_socket_directories=
