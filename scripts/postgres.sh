#!/usr/bin/env bash
# Start/stop a throw-away PostgreSQL server on 127.0.0.1 for the integration tests.
#   scripts/postgres.sh start   -> prints the SQLAlchemy URL on stdout (installs the Debian package if needed)
#   scripts/postgres.sh stop
set -uo pipefail
PORT="${POCKETFLOW_PG_PORT:-54329}"
DIR="${POCKETFLOW_PG_DIR:-/tmp/pocketflow-pg-$PORT}"
log() { printf '[postgres] %s\n' "$*" >&2; }

pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

as_pg() {  # the server refuses to run as root
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

case "${1:-}" in
  start)
    if [ -z "$(pgbin)" ]; then
      if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        log "installing the Debian postgresql package"
        (apt-get install -y -q postgresql >/dev/null 2>&1 || \
          { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; }) || true
      fi
    fi
    BIN="$(pgbin)"
    [ -n "$BIN" ] || { log "no PostgreSQL server available"; exit 1; }
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then log "no postgres user"; exit 1; fi
    if ! as_pg "$BIN/pg_ctl -D $DIR status" >/dev/null 2>&1; then
      rm -rf "$DIR"; mkdir -p "$DIR"
      [ "$(id -u)" = 0 ] && chown postgres "$DIR"
      as_pg "$BIN/initdb -D $DIR -A trust -U postgres" >/dev/null 2>&1 || { log "initdb failed"; exit 1; }
      as_pg "$BIN/pg_ctl -D $DIR -l $DIR/server.log -w -o '-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=100' start" >/dev/null 2>&1 \
        || { log "server did not start (see $DIR/server.log)"; exit 1; }
      as_pg "$BIN/createdb -h 127.0.0.1 -p $PORT -U postgres pocketflow_test" >/dev/null 2>&1 || true
      log "started on 127.0.0.1:$PORT"
    fi
    echo "postgresql+psycopg2://postgres:pocketflow-secret@127.0.0.1:$PORT/pocketflow_test"
    ;;
  stop)
    BIN="$(pgbin)"
    [ -n "$BIN" ] && as_pg "$BIN/pg_ctl -D $DIR -m fast stop" >/dev/null 2>&1 && log "stopped"
    rm -rf "$DIR"
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
