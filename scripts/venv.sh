#!/usr/bin/env bash
# Usage: scripts/venv.sh VERSION DIR [CONSTRAINTS]
#
# Make DIR a virtual environment of Python VERSION (3.11, 3.12, ...) holding ctxkit in editable
# mode with its test extra (or the extra named by CTXKIT_VENV_EXTRA), optionally under a pip
# constraints file (constraints/lowest.txt).
# The interpreter is found through pyenv (`pyenv prefix VERSION`), else as pythonVERSION on
# PATH, else, for 3.14 and 3.15, installed from Debian's pinned packages by
# scripts/python-from-debian.sh; a missing one is an error that says so. An interpreter without
# ensurepip (Debian's) gets a venv made --without-pip and pip bootstrapped from pip's wheel.
# Reinstalls only when pyproject.toml or the constraints file changed since the last install.
# Prints the interpreter's version.
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
    case "$version" in
        3.14 | 3.15) bash scripts/python-from-debian.sh "$version" && return 0 ;;
    esac
    return 1
}

# Debian's interpreters leave ensurepip out (it is in pythonX.Y-venv): make the venv without pip
# and install pip from its wheel, downloaded by any pip at hand, run from the wheel itself.
make_venv() {
    local python=$1
    if "$python" -c "import ensurepip" >/dev/null 2>&1; then
        "$python" -m venv "$dir"
    else
        "$python" -m venv --without-pip "$dir"
    fi
}
bootstrap_pip() {
    local wheels pip_for_download=()
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
            pip_for_download=("$candidate" -m pip)
            break
        fi
    done
    if [ ${#pip_for_download[@]} -eq 0 ]; then
        echo "venv.sh: $dir has no pip (its Python has no ensurepip) and no python3 on PATH has" \
            "pip to download pip's wheel with; install pip for python3 (apt-get install python3-pip)" >&2
        exit 1
    fi
    wheels=$(mktemp -d)
    "${pip_for_download[@]}" download --quiet --no-deps --only-binary=:all: \
        --python-version "$version" --dest "$wheels" pip
    "$dir/bin/python" "$(echo "$wheels"/pip-*.whl)/pip" install --quiet --no-index "$wheels"/pip-*.whl
    rm -rf "$wheels"
}

if [ ! -x "$dir/bin/python" ]; then
    case "$version" in
        3.14 | 3.15) debian_hint=", nor from scripts/python-from-debian.sh $version (see its error above)" ;;
    esac
    if ! python=$(find_python); then
        echo "venv.sh: no Python $version on this machine: neither \`pyenv prefix $version\`" \
            "nor python$version on PATH${debian_hint:-}; install it (pyenv install $version) to run" \
            "this step" >&2
        exit 1
    fi
    make_venv "$python"
fi
if ! "$dir/bin/python" -m pip --version >/dev/null 2>&1; then
    bootstrap_pip
fi

actual=$("$dir/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$actual" != "$version" ]; then
    echo "venv.sh: $dir holds Python $actual, not $version; remove it and run again" >&2
    exit 1
fi

extra=${CTXKIT_VENV_EXTRA:-test}  # test-arq: the arq tests' venv (see pyproject.toml)
stamp="$dir/.installed-$extra"
inputs=(pyproject.toml)
args=(-e ".[$extra]")
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
