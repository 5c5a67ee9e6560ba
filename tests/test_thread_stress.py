"""Many threads spawning into one runner at once: every count exact, every task in its own clone.

Written to mean something without a GIL (free-threaded CPython, 3.14t): no check relies on two
threads' operations being serialised by the interpreter. Each task verifies its own context and
fails if it sees another thread's vars; the counts and the metric are compared with what was
spawned, exactly. ``CTXKIT_STRESS_SPAWNS`` sets the spawns per thread (default 10,000; eight
feeder threads). On a free-threaded build: ``python3.14t -m pytest tests/test_thread_stress.py``
(docs/reliability.md).
"""

from __future__ import annotations

import contextvars
import os
import threading
from typing import TYPE_CHECKING

import ctxkit

from ._support import finished_counts

if TYPE_CHECKING:
    from ctxkit import RunnerStatistics

FEEDERS = 8
SPAWNS = int(os.environ.get("CTXKIT_STRESS_SPAWNS", "10000"))

feeder: contextvars.ContextVar[int] = contextvars.ContextVar("stress_feeder")
secret: contextvars.ContextVar[str] = contextvars.ContextVar("stress_secret")


async def check(expected: int) -> None:
    """Fail unless this task sees its own feeder's var, and not the unselected one."""
    if feeder.get(None) != expected or secret.get(None) is not None:
        raise AssertionError(f"task of feeder {expected} saw {feeder.get(None)!r}")


def _monotonic(before: RunnerStatistics, after: RunnerStatistics) -> bool:
    """Whether no counter that only grows went down between two snapshots."""
    fields = ("spawned", "ok", "error", "timeout", "cancelled", "rejected")
    return all(getattr(after, name) >= getattr(before, name) for name in fields)


def test_eight_threads_spawn_into_one_runner_while_others_read_it() -> None:
    """Counts, clones and the finished metric are exact under concurrent spawns and reads."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    failures: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()

    def record(exc: BaseException) -> None:
        with lock:
            failures.append(exc)

    with ctxkit.RunnerThread(limit=None, pending_limit=None, meter_provider=provider) as runner:

        def feed(index: int) -> None:
            try:
                feeder.set(index)
                secret.set("not selected")
                for _ in range(SPAWNS):
                    runner.spawn(check, index, vars=(feeder,), span=False, name="stress")
            except BaseException as exc:  # pragma: no cover - reported below
                record(exc)

        def observe() -> None:
            try:
                last = runner.statistics()
                while not done.is_set():
                    stats = runner.statistics()
                    if not _monotonic(last, stats):  # pragma: no cover - reported below
                        raise AssertionError(f"a counter went down: {last} then {stats}")
                    last = stats
                    for info in runner.tasks():
                        assert info.name == "stress"
                    reader.collect()
            except BaseException as exc:  # pragma: no cover - reported below
                record(exc)

        feeders = [threading.Thread(target=feed, args=(i,)) for i in range(FEEDERS)]
        observers = [threading.Thread(target=observe) for _ in range(2)]
        for thread in (*observers, *feeders):
            thread.start()
        for thread in feeders:
            thread.join()
        done.set()
        for thread in observers:
            thread.join()
    total = FEEDERS * SPAWNS
    assert failures == []
    stats = runner.statistics()
    assert (stats.spawned, stats.ok, stats.error, stats.running, stats.pending) == (
        total,
        total,
        0,
        0,
        0,
    )
    assert finished_counts(reader, "stress") == [total]
    provider.shutdown()
