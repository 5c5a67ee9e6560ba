#!/usr/bin/env bash
# Make sure PostgreSQL's server programs (`initdb`, `pg_ctl`) are installed: the procrastinate
# tests start a real PostgreSQL next to a real worker. Debian keeps them in
# /usr/lib/postgresql/<version>/bin, not on PATH; the test fixture (tests/_postgres.py) looks
# there. Installs Debian's postgresql package when they are missing (root, or sudo without a
# password) and disables the system-wide cluster the package may start: the tests run their own,
# in a temporary data directory on a free loopback port. Idempotent; exits non-zero, with a
# message, when PostgreSQL cannot be made available. Prints the directory of the programs.
set -euo pipefail

find_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return 0
        fi
    done
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
        return 0
    fi
    return 1
}

if bindir=$(find_bindir); then
    echo "ensure-postgres: $("$bindir/pg_ctl" --version) in $bindir"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "ensure-postgres: initdb/pg_ctl are missing and apt-get needs root; install postgresql" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgres: initdb/pg_ctl are missing and apt-get is not available; install postgresql" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends postgresql >/dev/null

# The package may create and start a system-wide cluster; the tests run their own.
if command -v systemctl >/dev/null 2>&1; then
    "${SUDO[@]}" systemctl disable --now postgresql >/dev/null 2>&1 || true
fi
if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version cluster _; do
        "${SUDO[@]}" pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
    done
fi

if ! bindir=$(find_bindir); then
    echo "ensure-postgres: installed postgresql but initdb/pg_ctl are still missing" >&2
    exit 1
fi
echo "ensure-postgres: $("$bindir/pg_ctl" --version) in $bindir"
