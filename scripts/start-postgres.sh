#!/usr/bin/env bash
# Start (or reuse) a throwaway PostgreSQL cluster for tests, listening only on
# 127.0.0.1, with trust authentication, and make sure the database gyoza_test exists.
# Idempotent. Prints the SQLAlchemy URL of gyoza_test on stdout (and nothing else);
# progress goes to stderr, so `url=$(scripts/start-postgres.sh)` works.
#
# Run as root, the cluster belongs to the `postgres` user; run as anyone else, it
# belongs to that user.
#
#   GYOZA_PG_PORT  port (default 54329)
#   GYOZA_PG_DATA  data directory (default /var/tmp/gyoza-pg-<port>, or
#                  /var/tmp/gyoza-pg-<user>-<port> when not root)
#   GYOZA_PG_BIN   directory holding initdb and pg_ctl (default: the newest
#                  /usr/lib/postgresql/*/bin)
#   GYOZA_PG_WAIT  seconds to wait for the server to start (default 60)
set -euo pipefail

port=${GYOZA_PG_PORT:-54329}
wait_s=${GYOZA_PG_WAIT:-60}
dbname=gyoza_test

log() { echo "start-postgres: $*" >&2; }

if [ "$(id -u)" -eq 0 ]; then
    owner=postgres
    default_data=/var/tmp/gyoza-pg-$port
else
    owner=$(id -un)
    default_data=/var/tmp/gyoza-pg-$owner-$port
fi
data=${GYOZA_PG_DATA:-$default_data}
logfile=$data.log

bin=${GYOZA_PG_BIN:-}
if [ -z "$bin" ]; then
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ] || [ ! -x "$bin/pg_ctl" ]; then
    log "PostgreSQL server binaries not found; run scripts/install-system.sh as root"
    exit 1
fi

# Run a command as the cluster's owner (PostgreSQL refuses to run as root).
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$owner" -- "$@"
    else
        "$@"
    fi
}

if [ ! -s "$data/PG_VERSION" ]; then
    log "initialising a cluster in $data"
    parent=$(dirname "$data")
    mkdir -p "$parent"
    rm -rf "$data"
    mkdir -m 700 "$data"
    touch "$logfile"
    if [ "$(id -u)" -eq 0 ]; then
        chown "$owner:" "$data" "$logfile"
    fi
    as_owner "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C \
        >"$data.initdb.log" 2>&1 || {
        cat "$data.initdb.log" >&2
        log "initdb failed"
        exit 1
    }
    cat >>"$data/postgresql.conf" <<CONF

# gyoza test cluster
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
max_connections = 200
CONF
fi

if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "PostgreSQL already running ($data)"
else
    log "starting PostgreSQL on 127.0.0.1:$port (log: $logfile)"
    # The options repeat the config so that GYOZA_PG_PORT always wins.
    if ! as_owner "$bin/pg_ctl" -D "$data" -l "$logfile" -w -t "$wait_s" \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$data" \
        start >/dev/null; then
        tail -n 30 "$logfile" >&2 || true
        log "PostgreSQL failed to start"
        exit 1
    fi
fi

psql_q() {
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc "$1"
}

deadline=$((SECONDS + wait_s))
until psql_q 'SELECT 1' >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "PostgreSQL does not answer on 127.0.0.1:$port; last lines of $logfile:"
        tail -n 30 "$logfile" >&2 || true
        exit 1
    fi
    sleep 0.5
done

if [ "$(psql_q "SELECT 1 FROM pg_database WHERE datname = '$dbname'")" != 1 ]; then
    log "creating database $dbname"
    psql_q "CREATE DATABASE $dbname" >/dev/null
fi

echo "postgresql+psycopg://postgres@127.0.0.1:$port/$dbname"
