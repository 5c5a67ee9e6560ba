"""Where a spawn's time goes: ``python -m benchmarks.layers [--rounds N] [--seed N]``.

Case 1's shape (a burst of 10,000 trivial tasks, 4 vars, a valid request span, no task span)
built up one layer at a time, each row adding one thing a supervised spawn needs, in one
process with interleaved rounds in a shuffled order (as the suite does):

1. bare ``create_task``;
2. in ctxkit's clone (``clone_without_span``), so the task sees only the carried vars;
3. through a wrapper coroutine that catches the outcome;
4. with a handle object per task (14 slots, as ``BackgroundTask``) passed to the wrapper;
5. held in a dict of running tasks from spawn to end (the strong reference);
6. with the metrics ctxkit records per task: ``wait`` at start and ``duration`` at the end
   (two histogram calls on the API's proxy meter, two ``perf_counter()`` reads), and one
   count per task name and outcome (what the observed ``ctxkit.tasks.finished`` reads);
7. row 6 with at most 100 tasks running: the others wait in a deque, and each end starts the
   next one (its wait recorded), with no checks at all.

Row 6 is the structure of a supervised spawn, written inline with no checks at all, and row 7
the same with the default limit; ``runner.spawn`` and ``ctxkit.spawn`` minus row 6 (row 7 for
``limit=100``) is what ctxkit's own logic costs (finding the runner, options, admission and
limits, the core's bookkeeping at the end). Stand-ins only,
public APIs only: nothing here reaches into ctxkit. On this kind of VM, a layer that adds one
Python call per task costs several times what the same call costs in a tight loop: the burst
touches 10,000 tasks' objects, which no cache holds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

import ctxkit

from ._common import VARS, Batch, now, request_span, set_vars, tick
from ._harness import Variant, measure, set_seed

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

N = 10_000
LIMIT = 100
BARE = "1. bare create_task"


class _Series:
    """A stand-in for ctxkit's per-name-and-outcome count of finished tasks."""

    __slots__ = ("finished",)

    def __init__(self) -> None:
        self.finished = 0


class _Handle:
    """A stand-in for ``BackgroundTask``: the same number of slots, filled the same way."""

    __slots__ = (*(f"s{i}" for i in range(13)), "name")

    def __init__(self, coro: object, context: object, started_at: float) -> None:
        self.name = "tick"
        self.s0 = coro
        self.s1 = context
        self.s2 = self.s3 = self.s4 = self.s5 = self.s6 = self.s7 = self.s8 = None
        self.s9 = self.s10 = started_at
        self.s11 = 0
        self.s12 = None


