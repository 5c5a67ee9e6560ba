"""Soak: a million asyncio tasks and 100,000 trio tasks with mixed outcomes lose nothing.

``python -m benchmarks.soak`` (``make soak``; ``--tasks``/``--trio-tasks`` for other sizes).
Through the public API only (``BackgroundRunner``, ``spawn``, ``statistics()``, the task
handles), each backend runs its tasks in batches under one runner. About 10% of the tasks
raise, 5% run past their ``timeout``, 5% are cancelled (half at once, half once running), the
rest return, with or without a checkpoint; about half have a span. It checks, and exits
non-zero with the reason when one fails:

- ``spawned == ok + error + timeout + cancelled + running + pending`` after every spawn, in
  every 64th task and after every batch, and every handle's outcome is the one its task was
  built for, with the counters equal to the sums;
- every task saw its own carried var and not the spawner's unselected one;
- ``on_error`` ran exactly once for each task that raised, and the ``ctxkit`` logger logged
  each error once;
- every task span that started ended;
- the loop's exception handler was never called (asyncio), no warning and no unraisable
  exception was reported;
- the resident set grew by less than ``--max-rss-growth`` MB (10) from the end of the warm-up
  batches to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import logging
import os
import random
import resource
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel
import trio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

import ctxkit

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import ReadableSpan, Span

OK: Final = "ok"
OK_CHECKPOINT: Final = "ok-checkpoint"
ERROR: Final = "error"
TIMEOUT: Final = "timeout"
CANCEL_NOW: Final = "cancel-now"
CANCEL_RUNNING: Final = "cancel-running"
#: What each kind of task must end with.
OUTCOME: Final = {
    OK: ctxkit.TaskOutcome.OK,
    OK_CHECKPOINT: ctxkit.TaskOutcome.OK,
    ERROR: ctxkit.TaskOutcome.ERROR,
    TIMEOUT: ctxkit.TaskOutcome.TIMEOUT,
    CANCEL_NOW: ctxkit.TaskOutcome.CANCELLED,
    CANCEL_RUNNING: ctxkit.TaskOutcome.CANCELLED,
}

request_id: contextvars.ContextVar[int] = contextvars.ContextVar("soak.request_id")
#: Set by the spawner and never selected: no task may see it.
secret: contextvars.ContextVar[str] = contextvars.ContextVar("soak.secret")

_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


class SoakFailure(AssertionError):
    """A soak invariant does not hold."""


class TaskError(Exception):
    """What the erroring tasks raise; carries the task's number."""


def rss_bytes() -> int:
    """Return the current resident set size (not the peak)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class CountingProcessor(SpanProcessor):
    """Count started and ended spans without keeping them."""

    def __init__(self) -> None:
        self.started = 0
        self.ended = 0

    def on_start(self, span: Span, parent_context: OtelContext | None = None) -> None:
        self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        self.ended += 1


class CountingHandler(logging.Handler):
    """Count the ``ctxkit`` logger's records by level, formatting nothing."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.levels: Counter[int] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[record.levelno] += 1


@dataclass
class Phase:
    """What one backend's run observed."""

    backend: str
    tasks: int
    batch: int
    warmup_batches: int
    expected: Counter[str] = field(default_factory=Counter)
    with_span: int = 0
    wrong_vars: int = 0
    identity_checks: int = 0
    on_error: Counter[int] = field(default_factory=Counter)  # this batch's, by task number
    on_error_calls: int = 0
    loop_exception_handler_calls: int = 0
    rss_after_warmup: int = 0
    objects_after_warmup: int = 0
    objects_end: int = 0
    rss_end: int = 0
    seconds: float = 0.0
    statistics: ctxkit.RunnerStatistics | None = None


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SoakFailure(message)


def check_identity(stats: ctxkit.RunnerStatistics, where: str) -> None:
    total = stats.ok + stats.error + stats.timeout + stats.cancelled + stats.running
    check(
        stats.spawned == total + stats.pending,
        f"statistics identity broken {where}: {stats!r}",
    )


def plan(seed: int, count: int) -> list[tuple[str, bool]]:
    """Return each task's kind and whether it has a span."""
    rng = random.Random(seed)
    kinds: list[tuple[str, bool]] = []
    for _ in range(count):
        r = rng.random()
        if r < 0.10:
            kind = ERROR
        elif r < 0.15:
            kind = TIMEOUT
        elif r < 0.175:
            kind = CANCEL_NOW
        elif r < 0.20:
            kind = CANCEL_RUNNING
        elif r < 0.60:
            kind = OK_CHECKPOINT
        else:
            kind = OK
        kinds.append((kind, rng.random() < 0.5))
    return kinds


