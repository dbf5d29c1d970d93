#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the multi-worker tests (and for trying
# several workers by hand). Prints the line that exports its URL, so:
#
#   eval "$(bash .ci/postgres.sh)"         # install if needed (root), start, export the URL
#   .venv/bin/python -m pytest tests/test_postgres.py
#   bash .ci/postgres.sh stop               # stop it (the data folder is kept for the next start)
#
# It uses Debian's postgresql package (installed with apt-get when missing and we are root,
# unless PRUNE_SEARCH_PG_NO_INSTALL=1), its own data folder (PRUNE_SEARCH_PG_DIR, default
# /tmp/prune-search-postgres) and port (PRUNE_SEARCH_PG_PORT, default 54329), listens on the
# loopback address only and trusts local connections: it is for tests, never for real data.
set -euo pipefail

DIR="${PRUNE_SEARCH_PG_DIR:-/tmp/prune-search-postgres}"
PORT="${PRUNE_SEARCH_PG_PORT:-54329}"
DB=prune_search_test

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

BIN="$(find_bin)"
if [[ -z "$BIN" ]]; then
    if [[ "${PRUNE_SEARCH_PG_NO_INSTALL:-0}" == 1 || $(id -u) -ne 0 ]]; then
        echo "postgres.sh: PostgreSQL is not installed (apt-get install postgresql, as root)" >&2
        exit 1
    fi
    echo "postgres.sh: installing Debian's postgresql package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BIN="$(find_bin)"
fi

# initdb and the server refuse to run as root: run them as the postgres user then.
if [[ $(id -u) -eq 0 ]]; then
    AS=(runuser -u postgres --)
else
    AS=()
fi

if [[ "${1:-start}" == stop ]]; then
    if [[ -f "$DIR/data/postmaster.pid" ]]; then
        "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2
    fi
    exit 0
fi

mkdir -p "$DIR"
if [[ $(id -u) -eq 0 ]]; then
    chown postgres:postgres "$DIR"
fi
if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
    "${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 ||
        { cat "$DIR/initdb.log" >&2; exit 1; }
fi
if ! "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off -c max_connections=200" \
        start >&2 || { tail -n 20 "$DIR/server.log" >&2; exit 1; }
fi
if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" |
    grep -q 1; then
    "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
echo "export PRUNE_SEARCH_TEST_POSTGRES=postgresql+psycopg2://postgres@127.0.0.1:$PORT/$DB"
