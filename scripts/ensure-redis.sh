#!/usr/bin/env bash
# Make sure `redis-server` is on PATH: the taskiq tests run a real Redis next to a real worker.
# Installs Debian's redis-server package when the binary is missing (root, or sudo without a
# password). Idempotent; exits non-zero, with a message, when Redis cannot be made available.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "ensure-redis: redis-server is not on PATH and apt-get needs root; install redis-server" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-redis: redis-server is not on PATH and apt-get is not available; install redis-server" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends redis-server >/dev/null

# The package may start a system-wide server; the tests run their own on a free port.
if command -v systemctl >/dev/null 2>&1; then
    "${SUDO[@]}" systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "ensure-redis: installed redis-server but it is still not on PATH" >&2
    exit 1
fi
echo "ensure-redis: $(redis-server --version)"