async def soak(phase: Phase, seed: int, sdk_metrics: bool) -> None:
    """Run ``phase.tasks`` tasks on the current event loop under one runner and check them."""
    processor = CountingProcessor()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider() if sdk_metrics else None
    started_running: dict[int, anyio.Event] = {}

    def on_error(failure: ctxkit.TaskFailure) -> None:
        exc = failure.exception
        phase.on_error[exc.args[0] if isinstance(exc, TaskError) else -1] += 1

    runner = ctxkit.BackgroundRunner(
        on_error=on_error,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        drain_timeout=60.0,
    )

    async def work(number: int, kind: str) -> int:
        if request_id.get(None) != number or secret.get(None) is not None:
            phase.wrong_vars += 1
        if number % 64 == 0:
            check_identity(runner.statistics(), f"in task {number}")
            phase.identity_checks += 1
        if kind == OK:
            return number
        if kind == OK_CHECKPOINT:
            await anyio.lowlevel.checkpoint()
            return number
        if kind == ERROR:
            raise TaskError(number)
        if kind == CANCEL_RUNNING:
            started_running[number].set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    kinds = plan(seed, phase.tasks)
    started = time.perf_counter()
    async with runner:
        for first in range(0, phase.tasks, phase.batch):
            if first // phase.batch == phase.warmup_batches:
                gc.collect()
                phase.rss_after_warmup = rss_bytes()
                phase.objects_after_warmup = sys.getallocatedblocks()
            numbers = range(first, min(first + phase.batch, phase.tasks))
            handles: list[tuple[int, str, ctxkit.BackgroundTask[int]]] = []
            later: list[tuple[int, ctxkit.BackgroundTask[int]]] = []
            for number in numbers:
                kind, span = kinds[number]
                request_id.set(number)
                secret.set("spawner only")
                if kind == CANCEL_RUNNING:
                    started_running[number] = anyio.Event()
                handle = runner.spawn(
                    work,
                    number,
                    kind,
                    vars=(request_id,),
                    name=kind,
                    span=span,
                    timeout=0.001 if kind == TIMEOUT else None,
                )
                phase.expected[kind] += 1
                phase.with_span += span
                handles.append((number, kind, handle))
                if kind == CANCEL_NOW:
                    handle.cancel()
                elif kind == CANCEL_RUNNING:
                    later.append((number, handle))
                check_identity(runner.statistics(), f"after spawn {number}")
                phase.identity_checks += 1
            for number, handle in later:
                await started_running[number].wait()
                handle.cancel()
            await runner.drain()
            stats = runner.statistics()
            check_identity(stats, f"after batch {first // phase.batch}")
            phase.identity_checks += 1
            check(stats.running == stats.pending == 0, f"drained runner not idle: {stats!r}")
            for number, kind, handle in handles:
                outcome = handle.outcome
                check(
                    outcome is OUTCOME[kind],
                    f"task {number} ({kind}) ended {outcome!r}, expected {OUTCOME[kind]!r}",
                )
                if outcome is ctxkit.TaskOutcome.OK:
                    check(handle.result() == number, f"task {number} returned a wrong result")
            errors = [number for number, kind, _ in handles if kind == ERROR]
            check(
                sorted(phase.on_error) == errors and set(phase.on_error.values()) <= {1},
                f"on_error not called once per error in batch {first // phase.batch}: "
                f"{len(phase.on_error)} tasks reported, {sum(phase.on_error.values())} calls, "
                f"{len(errors)} errors",
            )
            phase.on_error_calls += sum(phase.on_error.values())
            phase.on_error.clear()  # kept per batch: a million-entry counter would be the leak
            started_running.clear()
            del handles, later, handle
    phase.seconds = time.perf_counter() - started
    gc.collect()
    phase.rss_end = rss_bytes()
    phase.objects_end = sys.getallocatedblocks()
    stats = runner.statistics()
    phase.statistics = stats
    check_identity(stats, "at the end")
    expect = phase.expected
    check(stats.spawned == phase.tasks, f"spawned {stats.spawned} of {phase.tasks}")
    check(stats.ok == expect[OK] + expect[OK_CHECKPOINT], f"ok count wrong: {stats!r}")
    check(stats.error == expect[ERROR], f"error count wrong: {stats!r}")
    check(stats.timeout == expect[TIMEOUT], f"timeout count wrong: {stats!r}")
    check(
        stats.cancelled == expect[CANCEL_NOW] + expect[CANCEL_RUNNING],
        f"cancelled count wrong: {stats!r}",
    )
    check(stats.rejected == 0, f"spawns rejected: {stats!r}")
    check(phase.wrong_vars == 0, f"{phase.wrong_vars} tasks saw another task's vars")
    check(
        phase.on_error_calls == expect[ERROR],
        f"{phase.on_error_calls} on_error calls for {expect[ERROR]} errors",
    )
    check(
        processor.started == processor.ended == phase.with_span,
        f"spans: {phase.with_span} tasks with a span, {processor.started} started, "
        f"{processor.ended} ended",
    )
    tracer_provider.shutdown()
    if meter_provider is not None:
        meter_provider.shutdown()


