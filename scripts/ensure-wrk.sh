#!/usr/bin/env bash
# Make sure `wrk` is on PATH: the background-task benchmark (benchmarks/case_background.py) drives uvicorn with it.
# Installs Debian's wrk package when the binary is missing (root, or sudo without a
# password). Idempotent; exits non-zero, with a message, when wrk cannot be made available.
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "ensure-wrk: wrk is not on PATH and apt-get needs root; install Debian's wrk" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-wrk: wrk is not on PATH and apt-get is not available; install wrk" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends wrk >/dev/null

if ! command -v wrk >/dev/null 2>&1; then
    echo "ensure-wrk: installed wrk but it is still not on PATH" >&2
    exit 1
fi
echo "ensure-wrk: $(wrk --version 2>&1 | head -n 1)"
