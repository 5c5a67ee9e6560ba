from __future__ import annotations

import asyncio
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


#: Set to 1 (Python 3.12+) to run every asyncio test loop with ``asyncio.eager_task_factory``.
EAGER_ENV = "CTXKIT_TEST_EAGER"


def eager_mode() -> bool:
    """Whether this run installs the eager task factory on every new asyncio loop."""
    return os.environ.get(EAGER_ENV, "") not in ("", "0")


_saved_policy: asyncio.AbstractEventLoopPolicy | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _saved_policy
    if not eager_mode():
        return
    if sys.version_info >= (3, 12):

        class EagerLoopPolicy(asyncio.DefaultEventLoopPolicy):
            """Every new loop is eager: pytest-asyncio, the anyio plugin and asyncio.run ask."""

            def new_event_loop(self) -> asyncio.AbstractEventLoop:
                loop = super().new_event_loop()
                loop.set_task_factory(asyncio.eager_task_factory)
                return loop

        _saved_policy = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(EagerLoopPolicy())
    else:
        raise pytest.UsageError(
            f"{EAGER_ENV}=1 needs Python 3.12 or newer (asyncio.eager_task_factory), "
            f"this is {sys.version.split()[0]}; unset it or run a newer interpreter"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    global _saved_policy
    if _saved_policy is not None:
        asyncio.set_event_loop_policy(_saved_policy)
        _saved_policy = None


def pytest_report_header(config: pytest.Config) -> str | None:
    return "ctxkit: asyncio loops use asyncio.eager_task_factory" if eager_mode() else None


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
