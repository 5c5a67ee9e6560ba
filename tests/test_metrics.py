"""Tests for the runner's OpenTelemetry metrics (meter ``ctxkit``) via InMemoryMetricReader."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry.sdk.metrics.export import Histogram, HistogramDataPoint, Metric, Sum

import ctxkit

from ._support import wait_for

if TYPE_CHECKING:
    from collections.abc import Mapping

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

Attributes = frozenset[tuple[str, Any]]


def read(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """Return the metrics of the ``ctxkit`` meter by name."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        if scope_metrics.scope.name == "ctxkit"
        for metric in scope_metrics.metrics
    }


def key(attributes: Mapping[str, Any] | None) -> Attributes:
    return frozenset((attributes or {}).items())


def sums(metric: Metric) -> dict[Attributes, int | float]:
    """Return a Sum's value per attribute set."""
    assert isinstance(metric.data, Sum)
    return {key(point.attributes): point.value for point in metric.data.data_points}


def counts(metric: Metric) -> dict[Attributes, int]:
    """Return a Histogram's recording count per attribute set."""
    assert isinstance(metric.data, Histogram)
    points = metric.data.data_points
    assert all(isinstance(point, HistogramDataPoint) for point in points)
    return {key(point.attributes): point.count for point in points}


def outcome(name: str, value: str) -> Attributes:
    return key({"ctxkit.task.name": name, "ctxkit.task.outcome": value})


async def announce_then_wait(started: anyio.Event, event: anyio.Event) -> None:
    started.set()
    await event.wait()


async def fail() -> None:
    raise ValueError("metric")


