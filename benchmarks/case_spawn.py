"""Case 1: spawn and finish a batch of trivial tasks, no span, 4 vars carried.

A batch spawns N tasks from one coroutine that has a valid current span (an instrumented
request) and 4 vars set, then waits until the last task has run; ns/op is the batch time over
N. Runners, schedulers and task groups are opened before the clock starts and closed after it
stops, except the task groups, whose exit is how they wait (it is part of the batch).

ctxkit's rows pass the 4 vars as ``vars=`` a tuple; each "vars list" row passes the same vars as
a list and reads its ``vs ref`` against the tuple's row, as does the "registered vars" row, which
gives them to ``ctxkit.register`` (outside the clock) and passes no ``vars=``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import anyio
from opentelemetry import trace

import ctxkit

from ._common import (
    VARS,
    VARS_LIST,
    Batch,
    HandClone,
    StrongSet,
    now,
    request_context,
    request_span,
    set_vars,
    tick,
)
from ._harness import Target, Variant, measure

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextvars import ContextVar

    from ._harness import CaseResult, Settings

TITLE = "spawn + finish, no span, 4 vars (asyncio)"

BARE = "bare create_task"
STRONG = "strong set + done-callback"
HAND = "hand-written ctxkit equivalent"
AIOJOBS = "aiojobs spawn (limit=100)"
AIOJOBS_NONE = "aiojobs spawn (limit=None)"
TASKGROUP = "asyncio.TaskGroup.create_task"
ANYIO = "anyio TaskGroup.start_soon"
CTXKIT = "ctxkit.spawn (limit=None)"
CTXKIT_100 = "ctxkit.spawn (limit=100, default)"
CTXKIT_NOTRACE = "ctxkit.spawn (limit=None, no span active)"
FLOOR_CLONE = "floor: clone_without_span + create_task"
FLOOR_STRONG = "floor: clone_without_span + strong set"
BARE_REQ = "bare create_task, per request"
FLOOR_REQ = "floor: clone_without_span + strong set, per request"
HAND_REQ = "hand-written ctxkit equivalent, per request"
CTXKIT_REQ = "ctxkit.spawn (limit=None), per request"
CTXKIT_LIST = "ctxkit.spawn (limit=None), vars list"
CTXKIT_100_LIST = "ctxkit.spawn (limit=100, default), vars list"
CTXKIT_REGISTERED = "ctxkit.spawn (limit=None), registered vars"
CTXKIT_REQ_LIST = "ctxkit.spawn (limit=None), per request, vars list"


def variants(n: int) -> list[Variant]:
    """Return the variants of this case, each spawning ``n`` tasks per batch."""
    requests = [request_context(i) for i in range(n)]  # "per request": one spawn from each

    async def bare() -> int:
        batch = Batch(n, asyncio.Event())
        with trace.use_span(request_span()):
            t0 = now()
            for _ in range(n):
                asyncio.create_task(tick(batch))  # noqa: RUF006 - the point of the baseline
            await batch.done.wait()
            await asyncio.sleep(0)
            return now() - t0

    async def strong() -> int:
        batch = Batch(n, asyncio.Event())
        spawner = StrongSet()
        with trace.use_span(request_span()):
            t0 = now()
            for _ in range(n):
                spawner.spawn(tick(batch))
            await batch.done.wait()
            await asyncio.sleep(0)
            return now() - t0

    async def hand() -> int:
        batch = Batch(n, asyncio.Event())
        spawner = HandClone(VARS)
        with trace.use_span(request_span()):
            t0 = now()
            for _ in range(n):
                spawner.spawn(tick(batch))
            await batch.done.wait()
            await asyncio.sleep(0)
            return now() - t0

    def floor(name: str, strong_set: bool) -> Variant:
        """ctxkit's cached clone with the least that runs a task in it (no runner)."""

        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            loop = asyncio.get_running_loop()
            spawner = StrongSet()
            with trace.use_span(request_span()):
                t0 = now()
                for _ in range(n):
                    context = ctxkit.clone_without_span(*VARS)
                    if strong_set:
                        task = loop.create_task(tick(batch), context=context)
                        spawner.tasks.add(task)
                        task.add_done_callback(spawner.done)
                    else:
                        loop.create_task(tick(batch), context=context)  # noqa: RUF006
                await batch.done.wait()
                await asyncio.sleep(0)
                return now() - t0

        return Variant(name, run, n)

    def aiojobs_variant(limit: int | None) -> Variant:
        async def run() -> int:
            import aiojobs  # a peer, of the bench extra: the suite's tests build the variants

            batch = Batch(n, asyncio.Event())
            scheduler = aiojobs.Scheduler(limit=limit, pending_limit=max(n, 10_000))
            try:
                with trace.use_span(request_span()):
                    t0 = now()
                    for _ in range(n):
                        await scheduler.spawn(tick(batch))
                    await batch.done.wait()
                    await asyncio.sleep(0)
                    return now() - t0
            finally:
                await scheduler.close()

        return Variant(AIOJOBS if limit == 100 else AIOJOBS_NONE, run, n)

    async def taskgroup() -> int:
        batch = Batch(n, asyncio.Event())
        with trace.use_span(request_span()):
            t0 = now()
            async with asyncio.TaskGroup() as tg:
                for _ in range(n):
                    tg.create_task(tick(batch))
            return now() - t0

    async def anyio_group() -> int:
        batch = Batch(n, asyncio.Event())
        with trace.use_span(request_span()):
            t0 = now()
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(tick, batch)
            return now() - t0

    def ctxkit_variant(
        name: str,
        limit: int | None,
        *,
        traced: bool = True,
        vars: tuple[ContextVar[str], ...] | list[ContextVar[str]] = VARS,
        registered: bool = False,
        ref: str | None = None,
    ) -> Variant:
        """``ctxkit.spawn(..., vars=vars)``; ``registered``: the 4 vars registered instead
        (outside the clock) and no ``vars=``."""

        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            if registered:
                ctxkit.register(*VARS)
            try:
                async with ctxkit.BackgroundRunner(limit=limit):
                    span = request_span() if traced else trace.INVALID_SPAN
                    with trace.use_span(span):
                        t0 = now()
                        if registered:
                            for _ in range(n):
                                ctxkit.spawn(tick(batch), span=False)
                        else:
                            for _ in range(n):
                                ctxkit.spawn(tick(batch), span=False, vars=vars)
                        await batch.done.wait()
                        await asyncio.sleep(0)
                        return now() - t0
            finally:
                if registered:
                    ctxkit.unregister(*VARS)

        if ref is None:
            ref = AIOJOBS if limit == 100 else AIOJOBS_NONE
        return Variant(name, run, n, ref=ref)

    def per_request(name: str, make: Callable[[], Callable[[Any], object]]) -> Variant:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            async with ctxkit.BackgroundRunner(limit=None):
                go = make()
                t0 = now()
                for request in requests:
                    request.run(go, tick(batch))
                await batch.done.wait()
                await asyncio.sleep(0)
                return now() - t0

        ref = {CTXKIT_REQ: HAND_REQ, CTXKIT_REQ_LIST: CTXKIT_REQ}.get(name)
        return Variant(name, run, n, ref=ref)

    def ctxkit_go() -> Callable[[Any], object]:
        return lambda coro: ctxkit.spawn(coro, span=False, vars=VARS)

    def ctxkit_list_go() -> Callable[[Any], object]:
        return lambda coro: ctxkit.spawn(coro, span=False, vars=VARS_LIST)

    def hand_go() -> Callable[[Any], object]:
        return HandClone(VARS).spawn

    def bare_go() -> Callable[[Any], object]:
        return asyncio.create_task

    def floor_go() -> Callable[[Any], object]:
        spawner = StrongSet()
        loop = asyncio.get_running_loop()

        def go(coro: Any) -> object:
            task = loop.create_task(coro, context=ctxkit.clone_without_span(*VARS))
            spawner.tasks.add(task)
            task.add_done_callback(spawner.done)
            return task

        return go

    return [
        Variant(BARE, bare, n),
        Variant(STRONG, strong, n),
        Variant(HAND, hand, n),
        aiojobs_variant(100),
        aiojobs_variant(None),
        Variant(TASKGROUP, taskgroup, n),
        Variant(ANYIO, anyio_group, n),
        ctxkit_variant(CTXKIT, None),
        ctxkit_variant(CTXKIT_LIST, None, vars=VARS_LIST, ref=CTXKIT),
        ctxkit_variant(CTXKIT_REGISTERED, None, registered=True, ref=CTXKIT),
        ctxkit_variant(CTXKIT_100, 100),
        ctxkit_variant(CTXKIT_100_LIST, 100, vars=VARS_LIST, ref=CTXKIT_100),
        ctxkit_variant(CTXKIT_NOTRACE, None, traced=False),
        floor(FLOOR_CLONE, strong_set=False),
        floor(FLOOR_STRONG, strong_set=True),
        per_request(BARE_REQ, bare_go),
        per_request(HAND_REQ, hand_go),
        per_request(FLOOR_REQ, floor_go),
        per_request(CTXKIT_REQ, ctxkit_go),
        per_request(CTXKIT_REQ_LIST, ctxkit_list_go),
    ]


