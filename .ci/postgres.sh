#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests that need one (tests/test_workers.py).
#
#   export AUTOPRUNE_TEST_POSTGRES_URL="$(.ci/postgres.sh start)"   # prints the URL, logs on stderr
#   python -m pytest -q tests/test_workers.py
#   .ci/postgres.sh stop
#
# start: installs PostgreSQL from Debian's packages if its server binaries are
# absent (apt-get, root only), creates a cluster in a fresh temporary directory
# owned by an unprivileged user (initdb refuses root; the Debian "postgres" user
# or a new "autoprune-pg" user when running as root), listening on 127.0.0.1 on
# a free port with password (scram-sha-256) authentication and a random
# password, creates the database "autoprune_test" and prints its URL on stdout.
# The password is a throwaway one, known only to this cluster.
# stop: stops that cluster and removes its directory.
# AUTOPRUNE_PG_MAX_CONNECTIONS: the server's max_connections (default 200; a load test of
# many workers, benchmarks/coordination_load.py, asks for more).
# Where the state goes: $AUTOPRUNE_PG_STATE (default ${TMPDIR:-/tmp}/autoprune-postgres-$UID.dir),
# a file holding the cluster's directory, so that stop finds it.
set -euo pipefail

STATE="${AUTOPRUNE_PG_STATE:-${TMPDIR:-/tmp}/autoprune-postgres-$(id -u).dir}"
DB=autoprune_test
ROLE=autoprune

say() { echo "postgres.sh: $*" >&2; }

find_bin() {  # the directory holding initdb, pg_ctl and postgres, or nothing
    local d
    for d in "$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")" \
             $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && [ -x "$d/psql" ]; then
            # /usr/local/bin/pg_ctl may be a symlink into a versioned directory: use the real one.
            readlink -f "$d/pg_ctl" | xargs dirname
            return 0
        fi
    done
    return 0
}

as_user() {  # run a command as the cluster's owner
    if [ "$(id -u)" -ne 0 ]; then
        "$@"
    elif command -v runuser >/dev/null; then
        runuser -u "$OWNER" -- "$@"
    else
        su -s /bin/sh "$OWNER" -c "$(printf '%q ' "$@")"
    fi
}

start() {
    local bin dir port password
    bin="$(find_bin)"
    if [ -z "$bin" ]; then
        if [ "$(id -u)" -ne 0 ]; then
            say "PostgreSQL's server binaries (initdb, pg_ctl, postgres) were not found and installing them needs root: apt-get install postgresql"
            exit 1
        fi
        say "installing PostgreSQL from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update >&2 && apt-get install -y postgresql >&2
        bin="$(find_bin)"
        [ -n "$bin" ] || { say "PostgreSQL was installed but initdb/pg_ctl/postgres are still missing"; exit 1; }
    fi
    if [ "$(id -u)" -eq 0 ]; then
        if id postgres >/dev/null 2>&1; then
            OWNER=postgres
        else
            OWNER=autoprune-pg
            id "$OWNER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$OWNER"
        fi
    else
        OWNER="$(id -un)"
    fi
    dir="$(mktemp -d "${TMPDIR:-/tmp}/autoprune-pg.XXXXXX")"
    chmod 700 "$dir"
    echo "$dir" > "$STATE"
    [ "$(id -u)" -ne 0 ] || chown "$OWNER" "$dir"
    password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    printf '%s\n' "$password" > "$dir/pwfile"
    [ "$(id -u)" -ne 0 ] || chown "$OWNER" "$dir/pwfile"
    say "cluster in $dir (owner $OWNER, $("$bin/postgres" --version)), port $port"
    as_user "$bin/initdb" -D "$dir/data" -U "$ROLE" --pwfile="$dir/pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --no-locale -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    rm -f "$dir/pwfile"
    as_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=${AUTOPRUNE_PG_MAX_CONNECTIONS:-200} -c fsync=off" start >&2 \
        || { cat "$dir/server.log" >&2; exit 1; }
    as_user "$bin/psql" -h "$dir" -p "$port" -U "$ROLE" -d postgres -v ON_ERROR_STOP=1 -q \
        -c "CREATE DATABASE $DB" >&2
    printf '%s\n' "$bin" "$port" "$OWNER" > "$dir/info"
    echo "postgresql://$ROLE:$password@127.0.0.1:$port/$DB"
}

stop() {
    local dir="${1:-}" bin
    if [ -z "$dir" ]; then
        [ -f "$STATE" ] || { say "no cluster recorded in $STATE; nothing to stop"; return 0; }
        dir="$(cat "$STATE")"
    fi
    if [ -f "$dir/info" ] && [ -d "$dir/data" ]; then
        bin="$(sed -n 1p "$dir/info")"
        OWNER="$(sed -n 3p "$dir/info")"
        as_user "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    elif [ -f "$dir/data/postmaster.pid" ]; then  # started but not finished: stop by pid
        kill "$(head -1 "$dir/data/postmaster.pid")" 2>/dev/null || true
        sleep 1
    fi
    case "$dir" in
        "${TMPDIR:-/tmp}"/autoprune-pg.*) rm -rf "$dir" ;;
    esac
    rm -f "$STATE"
    say "stopped the cluster in $dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start|stop [DIR]" >&2; exit 2 ;;
esac