@pytest.mark.anyio
class TestInstruments:
    async def test_names_units_and_kinds(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """The six instruments have the documented names, units and kinds."""
        async with ctxkit.BackgroundRunner(meter_provider=meter_provider) as runner:
            runner.spawn(wait_for, anyio.Event(), timeout=0.01)
            runner.spawn(fail)
        release = anyio.Event()
        async with ctxkit.BackgroundRunner(
            meter_provider=meter_provider, limit=1, pending_limit=1
        ) as runner:
            runner.spawn(wait_for, release)
            runner.spawn(wait_for, release)
            with pytest.raises(ctxkit.RunnerFullError):
                runner.spawn(wait_for, release)
            release.set()
        metrics = read(metric_reader)
        expected = {
            "ctxkit.tasks.active": ("{task}", Sum, False),
            "ctxkit.tasks.pending": ("{task}", Sum, False),
            "ctxkit.tasks.finished": ("{task}", Sum, True),
            "ctxkit.tasks.rejected": ("{task}", Sum, True),
            "ctxkit.task.duration": ("s", Histogram, None),
            "ctxkit.task.wait": ("s", Histogram, None),
        }
        assert set(metrics) == set(expected)
        for name, (unit, kind, monotonic) in expected.items():
            metric = metrics[name]
            assert metric.unit == unit, name
            assert isinstance(metric.data, kind), name
            if isinstance(metric.data, Sum):
                assert metric.data.is_monotonic is monotonic, name
            assert metric.description, name

    async def test_values_follow_the_tasks(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """active, pending, finished, rejected, duration and wait count what happened."""
        release = anyio.Event()
        never = anyio.Event()
        started = anyio.Event()
        cancel_me = anyio.Event()

        async with ctxkit.BackgroundRunner(
            meter_provider=meter_provider, limit=1, pending_limit=1
        ) as runner:
            runner.spawn(announce_then_wait, started, release, name="blocker")
            queued = runner.spawn(wait_for, never, name="queued")
            with pytest.raises(ctxkit.RunnerFullError):
                runner.spawn(wait_for, never, name="refused")
            await started.wait()
            metrics = read(metric_reader)
            assert sums(metrics["ctxkit.tasks.active"]) == {key({}): 1}
            assert sums(metrics["ctxkit.tasks.pending"]) == {key({}): 1}
            assert sums(metrics["ctxkit.tasks.rejected"]) == {key({}): 1}

            queued.cancel()  # ends while pending: finished, but it never ran
            release.set()
            await runner.drain()
            runner.spawn(fail, name="failing")
            await runner.drain()
            runner.spawn(wait_for, never, name="slow", timeout=0.01)
            await runner.drain()
            running = runner.spawn(announce_then_wait, cancel_me, never, name="cancelled")
            await cancel_me.wait()
            running.cancel()
        metrics = read(metric_reader)
        assert sums(metrics["ctxkit.tasks.active"]) == {key({}): 0}
        assert sums(metrics["ctxkit.tasks.pending"]) == {key({}): 0}
        assert sums(metrics["ctxkit.tasks.rejected"]) == {key({}): 1}
        ran = {
            outcome("blocker", "ok"): 1,
            outcome("failing", "error"): 1,
            outcome("slow", "timeout"): 1,
            outcome("cancelled", "cancelled"): 1,
        }
        assert sums(metrics["ctxkit.tasks.finished"]) == {
            **ran,
            outcome("queued", "cancelled"): 1,
        }
        assert counts(metrics["ctxkit.task.duration"]) == ran
        assert counts(metrics["ctxkit.task.wait"]) == {key({}): 4}
        stats = runner.statistics()
        assert (stats.spawned, stats.rejected) == (5, 1)

    async def test_durations_are_seconds(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """A task that outlives a 0.05 s timeout records a duration of at least 0.05 (seconds)."""
        async with ctxkit.BackgroundRunner(meter_provider=meter_provider) as runner:
            runner.spawn(wait_for, anyio.Event(), name="slow", timeout=0.05)
        metric = read(metric_reader)["ctxkit.task.duration"]
        assert isinstance(metric.data, Histogram)
        (point,) = metric.data.data_points
        assert 0.05 <= point.sum < 5

    async def test_runners_share_the_meter_of_a_provider(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """Two runners on one meter provider add to the same instruments."""

        async def ok() -> None:
            pass

        async with (
            ctxkit.BackgroundRunner(meter_provider=meter_provider) as first,
            ctxkit.BackgroundRunner(meter_provider=meter_provider) as second,
        ):
            first.spawn(ok, name="ok")
            second.spawn(ok, name="ok")
        finished = read(metric_reader)["ctxkit.tasks.finished"]
        assert sums(finished) == {outcome("ok", "ok"): 2}

    async def test_finished_counts_outlive_their_runner_and_never_decrease(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """The finished counter never goes down: a closed and collected runner's counts are
        kept by the meter, each collection adds only what ended since, and a name seen again
        after a collection keeps counting up."""

        async def ok() -> None:
            pass

        async with ctxkit.BackgroundRunner(meter_provider=meter_provider) as runner:
            for _ in range(3):
                await runner.spawn(ok, name="ok")
            with pytest.raises(ValueError, match="metric"):
                await runner.spawn(fail, name="fails")
        del runner
        gc.collect()
        first = sums(read(metric_reader)["ctxkit.tasks.finished"])
        assert first == {outcome("ok", "ok"): 3, outcome("fails", "error"): 1}
        assert sums(read(metric_reader)["ctxkit.tasks.finished"]) == first
        async with ctxkit.BackgroundRunner(meter_provider=meter_provider) as runner:
            await runner.spawn(ok, name="ok")
        assert sums(read(metric_reader)["ctxkit.tasks.finished"]) == {
            outcome("ok", "ok"): 4,
            outcome("fails", "error"): 1,
        }


@pytest.mark.anyio
class TestWait:
    async def test_wait_is_zero_unless_the_task_queued(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """ctxkit.task.wait records 0.0 for a task started at spawn, the queue time otherwise."""
        release = anyio.Event()
        async with ctxkit.BackgroundRunner(limit=1, meter_provider=meter_provider) as runner:
            runner.spawn(wait_for, release, name="first")
            runner.spawn(wait_for, release, name="second")  # waits for first's slot
            await anyio.lowlevel.checkpoint()
            release.set()
        (point,) = read(metric_reader)["ctxkit.task.wait"].data.data_points
        assert isinstance(point, HistogramDataPoint)
        assert point.count == 2
        assert point.min == 0.0
        assert point.max > 0.0


@pytest.mark.anyio
class TestCardinality:
    async def test_task_names_beyond_the_cap_fold_into_one_value(
        self, make_runner: Any, metric_reader: InMemoryMetricReader
    ) -> None:
        """Names built per call (email-{id}) make at most MAX_TASK_NAMES series, then one more."""
        from ctxkit._metrics import MAX_TASK_NAMES, OVERFLOW_NAME

        async with make_runner() as runner:
            for index in range(MAX_TASK_NAMES + 100):
                await runner.spawn(anyio.lowlevel.checkpoint, name=f"email-{index}")
        finished = sums(read(metric_reader)["ctxkit.tasks.finished"])
        names = {dict(attributes)["ctxkit.task.name"] for attributes in finished}
        assert len(names) == MAX_TASK_NAMES + 1
        assert OVERFLOW_NAME in names
        assert finished[outcome(OVERFLOW_NAME, "ok")] == 100
        assert sum(finished.values()) == MAX_TASK_NAMES + 100


class TestCollectedRunners:
    def test_a_runner_collected_inside_the_meters_lock_is_retired_later(self) -> None:
        """The cyclic GC may collect a runner in the middle of a ``with lock`` block of the
        meter (any allocation there can start it, on any thread): its weak reference's
        callback must not take that lock again. Its counts are retired at the next collection,
        exactly once."""
        import asyncio
        import threading
        import weakref

        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from ctxkit._metrics import instruments_for

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])

        async def ok() -> None:
            pass

        async def main() -> weakref.ref[ctxkit.BackgroundRunner]:
            async with ctxkit.BackgroundRunner(meter_provider=provider) as runner:
                for _ in range(3):
                    await runner.spawn(ok, name="cycled")
            cycle: list[object] = [runner]
            cycle.append(cycle)  # only the cyclic collector frees it now
            return weakref.ref(runner)

        gc.disable()  # the collection below is the one that frees the runner
        try:
            collected = asyncio.run(main())
            assert collected() is not None
            instruments = instruments_for(provider)

            def collect_while_locked() -> None:
                with instruments.lock:
                    gc.collect()

            thread = threading.Thread(target=collect_while_locked, daemon=True)
            thread.start()
            thread.join(10)
        finally:
            gc.enable()
        assert not thread.is_alive(), "the runner's retirement deadlocked on the meter's lock"
        assert collected() is None
        assert sums(read(reader)["ctxkit.tasks.finished"]) == {outcome("cycled", "ok"): 3}
        assert sums(read(reader)["ctxkit.tasks.finished"]) == {outcome("cycled", "ok"): 3}
        provider.shutdown()
