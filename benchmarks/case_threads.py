"""Case 9: background work from threads, and executors that keep the context.

9a: a worker thread (as a FastAPI ``def`` endpoint runs in) spawns N trivial tasks, no span, 4
vars, into a runner on the asyncio loop; the batch ends when the last task has run. Compared:
ctxkit's ``runner.spawn`` called in the thread (clone in the thread, hand-over to the loop),
``anyio.from_thread.run_sync(runner.spawn, ...)`` (the hint the docs gave before: one blocking
round trip to the loop per spawn), and the same work by hand: a detached Context built in the
thread and ``loop.call_soon_threadsafe`` creating a strongly held task in it.

9b: N ``submit`` calls of a trivial function, then waiting for every future: ``ContextExecutor``
(a clone made at each submit) vs a plain ``ThreadPoolExecutor`` (no context at all) and vs
submitting ``copy_context().run`` by hand.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import anyio.to_thread
from opentelemetry import trace

import ctxkit

from ._common import VARS, Batch, StrongSet, hand_clone, now, request_span, set_vars, tick
from ._harness import Target, Variant, measure, measure_sync

if TYPE_CHECKING:
    from ._harness import CaseResult, Settings

TITLE_A = "spawn from a worker thread into an asyncio runner, no span, 4 vars"
TITLE_B = "executor submit + wait, trivial job"

FROM_THREAD = "anyio.from_thread.run_sync(runner.spawn, ...)"
BY_HAND = "hand-written: Context + call_soon_threadsafe + strong set"
CTXKIT = "ctxkit runner.spawn from the thread"
PLAIN = "ThreadPoolExecutor.submit"
HAND_EXEC = "ThreadPoolExecutor.submit(copy_context().run, fn)"
CTX_EXEC = "ctxkit.ContextExecutor.submit"

TARGETS_A = [
    Target(
        "spawn from a thread <= 0.5x anyio.from_thread.run_sync(runner.spawn)",
        CTXKIT,
        FROM_THREAD,
        0.5,
        floor=BY_HAND,
    )
]


def thread_variants(n: int) -> list[Variant]:
    """Return case 9a's variants, each spawning ``n`` tasks from one worker thread."""

    def in_thread(produce: object) -> object:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            async with ctxkit.BackgroundRunner(limit=None, pending_limit=None) as runner:
                t0 = now()
                await anyio.to_thread.run_sync(produce, runner, batch)  # type: ignore[arg-type]
                await batch.done.wait()
                await asyncio.sleep(0)
                return now() - t0

        return run

    def with_ctxkit(runner: ctxkit.BackgroundRunner, batch: Batch) -> None:
        with trace.use_span(request_span()):
            for _ in range(n):
                runner.spawn(tick(batch), span=False, vars=VARS)

    def with_from_thread(runner: ctxkit.BackgroundRunner, batch: Batch) -> None:
        with trace.use_span(request_span()):
            for _ in range(n):
                # the clone is made on the loop, from the context run_sync gives the call
                anyio.from_thread.run_sync(lambda: runner.spawn(tick(batch), span=False, vars=VARS))

    loop_box: list[asyncio.AbstractEventLoop] = []
    strong = StrongSet()

    def by_hand(runner: ctxkit.BackgroundRunner, batch: Batch) -> None:
        loop = loop_box[0]
        with trace.use_span(request_span()):
            for _ in range(n):
                context = hand_clone(VARS)
                coro = tick(batch)
                loop.call_soon_threadsafe(
                    lambda coro=coro, context=context: strong.tasks.add(  # type: ignore[misc]
                        loop.create_task(coro, context=context)
                    )
                )

    async def hand_run() -> int:
        loop_box[:] = [asyncio.get_running_loop()]
        result = await in_thread(by_hand)()  # type: ignore[operator]
        strong.tasks.clear()
        return result  # type: ignore[no-any-return]

    return [
        Variant(FROM_THREAD, in_thread(with_from_thread), n),  # type: ignore[arg-type]
        Variant(BY_HAND, hand_run, n),
        Variant(CTXKIT, in_thread(with_ctxkit), n, ref=BY_HAND),  # type: ignore[arg-type]
    ]


def executor_variants(n: int) -> list[Variant]:
    """Return case 9b's variants, each submitting ``n`` jobs and waiting for them."""
    plain = ThreadPoolExecutor(4)
    cloning = ctxkit.ContextExecutor(max_workers=4, vars=VARS)

    def job() -> int:
        return 1

    def submit_plain() -> int:
        t0 = now()
        wait([plain.submit(job) for _ in range(n)])
        return now() - t0

    def submit_by_hand() -> int:
        t0 = now()
        wait([plain.submit(contextvars.copy_context().run, job) for _ in range(n)])
        return now() - t0

    def submit_cloning() -> int:
        t0 = now()
        wait([cloning.submit(job) for _ in range(n)])
        return now() - t0

    return [
        Variant(PLAIN, submit_plain, n),
        Variant(HAND_EXEC, submit_by_hand, n),
        Variant(CTX_EXEC, submit_cloning, n, ref=HAND_EXEC),
    ]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 9."""
    n = 2_000 if settings.quick else 10_000
    rounds = settings.pick_rounds(full=9, quick=2)

    async def main() -> CaseResult:
        set_vars()
        return await measure(
            "9a",
            f"{TITLE_A}, {n:,} tasks/batch",
            thread_variants(n),
            baseline=FROM_THREAD,
            rounds=rounds,
            targets=TARGETS_A,
            notes=[
                "the thread's spawns return at once; the batch ends when the last task ran",
            ],
        )

    first = asyncio.run(main())
    set_vars()
    second = measure_sync(
        "9b",
        f"{TITLE_B}, {n:,} jobs/batch",
        executor_variants(n),
        baseline=PLAIN,
        rounds=rounds,
        notes=["4 worker threads each; the plain pool carries no context at all"],
    )
    return [first, second]