TARGETS = (
    Target(
        "spawn without span, 4 vars, <= 2.0x bare create_task",
        CTXKIT,
        BARE,
        2.0,
        floor=FLOOR_STRONG,
    ),
    Target(
        "... default limit=100, <= 2.0x bare create_task", CTXKIT_100, BARE, 2.0, floor=FLOOR_STRONG
    ),
    Target("below aiojobs (both limit=100, the defaults)", CTXKIT_100, AIOJOBS, 1.0, True),
    Target("below aiojobs (both limit=None)", CTXKIT, AIOJOBS_NONE, 1.0, True),
    Target(
        "one spawn per request <= 1.0x the hand-written equivalent",
        CTXKIT_REQ,
        HAND_REQ,
        1.0,
        floor=FLOOR_REQ,
    ),
    Target(
        "one spawn per request <= 2.5x bare create_task", CTXKIT_REQ, BARE_REQ, 2.5, floor=FLOOR_REQ
    ),
)


def run(settings: Settings) -> list[CaseResult]:
    """Run case 1."""
    n = 10_000
    rounds = settings.pick_rounds(full=15, quick=3)

    async def main() -> CaseResult:
        set_vars()
        return await measure(
            "1",
            f"{TITLE}, {n:,} tasks/batch",
            variants(n),
            baseline=BARE,
            rounds=rounds,
            targets=TARGETS,
            notes=[
                "limit=100 variants (ctxkit and aiojobs) use the default pending_limit=10,000: "
                "100 tasks run and the other 9,900 wait in the queue",
                "'no span active': no valid span in the caller, so each clone gets a new "
                "fake trace id (os.urandom)",
                "'floor' rows: ctxkit's own cached clone (public clone_without_span) and a task "
                "run in it, bare or with the strong set, and no runner: ctxkit.spawn minus a "
                "floor is what the runner costs (handle, counts, metrics, limits, outcome)",
                "'per request': each spawn comes from a different request context (its own "
                "4 var values and span), as one spawn per request handler does; ctxkit's clone "
                "cache misses every time; each spawn includes a Context.run into the request",
                "'vars list': the same 4 vars passed as a list, not a tuple; 'registered vars': "
                "the 4 vars given to ctxkit.register (outside the clock) and no vars=; vs ref: "
                "each against the same row with the tuple",
            ],
        )

    return [asyncio.run(main())]