def run_asyncio(phase: Phase, seed: int, sdk_metrics: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            phase.loop_exception_handler_calls += 1
            print(f"loop exception handler called: {context.get('message')!r}", file=sys.stderr)

        loop.set_exception_handler(handler)
        await soak(phase, seed, sdk_metrics)
        gc.collect()  # what "Task exception was never retrieved" would need to show up
        await asyncio.sleep(0)

    asyncio.run(main())
    check(
        phase.loop_exception_handler_calls == 0,
        f"the loop's exception handler was called {phase.loop_exception_handler_calls} times",
    )


def run_trio(phase: Phase, seed: int, sdk_metrics: bool) -> None:
    trio.run(soak, phase, seed, sdk_metrics)


def report(phase: Phase, max_growth: float, handler: CountingHandler) -> None:
    stats = phase.statistics
    assert stats is not None
    growth = (phase.rss_end - phase.rss_after_warmup) / 2**20
    per_task = phase.seconds / phase.tasks * 1e6
    print(
        f"{phase.backend}: {phase.tasks:,} tasks in {phase.seconds:.1f} s "
        f"({per_task:.1f} us/task, batches of {phase.batch:,})"
    )
    print(
        f"  outcomes: ok={stats.ok:,} error={stats.error:,} timeout={stats.timeout:,} "
        f"cancelled={stats.cancelled:,} running={stats.running} pending={stats.pending} "
        f"rejected={stats.rejected}"
    )
    print(
        f"  with span: {phase.with_span:,} (all ended); identity checked {phase.identity_checks:,}"
        f" times; wrong vars: {phase.wrong_vars}; on_error calls: "
        f"{phase.on_error_calls:,}; loop exception handler calls: "
        f"{phase.loop_exception_handler_calls}"
    )
    print(
        "  ctxkit log records:",
        {logging.getLevelName(level): n for level, n in sorted(handler.levels.items())},
    )
    print(
        f"  RSS after {phase.warmup_batches} warm-up batches "
        f"{phase.rss_after_warmup / 2**20:.1f} MB,"
        f" at the end {phase.rss_end / 2**20:.1f} MB: growth {growth:+.2f} MB "
        f"(limit {max_growth:g} MB); allocated blocks {phase.objects_after_warmup:,} -> "
        f"{phase.objects_end:,}"
    )
    check(growth < max_growth, f"{phase.backend}: RSS grew {growth:.2f} MB after warm-up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--tasks", type=int, default=1_000_000, help="asyncio tasks")
    parser.add_argument("--trio-tasks", type=int, default=100_000, help="trio tasks")
    parser.add_argument("--batch", type=int, default=10_000, help="tasks spawned per drain")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="batches before the RSS baseline (default: a fifth of them, at least 2)",
    )
    parser.add_argument("--max-rss-growth", type=float, default=10.0, help="MB")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument(
        "--sdk-metrics",
        action="store_true",
        help="record the runner's metrics in an OpenTelemetry SDK MeterProvider (slower)",
    )
    args = parser.parse_args(argv)

    handler = CountingHandler()
    ctxkit_logger = logging.getLogger("ctxkit")
    ctxkit_logger.addHandler(handler)
    ctxkit_logger.propagate = False
    ctxkit_logger.setLevel(logging.INFO)
    unraisable: list[str] = []
    sys.unraisablehook = lambda u: unraisable.append(repr(u.exc_value))

    def warmup(tasks: int) -> int:
        return args.warmup if args.warmup is not None else max(2, tasks // args.batch // 5)

    runs: list[tuple[Phase, Callable[[Phase, int, bool], None]]] = [
        (Phase("asyncio", args.tasks, args.batch, warmup(args.tasks)), run_asyncio),
        (Phase("trio", args.trio_tasks, args.batch, warmup(args.trio_tasks)), run_trio),
    ]
    print(f"soak: Python {sys.version.split()[0]}, ctxkit {ctxkit.__version__}, seed {args.seed}")
    try:
        for phase, run in runs:
            if phase.tasks <= 0:
                continue
            check(
                phase.tasks > phase.batch * phase.warmup_batches,
                f"{phase.backend}: {phase.tasks} tasks leave nothing after {phase.warmup_batches} "
                f"warm-up batches of {phase.batch}; lower --warmup or --batch",
            )
            handler.levels.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run(phase, args.seed, args.sdk_metrics)
            check(not caught, f"{phase.backend}: warnings: {[str(w.message) for w in caught][:5]}")
            check(not unraisable, f"{phase.backend}: unraisable exceptions: {unraisable[:5]}")
            check(
                handler.levels[logging.ERROR] == phase.expected[ERROR],
                f"{phase.backend}: {handler.levels[logging.ERROR]} ERROR records for "
                f"{phase.expected[ERROR]} errors",
            )
            report(phase, args.max_rss_growth, handler)
    except SoakFailure as exc:
        print(f"soak FAILED: {exc}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"soak passed; peak RSS {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
