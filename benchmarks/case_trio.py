"""Case 7: spawn and finish a batch of trivial tasks on trio (no span, 4 vars).

The batch is the same as case 1's: N tasks spawned from a coroutine with a valid current span
and 4 vars set, then a wait until the last has run. ``nursery.start_soon`` and anyio's
``start_soon`` copy the caller's whole context (no detaching); their batch ends when the
nursery exits. ctxkit's runner is opened before the clock starts and closed after it stops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from opentelemetry import trace

import ctxkit

from ._common import VARS, Batch, now, request_span, set_vars, tick
from ._harness import Variant, measure, skipped

if TYPE_CHECKING:
    from ._harness import CaseResult, Settings

TITLE = "spawn + finish on trio, no span, 4 vars"

NURSERY = "trio nursery.start_soon"
ANYIO = "anyio TaskGroup.start_soon"
CTXKIT = "ctxkit.spawn (limit=None)"
CTXKIT_100 = "ctxkit.spawn (limit=100, default)"


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
            notes=[
                "the issue sets no target for trio: ratios only",
                "on trio each ctxkit task is a trio system task in its own cancel scope",
            ],
        )

    return [trio.run(main)]
