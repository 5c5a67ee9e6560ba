"""Case 7: spawn and finish a batch of trivial tasks on trio (no span, 4 vars).

The batch is the same as case 1's: N tasks spawned from a coroutine with a valid current span
and 4 vars set, then a wait until the last has run. ``nursery.start_soon`` and anyio's
``start_soon`` copy the caller's whole context (no detaching); their batch ends when the
nursery exits. ctxkit's runner is opened before the clock starts and closed after it stops.

Two floor rows show what any trio task that no user nursery or cancel scope reaches, and that
its owner alone can cancel, costs with trio's public API before ctxkit does anything: a system
task of the run (``spawn_system_task``, in a copy of the caller's context), and the same with
a cancel scope of its own, entered by the task (trio cancels a single task only through a
scope that task has entered: ``cancel()`` and ``timeout`` need it).
"""

from __future__ import annotations

from contextvars import copy_context
from typing import TYPE_CHECKING, Any

import anyio
from opentelemetry import trace

import ctxkit

from ._common import VARS, Batch, now, request_span, set_vars, tick
from ._harness import Target, Variant, measure, skipped

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from ._harness import CaseResult, Settings

TITLE = "spawn + finish on trio, no span, 4 vars"

NURSERY = "trio nursery.start_soon"
ANYIO = "anyio TaskGroup.start_soon"
SYSTEM = "trio spawn_system_task (floor)"
SYSTEM_SCOPE = "spawn_system_task + own CancelScope (floor)"
CTXKIT = "ctxkit.spawn (limit=None)"
CTXKIT_100 = "ctxkit.spawn (limit=100, default)"

TARGETS = (
    Target("trio spawn, no span (limit=None) <= 2.0x nursery.start_soon", CTXKIT, NURSERY, 2.0),
    Target("trio spawn, no span (limit=100) <= 2.0x nursery.start_soon", CTXKIT_100, NURSERY, 2.0),
)


def variants(n: int) -> list[Variant]:
    """Return the variants of this case, each spawning ``n`` tasks per batch."""
    import trio

    async def nursery() -> int:
        batch = Batch(n, trio.Event())
        with trace.use_span(request_span()):
            t0 = now()
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(tick, batch)
            return now() - t0

    async def anyio_group() -> int:
        batch = Batch(n, trio.Event())
        with trace.use_span(request_span()):
            t0 = now()
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(tick, batch)
            return now() - t0

    async def in_own_scope(coro: Coroutine[Any, Any, None]) -> None:
        with trio.CancelScope():
            await coro

    def system_tasks(scoped: bool) -> Variant:
        async def run() -> int:
            batch = Batch(n, trio.Event())
            spawn = trio.lowlevel.spawn_system_task
            with trace.use_span(request_span()):
                t0 = now()
                for _ in range(n):
                    if scoped:
                        spawn(in_own_scope, tick(batch), context=copy_context())
                    else:
                        spawn(tick, batch, context=copy_context())
                await batch.done.wait()
                await trio.lowlevel.checkpoint()
                return now() - t0

        return Variant(SYSTEM_SCOPE if scoped else SYSTEM, run, n)

    def with_ctxkit(limit: int | None) -> Variant:
        async def run() -> int:
            batch = Batch(n, trio.Event())
            async with ctxkit.BackgroundRunner(limit=limit):
                with trace.use_span(request_span()):
                    t0 = now()
                    for _ in range(n):
                        ctxkit.spawn(tick(batch), span=False, vars=VARS)
                    await batch.done.wait()
                    await trio.lowlevel.checkpoint()
                    return now() - t0

        return Variant(CTXKIT if limit is None else CTXKIT_100, run, n, ref=ANYIO)

    return [
        Variant(NURSERY, nursery, n),
        Variant(ANYIO, anyio_group, n),
        system_tasks(scoped=False),
        system_tasks(scoped=True),
        with_ctxkit(None),
        with_ctxkit(100),
    ]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 7 (skipped when trio is not installed)."""
    try:
        import trio
    except ImportError:
        return [skipped("7", TITLE, "trio is not installed (pip install -e '.[bench]')")]
    n = 10_000
    rounds = settings.pick_rounds(full=9, quick=2)

    async def main() -> CaseResult:
        set_vars()
        return await measure(
            "7",
            f"{TITLE}, {n:,} tasks/batch",
            variants(n),
            baseline=NURSERY,
            rounds=rounds,
            targets=TARGETS,
            notes=[
                "on trio each ctxkit task is a trio system task in its own cancel scope",
                "the floor rows are that alone: entering and leaving the scope costs about one "
                "native start_soon",
            ],
        )

    return [trio.run(main)]
