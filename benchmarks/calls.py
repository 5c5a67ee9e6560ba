"""What the per-call lookups cost inside a task: ``python -m benchmarks.calls [--rounds N]``.

``ctxkit.current_task()`` reads the handle from the backend's wrapper coroutine of the loop's
current task (a frame's locals), so spawning pays nothing for it and the call pays instead.
This measures that call inside a background task, N calls per batch, side by side in one
process with interleaved rounds in a shuffled order, against the event loop's own
``current_task()`` (a C function on asyncio):

- asyncio, no task factory;
- asyncio under a task factory that wraps every coroutine in one of its own (Sentry's asyncio
  integration does): ``current_task()`` then walks the task's own stack to find the wrapper;
- trio (``trio.lowlevel.current_task()`` as the baseline).

``ctxkit.current_trace_id()`` is measured alongside, for scale (what a log filter calls on
every record). Public APIs only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

import trio

import ctxkit

from ._common import now
from ._harness import Variant, measure, set_seed

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ._harness import CaseResult

N = 100_000


async def _calls(lookup: Callable[[], object]) -> int:
    """Call ``lookup`` N times (inside a background task) and return the time it took."""
    if lookup() is None:  # measure the path that finds the answer, never an early None
        raise RuntimeError(f"{lookup.__qualname__}() found nothing inside a background task")
    t0 = now()
    for _ in range(N):
        lookup()
    return now() - t0


def _wrapping_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
) -> asyncio.Task[Any]:
    """A task factory that runs every coroutine inside one of its own (as Sentry's does)."""

    async def around() -> Any:
        return await coro

    return asyncio.Task(around(), loop=loop, **kwargs)


def _in_task(
    name: str,
    runner: ctxkit.BackgroundRunner,
    lookup: Callable[[], object],
    factory: Any = None,
) -> Variant:
    async def run() -> int:
        if factory is None:
            result: int = await runner.spawn(_calls, lookup, span=False)
            return result
        loop = asyncio.get_running_loop()
        loop.set_task_factory(factory)  # for the whole batch: current_task() asks for it
        try:
            result = await runner.spawn(_calls, lookup, span=False)
        finally:
            loop.set_task_factory(None)
        return result

    return Variant(name, run, N)


async def _asyncio_case(rounds: int) -> CaseResult:
    async with ctxkit.BackgroundRunner() as runner:
        return await measure(
            "calls-asyncio",
            f"lookups inside a background task (asyncio), {N:,} calls/batch",
            [
                _in_task("asyncio.current_task()", runner, asyncio.current_task),
                _in_task("ctxkit.current_task()", runner, ctxkit.current_task),
                _in_task(
                    "ctxkit.current_task(), wrapping task factory",
                    runner,
                    ctxkit.current_task,
                    _wrapping_factory,
                ),
                _in_task("ctxkit.current_trace_id()", runner, ctxkit.current_trace_id),
            ],
            baseline="asyncio.current_task()",
            rounds=rounds,
            notes=[
                "'wrapping task factory': the loop's task factory runs each coroutine "
                "inside one of its own, so the task's coroutine is not ctxkit's wrapper"
            ],
        )


async def _trio_case(rounds: int) -> CaseResult:
    async with ctxkit.BackgroundRunner() as runner:
        return await measure(
            "calls-trio",
            f"lookups inside a background task (trio), {N:,} calls/batch",
            [
                _in_task("trio.lowlevel.current_task()", runner, trio.lowlevel.current_task),
                _in_task("ctxkit.current_task()", runner, ctxkit.current_task),
                _in_task("ctxkit.current_trace_id()", runner, ctxkit.current_trace_id),
            ],
            baseline="trio.lowlevel.current_task()",
            rounds=rounds,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calls")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the round order")
    args = parser.parse_args(argv)
    set_seed(args.seed)
    print(asyncio.run(_asyncio_case(args.rounds)).table())
    print()
    print(trio.run(_trio_case, args.rounds).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
