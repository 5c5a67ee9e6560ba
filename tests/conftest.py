from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxkit
from ctxkit import _clone

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._support import MakeRunner


#: arq caps redis-py below 6, which the test extra's taskiq-redis and kombu do not admit, so the
#: arq tests run in a venv of their own (``make test-arq``, a step of .ci/run); a venv without
#: arq leaves them out instead of failing to import them.
collect_ignore = [] if importlib.util.find_spec("arq") else ["test_arq.py", "arq_app"]

#: Set to 1 (Python 3.12+) to run every asyncio test loop with ``asyncio.eager_task_factory``.
EAGER_ENV = "CTXKIT_TEST_EAGER"


def eager_mode() -> bool:
    """Whether this run installs the eager task factory on every new asyncio loop."""
    return os.environ.get(EAGER_ENV, "") not in ("", "0")


#: Undoes the eager mode's patch at the end of the run.
_eager_patch: pytest.MonkeyPatch | None = None


def pytest_configure(config: pytest.Config) -> None:
    """In eager mode, make every new asyncio loop eager, without an event loop policy.

    Every loop of a run is made by ``asyncio.events.new_event_loop()``: ``asyncio.Runner`` (so
    ``asyncio.run``, pytest-asyncio's runners and ``RunnerThread``'s loop) and the anyio pytest
    plugin's runner call it when given no loop factory. Wrapping that one function reaches them
    all on 3.12 to 3.15 and after the policy system is gone (deprecated in 3.14, removed in
    3.16). The plugins' own options (anyio's ``loop_factory`` backend option, pytest-asyncio's
    ``pytest_asyncio_loop_factories`` hook) would not reach ``asyncio.run`` inside a test or a
    ``RunnerThread``'s loop, so an eager run would quietly cover less.
    """
    global _eager_patch
    if not eager_mode():
        return
    if sys.version_info >= (3, 12):
        new_event_loop = asyncio.events.new_event_loop

        def new_eager_event_loop() -> asyncio.AbstractEventLoop:
            loop = new_event_loop()
            loop.set_task_factory(asyncio.eager_task_factory)
            return loop

        _eager_patch = pytest.MonkeyPatch()
        _eager_patch.setattr(asyncio.events, "new_event_loop", new_eager_event_loop)
        _eager_patch.setattr(asyncio, "new_event_loop", new_eager_event_loop)
    else:
        raise pytest.UsageError(
            f"{EAGER_ENV}=1 needs Python 3.12 or newer (asyncio.eager_task_factory), "
            f"this is {sys.version.split()[0]}; unset it or run a newer interpreter"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    global _eager_patch
    if _eager_patch is not None:
        _eager_patch.undo()
        _eager_patch = None


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    if eager_mode():
        lines.append("ctxkit: asyncio loops use asyncio.eager_task_factory")
    # 3.14+: on by default in free-threaded builds, -X or PYTHON_* variables elsewhere.
    flags = [
        name
        for name in ("thread_inherit_context", "context_aware_warnings")
        if getattr(sys.flags, name, 0)
    ]
    if flags:
        lines.append(f"ctxkit: sys.flags {', '.join(flags)} on")
    return lines


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every anyio test runs on both backends unless a module overrides this fixture."""
    return str(request.param)


@pytest.fixture
def span_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(span_exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A fresh SDK provider per test; the global provider is never touched."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def metric_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(metric_reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[metric_reader])
    yield provider
    provider.shutdown()


@pytest.fixture
def make_runner(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> MakeRunner:
    """Build runners that report to this test's tracer and meter providers."""

    def make(**options: Any) -> ctxkit.BackgroundRunner:
        options.setdefault("tracer_provider", tracer_provider)
        options.setdefault("meter_provider", meter_provider)
        options.setdefault("drain_timeout", 10.0)  # a failing test ends instead of hanging
        return ctxkit.BackgroundRunner(**options)

    return make


@pytest.fixture(autouse=True)
def _restore_registered_vars() -> Iterator[None]:
    """Tests may register vars; the registry is process-wide, so put it back after each."""
    saved = _clone.registered()
    yield
    _clone._registered = saved
