"""Case 7: spawn and finish a batch of trivial tasks on trio (no span, 4 vars).

The batch is the same as case 1's: N tasks spawned from a coroutine with a valid current span
and 4 vars set, then a wait until the last has run. ``nursery.start_soon`` and anyio's
``start_soon`` copy the caller's whole context (no detaching); their batch ends when the
nursery exits. ctxkit's runner is opened before the clock starts and closed after it stops.

ctxkit's rows pass the 4 vars as ``vars=`` a tuple; each "vars list" row passes the same vars as
a list and reads its ``vs ref`` against the tuple's row, as does the "registered vars" row, which
gives them to ``ctxkit.register`` (outside the clock) and passes no ``vars=``.

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

from ._common import VARS, VARS_LIST, Batch, now, request_span, set_vars, tick
from ._harness import Target, Variant, measure, skipped

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from contextvars import ContextVar

    from ._harness import CaseResult, Settings

TITLE = "spawn + finish on trio, no span, 4 vars"

NURSERY = "trio nursery.start_soon"
ANYIO = "anyio TaskGroup.start_soon"
SYSTEM = "trio spawn_system_task (floor)"
SYSTEM_SCOPE = "spawn_system_task + own CancelScope (floor)"
CTXKIT = "ctxkit.spawn (limit=None)"
CTXKIT_100 = "ctxkit.spawn (limit=100, default)"
CTXKIT_LIST = "ctxkit.spawn (limit=None), vars list"
CTXKIT_100_LIST = "ctxkit.spawn (limit=100, default), vars list"
CTXKIT_REGISTERED = "ctxkit.spawn (limit=None), registered vars"

TARGETS = (
    Target(
        "trio spawn, no span (limit=None) <= 2.0x nursery.start_soon",
        CTXKIT,
        NURSERY,
        2.0,
        floor=SYSTEM_SCOPE,
    ),
    Target(
        "trio spawn, no span (limit=100) <= 2.0x nursery.start_soon",
        CTXKIT_100,
        NURSERY,
        2.0,
        floor=SYSTEM_SCOPE,
    ),
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

    def with_ctxkit(
        name: str,
        limit: int | None,
        *,
        vars: tuple[ContextVar[str], ...] | list[ContextVar[str]] = VARS,
        registered: bool = False,
        ref: str = ANYIO,
    ) -> Variant:
        """``ctxkit.spawn(..., vars=vars)``; ``registered``: the 4 vars registered instead
        (outside the clock) and no ``vars=``."""

        async def run() -> int:
            batch = Batch(n, trio.Event())
            if registered:
                ctxkit.register(*VARS)
            try:
                async with ctxkit.BackgroundRunner(limit=limit):
                    with trace.use_span(request_span()):
                        t0 = now()
                        if registered:
                            for _ in range(n):
                                ctxkit.spawn(tick(batch), span=False)
                        else:
                            for _ in range(n):
                                ctxkit.spawn(tick(batch), span=False, vars=vars)
                        await batch.done.wait()
                        await trio.lowlevel.checkpoint()
                        return now() - t0
            finally:
                if registered:
                    ctxkit.unregister(*VARS)

        return Variant(name, run, n, ref=ref)

    return [
        Variant(NURSERY, nursery, n),
        Variant(ANYIO, anyio_group, n),
        system_tasks(scoped=False),
        system_tasks(scoped=True),
        with_ctxkit(CTXKIT, None),
        with_ctxkit(CTXKIT_LIST, None, vars=VARS_LIST, ref=CTXKIT),
        with_ctxkit(CTXKIT_REGISTERED, None, registered=True, ref=CTXKIT),
        with_ctxkit(CTXKIT_100, 100),
        with_ctxkit(CTXKIT_100_LIST, 100, vars=VARS_LIST, ref=CTXKIT_100),
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
                "'vars list': the same 4 vars passed as a list, not a tuple; 'registered vars': "
                "the 4 vars given to ctxkit.register (outside the clock) and no vars=; vs ref: "
                "each against the same row with the tuple",
            ],
        )

    return [trio.run(main)]
