"""Case 5: memory held per pending task (N tasks blocked on one event), by tracemalloc.

A batch starts tracing, spawns N tasks, waits until every one of them has started and is
blocked on the event, and reads ``tracemalloc``'s current traced size: the difference from
before the spawns, over N, is the figure (bytes per task). Then the event opens and the
tasks finish. Everything the task needs while it waits counts: its coroutine frame, the
future it waits on, the asyncio.Task, the Context, the strong reference, ctxkit's handle and,
with a span, the span. Runners and schedulers are made before the first reading.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import TYPE_CHECKING

import aiojobs
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

import ctxkit

from ._common import (
    VARS,
    Gate,
    HandClone,
    HandSpan,
    StrongSet,
    StrongSpan,
    blocked,
    request_span,
    set_vars,
    unsampled_request_span,
)
from ._harness import Target, Variant, measure

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._harness import CaseResult, Settings

TITLE = "memory per pending task (asyncio, tracemalloc)"

BARE = "bare create_task (+ list)"
STRONG = "strong set + done-callback"
STRONG_SPAN = "strong set + span (SDK)"
HAND = "hand-written ctxkit equivalent"
HAND_SPAN = "hand-written + span (SDK)"
AIOJOBS = "aiojobs (limit=None)"
CTXKIT = "ctxkit.spawn, no span"
CTXKIT_SPAN = "ctxkit.spawn, span (SDK)"
CTXKIT_SPAN_OUT = "ctxkit.spawn, span sampled out"


async def _held(n: int, spawn: Callable[[Gate], Awaitable[object] | object]) -> int:
    """Spawn ``n`` blocked tasks with ``spawn``; return the bytes they hold while blocked."""
    gate = Gate(n)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            result = spawn(gate)
            if asyncio.iscoroutine(result):
                await result
        await gate.all_blocked.wait()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    gate.open.set()
    return held


def variants(n: int, provider: TracerProvider, ratio: TracerProvider) -> list[Variant]:
    """Return the variants, each holding ``n`` pending tasks."""
    tracer = provider.get_tracer("bench")

    async def bare() -> int:
        tasks = []  # without it the measurement would not know when they are done

        def spawn(gate: Gate) -> None:
            tasks.append(asyncio.create_task(blocked(gate)))

        with trace.use_span(request_span()):
            held = await _held(n, spawn)
        await asyncio.gather(*tasks)
        return held

    async def with_spawner(spawner: StrongSet) -> int:
        with trace.use_span(request_span()):
            held = await _held(n, lambda gate: spawner.spawn(blocked(gate)))
        await asyncio.wait(list(spawner.tasks))
        return held

    async def strong() -> int:
        return await with_spawner(StrongSet())

    async def hand() -> int:
        return await with_spawner(HandClone(VARS))

    async def hand_span() -> int:
        with tracer.start_as_current_span("request"):
            return await with_spawner(HandSpan(tracer, VARS))

    async def strong_span() -> int:
        with tracer.start_as_current_span("request"):
            return await with_spawner(StrongSpan(tracer))

    async def aiojobs_variant() -> int:
        scheduler = aiojobs.Scheduler(limit=None)
        await scheduler.spawn(asyncio.sleep(0))  # its helper task exists before the reading
        try:
            with trace.use_span(request_span()):
                return await _held(n, lambda gate: scheduler.spawn(blocked(gate)))
        finally:
            await scheduler.wait_and_close()

    def ctxkit_variant(span: bool, sampled: bool = True) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            async with ctxkit.BackgroundRunner(
                limit=None, pending_limit=None, tracer_provider=provider if sampled else ratio
            ):
                with (
                    tracer.start_as_current_span("request")
                    if sampled
                    else trace.use_span(unsampled_request_span())
                ):
                    return await _held(
                        n, lambda gate: ctxkit.spawn(blocked(gate), span=span, vars=VARS)
                    )

        return run

    return [
        Variant(STRONG, strong, n),
        Variant(BARE, bare, n),
        Variant(HAND, hand, n),
        Variant(HAND_SPAN, hand_span, n),
        Variant(STRONG_SPAN, strong_span, n),
        Variant(AIOJOBS, aiojobs_variant, n),
        Variant(CTXKIT, ctxkit_variant(False), n, ref=HAND),
        Variant(CTXKIT_SPAN, ctxkit_variant(True), n, ref=HAND_SPAN),
        Variant(CTXKIT_SPAN_OUT, ctxkit_variant(True, sampled=False), n, ref=CTXKIT),
    ]


TARGETS = (
    Target(
        "memory per pending task without span <= 1.3x strong set", CTXKIT, STRONG, 1.3, floor=HAND
    ),
    Target(
        "memory per pending task with span <= 1.3x strong set with span",
        CTXKIT_SPAN,
        STRONG_SPAN,
        1.3,
        floor=HAND_SPAN,
    ),
)


def run(settings: Settings) -> list[CaseResult]:
    """Run case 5."""
    n = 5_000 if settings.quick else 100_000
    rounds = settings.pick_rounds(full=1, quick=1)

    async def main() -> CaseResult:
        set_vars()
        provider = TracerProvider()
        ratio = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
        try:
            return await measure(
                "5",
                f"{TITLE}, {n:,} tasks",
                variants(n, provider, ratio),
                baseline=STRONG,
                rounds=rounds,
                warmup=0,
                unit="B/task",
                targets=TARGETS,
                notes=[
                    "spans come from an SDK TracerProvider without processor; the spawner is "
                    "inside a recording request span (ctxkit, hand + span) or a non-recording "
                    "valid one (the others)",
                    "the event loop's own per-task bookkeeping (its weak set of all tasks, the "
                    "ready queue) is included for every variant",
                    "strong set + span: the strong-set pattern with an SDK span per task, "
                    "started at spawn and ended with the task; span sampled out: a "
                    "ParentBased(TraceIdRatioBased(0.1)) provider under a request span that was "
                    "not sampled",
                ],
            )
        finally:
            provider.shutdown()
            ratio.shutdown()

    return [asyncio.run(main())]
