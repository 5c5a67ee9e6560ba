# Each target works on a fresh machine that has only python3: the virtual environment is
# created and filled on first use, and refreshed whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

BENCH_STAMP := $(VENV)/.installed-bench
DOCS_STAMP := $(VENV)/.installed-docs
BENCH_ARGS ?=
# Sizes of the soak and fuzz runs, e.g. SOAK_ARGS="--tasks 50000 --trio-tasks 10000".
SOAK_ARGS ?=
FUZZ_ARGS ?=
# The interpreters of the matrix, one venv each: found with pyenv or on PATH by scripts/venv.sh,
# which installs 3.14 and 3.15 from Debian's packages (scripts/python-from-debian.sh) otherwise.
MATRIX_PYTHONS ?= 3.12 3.13 3.14 3.15
# The interpreters that have the free-threaded builds' context flags (3.14+), for test-inherit.
INHERIT_PYTHONS ?= 3.14 3.15
# A suite run that takes longer than this many seconds is interrupted (a hang fails clearly).
SUITE_TIMEOUT ?= 900
RUN_SUITE = timeout --signal=INT --kill-after=60 $(SUITE_TIMEOUT)

.PHONY: demo test lint typecheck pytest bench bench-quick docs clean
.PHONY: test-matrix $(MATRIX_PYTHONS:%=test-%) test-eager $(MATRIX_PYTHONS:%=test-eager-%)
.PHONY: test-inherit $(INHERIT_PYTHONS:%=test-inherit-%)
.PHONY: test-lowest test-arq test-arq-lowest dist-check soak fuzz bench-background

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $@

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m ctxkit demo

test: lint typecheck pytest test-arq

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# coverage runs pytest itself, so that ctxkit's modules imported while pytest starts (by
# conftest.py and the plugins it loads) are measured from their first line.
# ctxkit/contrib/arq.py is measured where its tests run, by test-arq (arq is not in this venv).
pytest: $(STAMP)
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage report --omit=ctxkit/contrib/arq.py

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

# The suite on each other interpreter, in .venv-3.12 ... .venv-3.15 (lint and mypy run in `test`).
test-matrix: $(MATRIX_PYTHONS:%=test-%)

$(MATRIX_PYTHONS:%=test-%): test-%:
	bash scripts/venv.sh $* .venv-$*
	$(RUN_SUITE) .venv-$*/bin/python -m pytest

# The suite once more with asyncio.eager_task_factory on every asyncio test loop (3.12+).
test-eager: $(MATRIX_PYTHONS:%=test-eager-%)

$(MATRIX_PYTHONS:%=test-eager-%): test-eager-%:
	bash scripts/venv.sh $* .venv-$*
	CTXKIT_TEST_EAGER=1 $(RUN_SUITE) .venv-$*/bin/python -m pytest

# The suite once more with the free-threaded builds' defaults on a GIL build (3.14+): a new thread
# starts in a copy of its starter's context, and warnings filters are context-local. The -X flags
# set them for the pytest process, the PYTHON_* variables for the processes the tests start.
test-inherit: $(INHERIT_PYTHONS:%=test-inherit-%)

$(INHERIT_PYTHONS:%=test-inherit-%): test-inherit-%:
	bash scripts/venv.sh $* .venv-$*
	PYTHON_THREAD_INHERIT_CONTEXT=1 PYTHON_CONTEXT_AWARE_WARNINGS=1 $(RUN_SUITE) \
		.venv-$*/bin/python -X thread_inherit_context=1 -X context_aware_warnings=1 -m pytest

# The suite against the lowest versions pyproject.toml admits (constraints/lowest.txt).
test-lowest:
	bash scripts/venv.sh 3.11 .venv-lowest constraints/lowest.txt
	.venv-lowest/bin/python -m pip freeze --exclude-editable | grep -i -E \
		"^($$(grep -o -E '^[A-Za-z0-9_.-]+==' constraints/lowest.txt | tr -d = | paste -sd'|'))=="
	$(RUN_SUITE) .venv-lowest/bin/python -m pytest

# The arq tests, in venvs of their own: arq caps redis-py below 6, which the test extra's latest
# taskiq-redis and kombu do not admit (pyproject.toml's test-arq extra); latest, then lowest.
test-arq:
	CTXKIT_VENV_EXTRA=test-arq bash scripts/venv.sh 3.11 .venv-arq
	$(RUN_SUITE) .venv-arq/bin/coverage run --data-file=.coverage.arq -m pytest tests/test_arq.py
	.venv-arq/bin/coverage report --data-file=.coverage.arq --include=ctxkit/contrib/arq.py

test-arq-lowest:
	CTXKIT_VENV_EXTRA=test-arq bash scripts/venv.sh 3.11 .venv-arq-lowest constraints/lowest.txt
	.venv-arq-lowest/bin/python -m pip freeze --exclude-editable | grep -i -E "^(arq|redis)=="
	$(RUN_SUITE) .venv-arq-lowest/bin/python -m pytest tests/test_arq.py

# Build the sdist and wheel, check them, install the wheel into a fresh venv and run the demo.
dist-check:
	bash scripts/dist-check.sh

# FastAPI's background tasks on uvicorn under wrk: stock, detached, hand-written (issue 26).
bench-background: $(STAMP)
	$(BIN)/python -m benchmarks.case_background $(BENCH_ARGS)

# A million asyncio tasks and 100,000 trio tasks with mixed outcomes (benchmarks/soak.py).
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

# 100,000 hostile carriers into extract, consume and the taskiq middleware (benchmarks/fuzz.py).
fuzz: $(STAMP)
	$(BIN)/python -m benchmarks.fuzz $(FUZZ_ARGS)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .venv-* .mypy_cache .pytest_cache .ruff_cache .coverage build dist site
