# Sourced by infra/postgres-server.sh and infra/local-servers.sh: pg_bin prints the folder of
# PostgreSQL's server binaries (initdb, postgres, psql, pg_isready): PG_BIN, else the real
# folder of the initdb on PATH (a symlink there leads to the folder that also holds psql),
# else the newest /usr/lib/postgresql/*/bin (Debian's layout, not on PATH).
pg_bin() {
  if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
  if command -v initdb >/dev/null; then dirname "$(realpath "$(command -v initdb)")"; return; fi
  local newest
  newest="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [[ -z "$newest" ]]; then
    echo "no PostgreSQL server binaries: install PostgreSQL (apt-get install postgresql)" \
      "or set PG_BIN to the folder that holds initdb and postgres" >&2
    return 1
  fi
  echo "$newest"
}
