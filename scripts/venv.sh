#!/usr/bin/env bash
# Usage: scripts/venv.sh VERSION DIR [CONSTRAINTS]
#
# Make DIR a virtual environment of Python VERSION (3.11, 3.12, ...) holding ctxkit in editable
# mode with its test extra, optionally under a pip constraints file (constraints/lowest.txt).
# The interpreter is found through pyenv (`pyenv prefix VERSION`), else as pythonVERSION on
# PATH; a missing one is an error that says so. Reinstalls only when pyproject.toml or the
# constraints file changed since the last install. Prints the interpreter's version.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
    echo "usage: scripts/venv.sh VERSION DIR [CONSTRAINTS]" >&2
    exit 2
fi
version=$1
dir=$2
constraints=${3:-}

find_python() {
    local prefix
    if command -v pyenv >/dev/null 2>&1 && prefix=$(pyenv prefix "$version" 2>/dev/null); then
        for candidate in "$prefix/bin/python$version" "$prefix/bin/python3"; do
            if [ -x "$candidate" ]; then
                echo "$candidate"
                return 0
            fi
        done
    fi
    command -v "python$version" 2>/dev/null && return 0
    return 1
}

if [ ! -x "$dir/bin/python" ]; then
    if ! python=$(find_python); then
        echo "venv.sh: no Python $version on this machine: neither \`pyenv prefix $version\`" \
            "nor python$version on PATH; install it (pyenv install $version) to run this step" >&2
        exit 1
    fi
    "$python" -m venv "$dir"
fi

actual=$("$dir/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$actual" != "$version" ]; then
    echo "venv.sh: $dir holds Python $actual, not $version; remove it and run again" >&2
    exit 1
fi

stamp="$dir/.installed-test"
inputs=(pyproject.toml)
args=(-e ".[test]")
if [ -n "$constraints" ]; then
    inputs+=("$constraints")
    args+=(-c "$constraints")
fi
stale=0
if [ ! -f "$stamp" ]; then
    stale=1
else
    for input in "${inputs[@]}"; do
        if [ "$input" -nt "$stamp" ]; then
            stale=1
        fi
    done
fi
if [ "$stale" -eq 1 ]; then
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    "$dir/bin/python" -m pip install --quiet "${args[@]}"
    touch "$stamp"
fi
echo "venv.sh: $dir: $("$dir/bin/python" --version)${constraints:+ under $constraints}"
