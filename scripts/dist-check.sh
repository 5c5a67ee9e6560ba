#!/usr/bin/env bash
# Build the sdist and the wheel as a release would, check them, and prove the wheel works on
# its own: install it into a fresh virtual environment (outside the source tree), import
# ctxkit from there, then add the sdk extra and run `python -m ctxkit demo` from it.
#
# The build tools live in .venv-dist (made on first use); the artifacts go to dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}

if [ ! -x .venv-dist/bin/python ]; then
    "$python" -m venv .venv-dist
    .venv-dist/bin/python -m pip install --quiet --upgrade pip
    .venv-dist/bin/python -m pip install --quiet build twine
fi

rm -rf dist
.venv-dist/bin/python -m build --outdir dist . >/dev/null
.venv-dist/bin/twine check --strict dist/*
ls -l dist

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' ctxkit/_version.py)
wheel="$root/dist/ctxkit_async-$version-py3-none-any.whl"
sdist="$root/dist/ctxkit_async-$version.tar.gz"
for artifact in "$wheel" "$sdist"; do
    if [ ! -f "$artifact" ]; then
        echo "dist-check: expected $artifact; the build made: $(ls dist)" >&2
        exit 1
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$wheel"
cd "$work"  # nothing of the source tree is importable from here
"$work/venv/bin/python" - <<'PY'
import importlib.metadata
import pathlib
import sys

import ctxkit

location = pathlib.Path(ctxkit.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in location.parents, f"ctxkit imported from {location}"
dist = importlib.metadata.distribution("ctxkit-async")
assert dist.version == ctxkit.__version__, (dist.version, ctxkit.__version__)
assert (location.parent / "py.typed").is_file(), "py.typed is missing from the wheel"
print(f"dist-check: ctxkit {ctxkit.__version__} imported from {location.parent}")
PY
"$work/venv/bin/python" -m pip install --quiet "$wheel[sdk]"
"$work/venv/bin/python" -m ctxkit demo > "$work/demo.log"
echo "dist-check: python -m ctxkit demo from the wheel: $(wc -l < "$work/demo.log") lines, last:"
tail -n 3 "$work/demo.log"
