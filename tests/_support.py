"""Helpers shared by the runner, spawn, decorator and metrics tests."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

import ctxkit

if TYPE_CHECKING:
    from collections.abc import Coroutine

    import anyio
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

MakeRunner = Callable[..., ctxkit.BackgroundRunner]
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])
TRIO_ONLY = pytest.mark.parametrize("anyio_backend", ["trio"])


def assert_identity(stats: ctxkit.RunnerStatistics) -> None:
    """Check the invariant every statistics() snapshot keeps."""
    assert stats.spawned == (
        stats.running + stats.pending + stats.ok + stats.error + stats.timeout + stats.cancelled
    ), stats


def is_closed(coro: Coroutine[Any, Any, Any]) -> bool:
    """Tell whether ``coro`` was closed (so it can never warn "was never awaited")."""
    assert isinstance(coro, types.CoroutineType)
    return inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED and coro.cr_frame is None


async def noop() -> None:
    pass


async def wait_for(event: anyio.Event) -> None:
    await event.wait()


def ctxkit_messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """Return the messages the ``ctxkit`` logger recorded at ``level``."""
    return [r.getMessage() for r in caplog.records if r.name == "ctxkit" and r.levelno == level]


def finished_counts(reader: InMemoryMetricReader, name: str) -> list[int | float]:
    """The ``ctxkit.tasks.finished`` values of task ``name`` that ``reader`` collects now."""
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point.value  # type: ignore[union-attr]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "ctxkit.tasks.finished"
        for point in metric.data.data_points
        if point.attributes is not None and point.attributes["ctxkit.task.name"] == name
    ]


#: The ``filterwarnings`` lines of the ini files of the pytest runs that tests start: warnings are
#: errors, but for the one opentelemetry-api 1.42 (the lowest admitted) raises on Python 3.11 as
#: it is first imported (pyproject.toml ignores it for the suite too).
FILTERWARNINGS = (
    "filterwarnings =\n"
    "    error\n"
    "    ignore:SelectableGroups dict interface is deprecated:DeprecationWarning\n"
)
