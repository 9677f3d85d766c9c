#!/usr/bin/env bash
# Install (Debian package), start and prepare a throw-away PostgreSQL server on loopback
# for the ledger tests, then print its SQLAlchemy URL as the last line of stdout.
#
#   export CELLATLAS_TEST_POSTGRES_URL="$(bash scripts/ci_postgres.sh)"
#
# Idempotent: a second run reuses the running cluster. Everything but the URL goes to
# stderr. Settings (environment): CELLATLAS_PG_PORT (54329), CELLATLAS_PG_DIR
# (/tmp/cellatlas-pg), CELLATLAS_PG_USER / CELLATLAS_PG_PASSWORD / CELLATLAS_PG_DB.
set -euo pipefail

PORT="${CELLATLAS_PG_PORT:-54329}"
BASE="${CELLATLAS_PG_DIR:-/tmp/cellatlas-pg}"
PGUSER_NAME="${CELLATLAS_PG_USER:-cellatlas}"
PGPASS="${CELLATLAS_PG_PASSWORD:-cellatlas}"
PGDB="${CELLATLAS_PG_DB:-cellatlas_test}"
DATA="$BASE/data"
SOCK="$BASE/sock"

log() { echo "[ci_postgres] $*" >&2; }

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  return 1
}

as_postgres() {
  if [ "$(id -u)" = "0" ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

BINDIR="$(find_bindir || true)"
if [ -z "$BINDIR" ]; then
  log "PostgreSQL not found: installing the Debian package"
  if [ "$(id -u)" != "0" ]; then
    log "need root to apt-get install postgresql"; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  BINDIR="$(find_bindir)"
fi
log "using $BINDIR"

mkdir -p "$BASE" "$SOCK"
if [ "$(id -u)" = "0" ]; then chown -R postgres: "$BASE"; fi

if [ ! -f "$DATA/PG_VERSION" ]; then
  log "initdb $DATA"
  as_postgres "$BINDIR/initdb" -D "$DATA" -A trust -U postgres --encoding=UTF8 --locale=C.UTF-8 >&2 \
    || as_postgres "$BINDIR/initdb" -D "$DATA" -A trust -U postgres --encoding=UTF8 >&2
fi

if as_postgres "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  log "server already running"
else
  log "starting on 127.0.0.1:$PORT"
  as_postgres "$BINDIR/pg_ctl" -D "$DATA" -l "$BASE/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK -c fsync=off -c max_connections=200" >&2
fi

PSQL=("$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
for _ in $(seq 1 30); do
  if as_postgres "${PSQL[@]}" -d postgres -c "select 1" >/dev/null 2>&1; then break; fi
  sleep 1
done

if [ "$(as_postgres "${PSQL[@]}" -d postgres -c "select 1 from pg_roles where rolname='$PGUSER_NAME'")" != "1" ]; then
  as_postgres "${PSQL[@]}" -d postgres -c "create role \"$PGUSER_NAME\" login password '$PGPASS'" >&2
fi
if [ "$(as_postgres "${PSQL[@]}" -d postgres -c "select 1 from pg_database where datname='$PGDB'")" != "1" ]; then
  as_postgres "${PSQL[@]}" -d postgres -c "create database \"$PGDB\" owner \"$PGUSER_NAME\"" >&2
fi
log "ready: database $PGDB, role $PGUSER_NAME"
echo "postgresql+psycopg://$PGUSER_NAME:$PGPASS@127.0.0.1:$PORT/$PGDB"
