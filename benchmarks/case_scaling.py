"""Case 6: does the cost per task stay flat as batches grow, and how long does shutdown take?

6a -- scaling. A batch spawns N trivial tasks (no span, 4 vars) all at once, so N are alive
together, and waits until the last has run; batches of fewer than 10,000 tasks are repeated
until 10,000 tasks have run, so every figure covers as many tasks. ctxkit runs with
``limit=None`` (all N running) and with the default ``limit=100`` plus ``pending_limit=None``
(N - 100 queued). Each size's ratio is to the same variant at 1e3 tasks in the same round:
flat means close to 1.0. Bare ``create_task`` is measured the same way, to tell the
interpreter's own growth (cache misses, bigger sets) from ctxkit's.

6b -- drain. N trivial tasks are spawned (outside the clock) and not yet run; the clock covers
the shutdown that waits for all of them to finish: leaving the runner's ``async with``, aiojobs'
``wait_and_close()``, leaving an ``asyncio.TaskGroup``, and, as the baseline, awaiting bare
tasks' completion.

6c -- cancel at shutdown. N tasks are blocked, each on a future of its own; the clock covers
the shutdown that cancels them all and waits until they are gone: ctxkit with
``drain_timeout=0``, aiojobs' ``close()``, and, as the baseline, cancelling bare tasks and
gathering them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiojobs
from opentelemetry import trace

import ctxkit

from ._common import VARS, Batch, Gate, now, parked, request_span, set_vars, tick
from ._harness import Target, Variant, measure

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._harness import CaseResult, Settings

_MIN_TASKS = 10_000


def _size(n: int) -> str:
    return f"1e{len(str(n)) - 1}"


def _scaling_variants(sizes: tuple[int, ...]) -> list[Variant]:
    def bare(n: int) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            total = 0
            for _ in range(max(1, _MIN_TASKS // n)):
                batch = Batch(n, asyncio.Event())
                with trace.use_span(request_span()):
                    t0 = now()
                    for _ in range(n):
                        asyncio.create_task(tick(batch))  # noqa: RUF006 - the baseline
                    await batch.done.wait()
                    await asyncio.sleep(0)
                    total += now() - t0
            return total

        return run

    def with_ctxkit(n: int, limit: int | None) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            total = 0
            for _ in range(max(1, _MIN_TASKS // n)):
                batch = Batch(n, asyncio.Event())
                async with ctxkit.BackgroundRunner(limit=limit, pending_limit=None):
                    with trace.use_span(request_span()):
                        t0 = now()
                        for _ in range(n):
                            ctxkit.spawn(tick(batch), span=False, vars=VARS)
                        await batch.done.wait()
                        await asyncio.sleep(0)
                        total += now() - t0
            return total

        return run

    result: list[Variant] = []
    for label, make in (
        ("ctxkit limit=None", lambda n: with_ctxkit(n, None)),
        ("ctxkit limit=100", lambda n: with_ctxkit(n, 100)),
        ("bare create_task", bare),
    ):
        first = f"{label} @ {_size(sizes[0])}"
        for n in sizes:
            name = f"{label} @ {_size(n)}"
            ops = n * max(1, _MIN_TASKS // n)
            result.append(Variant(name, make(n), ops, ref=None if name == first else first))
    return result


def _drain_variants(n: int) -> list[Variant]:
    async def bare() -> int:
        batch = Batch(n, asyncio.Event())
        tasks = [asyncio.create_task(tick(batch)) for _ in range(n)]
        t0 = now()
        await batch.done.wait()
        await asyncio.sleep(0)
        elapsed = now() - t0
        del tasks
        return elapsed

    def with_ctxkit(limit: int | None) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            async with ctxkit.BackgroundRunner(limit=limit, pending_limit=None, drain_timeout=None):
                for _ in range(n):
                    ctxkit.spawn(tick(batch), span=False, vars=VARS)
                t0 = now()
            return now() - t0

        return run

    def with_aiojobs(limit: int | None) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            scheduler = aiojobs.Scheduler(limit=limit, pending_limit=n, wait_timeout=None)
            for _ in range(n):
                await scheduler.spawn(tick(batch))
            t0 = now()
            await scheduler.wait_and_close()
            return now() - t0

        return run

    async def taskgroup() -> int:
        batch = Batch(n, asyncio.Event())
        async with asyncio.TaskGroup() as tg:
            for _ in range(n):
                tg.create_task(tick(batch))
            t0 = now()
        return now() - t0

    return [
        Variant("bare tasks finish", bare, n),
        Variant("ctxkit runner exit (limit=None)", with_ctxkit(None), n),
        Variant("ctxkit runner exit (limit=100)", with_ctxkit(100), n),
        Variant("aiojobs wait_and_close (limit=None)", with_aiojobs(None), n),
        Variant("aiojobs wait_and_close (limit=100)", with_aiojobs(100), n),
        Variant("asyncio.TaskGroup exit", taskgroup, n),
    ]


def _cancel_variants(n: int) -> list[Variant]:
    async def bare() -> int:
        gate = Gate(n)
        tasks = [asyncio.create_task(parked(gate)) for _ in range(n)]
        await gate.all_blocked.wait()
        t0 = now()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return now() - t0

    async def with_ctxkit() -> int:
        gate = Gate(n)
        async with ctxkit.BackgroundRunner(limit=None, pending_limit=None, drain_timeout=0):
            for _ in range(n):
                ctxkit.spawn(parked(gate), span=False, vars=VARS)
            await gate.all_blocked.wait()
            t0 = now()
        return now() - t0

    async def with_aiojobs() -> int:
        gate = Gate(n)
        scheduler = aiojobs.Scheduler(limit=None, close_timeout=None)
        for _ in range(n):
            await scheduler.spawn(parked(gate))
        await gate.all_blocked.wait()
        t0 = now()
        await scheduler.close()
        return now() - t0

    return [
        Variant("bare cancel + gather", bare, n),
        Variant("ctxkit runner exit (drain_timeout=0)", with_ctxkit, n),
        Variant("aiojobs close()", with_aiojobs, n),
    ]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 6."""
    sizes = (1_000, 10_000, 100_000) if settings.quick else (1_000, 10_000, 100_000, 1_000_000)
    n_drain = 10_000 if settings.quick else 100_000
    rounds = settings.pick_rounds(full=3, quick=2)
    scaling_rounds = settings.pick_rounds(full=5, quick=2)
    top = _size(sizes[-1])
    targets = [
        Target(
            f"cost per task flat within 20% from 1e3 to {top} ({label})",
            f"{label} @ {top}",
            f"{label} @ 1e3",
            1.2,
        )
        for label in ("ctxkit limit=None", "ctxkit limit=100")
    ]

    async def main() -> list[CaseResult]:
        set_vars()
        scaling_variants = _scaling_variants(sizes)
        for v in scaling_variants:  # warm up on the small sizes only: 1e6 is costly
            if v.ops == _MIN_TASKS:
                await v.run()  # type: ignore[misc]
        scaling = await measure(
            "6a",
            f"cost per task vs batch size, no span, 4 vars (1e3 .. {top} tasks alive at once)",
            scaling_variants,
            baseline="bare create_task @ 1e3",
            rounds=scaling_rounds,
            warmup=0,
            targets=targets,
            notes=[
                "read the 'vs ref' column: each size against the same variant at 1e3",
                "the garbage collector is disabled while a batch runs (as in every case); "
                "with it enabled, CPython's full collections make every variant grow with N",
            ],
        )
        drain = await measure(
            "6b",
            f"drain at shutdown: {n_drain:,} spawned tasks that finish",
            _drain_variants(n_drain),
            baseline="bare tasks finish",
            rounds=rounds,
            warmup=0 if settings.quick else 1,
            notes=["the clock starts after the spawns: it covers running the tasks and the drain"],
        )
        cancel = await measure(
            "6c",
            f"cancel at shutdown: {n_drain:,} blocked tasks",
            _cancel_variants(n_drain),
            baseline="bare cancel + gather",
            rounds=rounds,
            warmup=0 if settings.quick else 1,
            notes=[
                "aiojobs with close_timeout=None (its default 0.1 s would cut the wait)",
                "each task waits on its own future: had they all waited on one asyncio.Event, "
                "ctxkit and aiojobs (which cancel in set order, not spawn order) would pay "
                "O(N) per cancel in Event's waiter deque: 118x and 141x bare at 1e5",
            ],
        )
        return [scaling, drain, cancel]

    return asyncio.run(main())
