from __future__ import annotations

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