def _variants() -> list[Variant]:
    meter = metrics.get_meter("benchmarks.layers")
    wait = meter.create_histogram("wait")
    duration = meter.create_histogram("duration")
    attributes = {"ctxkit.task.name": "tick", "ctxkit.task.outcome": "ok"}
    series = _Series()
    running: dict[Any, bool] = {}
    failed: list[BaseException] = []
    queue: deque[_Handle] = deque()

    async def plain(coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception as exc:  # pragma: no cover - tick does not raise
            failed.append(exc)

    async def handled(handle: _Handle, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception as exc:  # pragma: no cover
            failed.append(exc)
        handle.s0 = handle.s1 = None

    async def held(handle: _Handle, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception as exc:  # pragma: no cover
            failed.append(exc)
        running.pop(handle, None)
        handle.s0 = handle.s1 = None

    async def measured(handle: _Handle, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception as exc:  # pragma: no cover
            failed.append(exc)
        running.pop(handle, None)
        handle.s0 = handle.s1 = None
        series.finished += 1
        duration.record(perf_counter() - handle.s9, attributes)  # type: ignore[operator]

    async def queued(handle: _Handle, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception as exc:  # pragma: no cover
            failed.append(exc)
        running.pop(handle, None)
        handle.s0 = handle.s1 = None
        series.finished += 1
        end = perf_counter()
        duration.record(end - handle.s9, attributes)  # type: ignore[operator]
        if queue:
            waiting = queue.popleft()
            wait.record(end - waiting.s9)  # type: ignore[operator]
            waiting.s9 = end
            running[waiting] = True
            loop: asyncio.AbstractEventLoop = waiting.s2  # type: ignore[assignment]
            loop.create_task(queued(waiting, waiting.s0), context=waiting.s1)  # type: ignore[arg-type]

    def layer(name: str, spawn: Callable[[asyncio.AbstractEventLoop, Batch], None]) -> Variant:
        async def run() -> int:
            batch = Batch(N, asyncio.Event())
            loop = asyncio.get_running_loop()
            with trace.use_span(request_span()):
                t0 = now()
                for _ in range(N):
                    spawn(loop, batch)
                await batch.done.wait()
                await asyncio.sleep(0)
                return now() - t0

        return Variant(name, run, N)

    def bare(loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        asyncio.create_task(tick(batch))  # noqa: RUF006 - the baseline

    def cloned(loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        loop.create_task(tick(batch), context=ctxkit.clone_without_span(*VARS))

    def wrapped(loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        context = ctxkit.clone_without_span(*VARS)
        loop.create_task(plain(tick(batch)), context=context)

    def with_handle(loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        context = ctxkit.clone_without_span(*VARS)
        coro = tick(batch)
        handle = _Handle(coro, context, 0.0)
        loop.create_task(handled(handle, coro), context=context)

    def with_dict(loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        context = ctxkit.clone_without_span(*VARS)
        coro = tick(batch)
        handle = _Handle(coro, context, 0.0)
        running[handle] = True
        loop.create_task(held(handle, coro), context=context)

    def with_metrics(loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        context = ctxkit.clone_without_span(*VARS)
        coro = tick(batch)
        handle = _Handle(coro, context, perf_counter())
        running[handle] = True
        wait.record(0.0)
        loop.create_task(measured(handle, coro), context=context)

    def with_queue(loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        context = ctxkit.clone_without_span(*VARS)
        coro = tick(batch)
        handle = _Handle(coro, context, perf_counter())
        if len(running) >= LIMIT:
            handle.s2 = loop
            queue.append(handle)
            return
        running[handle] = True
        wait.record(0.0)
        loop.create_task(queued(handle, coro), context=context)

    def ctxkit_variant(name: str, direct: bool, limit: int | None = None) -> Variant:
        async def run() -> int:
            batch = Batch(N, asyncio.Event())
            async with ctxkit.BackgroundRunner(limit=limit) as runner:
                spawn = runner.spawn if direct else ctxkit.spawn
                with trace.use_span(request_span()):
                    t0 = now()
                    for _ in range(N):
                        spawn(tick(batch), span=False, vars=VARS)
                    await batch.done.wait()
                    await asyncio.sleep(0)
                    return now() - t0

        return Variant(name, run, N)

    return [
        layer(BARE, bare),
        layer("2. + ctxkit's clone (clone_without_span)", cloned),
        layer("3. + a wrapper coroutine", wrapped),
        layer("4. + a 14-slot handle per task", with_handle),
        layer("5. + a dict of running tasks", with_dict),
        layer("6. + metrics: 2 histogram calls, a count, 2 perf_counter()", with_metrics),
        layer(f"7. row 6, at most {LIMIT} running, a deque for the rest", with_queue),
        ctxkit_variant("runner.spawn (limit=None)", direct=True),
        ctxkit_variant("ctxkit.spawn (limit=None)", direct=False),
        ctxkit_variant(f"runner.spawn (limit={LIMIT})", direct=True, limit=LIMIT),
        ctxkit_variant(f"ctxkit.spawn (limit={LIMIT})", direct=False, limit=LIMIT),
    ]


async def _main(rounds: int) -> None:
    set_vars()
    result = await measure(
        "layers",
        f"the layers of a supervised spawn, no span, 4 vars (asyncio), {N:,} tasks/batch",
        _variants(),
        baseline=BARE,
        rounds=rounds,
        notes=[
            "each row adds one layer to the row above it (row 7: to row 6); the rest is ctxkit",
        ],
    )
    print(result.table())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layers")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the round order")
    args = parser.parse_args(argv)
    set_seed(args.seed)
    asyncio.run(_main(args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
