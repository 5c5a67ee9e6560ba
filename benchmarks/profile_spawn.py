"""Profile ctxkit's spawn path: ``python -m benchmarks.profile_spawn [--span] [-n N] [--top K]``.

Spawns N trivial tasks (4 vars, from inside a valid request span) in an open runner with
``limit=None`` and profiles, separately, the spawning (the ``spawn`` calls only) and the
running (the event loop stepping the tasks to their end), with cProfile. ``--span`` gives
every task a span on an SDK TracerProvider with no processor. cProfile inflates the cost of
small functions; read the ranking, not the absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys

from opentelemetry.sdk.trace import TracerProvider

import ctxkit

from ._common import VARS, Batch, set_vars, tick


def _report(profile: cProfile.Profile, title: str, n: int, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"== {title}: {total / n * 1e9:,.0f} ns per task under cProfile ==")
    stats.sort_stats("tottime").print_stats(top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    print()


async def _main(n: int, span: bool, top: int) -> None:
    set_vars()
    provider = TracerProvider()
    tracer = provider.get_tracer("bench")
    spawning, running = cProfile.Profile(), cProfile.Profile()
    for profile in (None, (spawning, running)):  # the first pass warms up
        batch = Batch(n, asyncio.Event())
        async with ctxkit.BackgroundRunner(limit=None, tracer_provider=provider):
            with tracer.start_as_current_span("request"):
                if profile is not None:
                    profile[0].enable()
                for _ in range(n):
                    ctxkit.spawn(tick(batch), span=span, vars=VARS)
                if profile is not None:
                    profile[0].disable()
                    profile[1].enable()
                await batch.done.wait()
                await asyncio.sleep(0)
                if profile is not None:
                    profile[1].disable()
    kind = "span=True (SDK)" if span else "span=False"
    _report(spawning, f"spawning, {kind}, 4 vars", n, top)
    _report(running, f"running to the end, {kind}, 4 vars", n, top)
    provider.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_spawn")
    parser.add_argument("--span", action="store_true", help="give every task a span (SDK)")
    parser.add_argument("-n", type=int, default=20_000, help="tasks to spawn (default 20,000)")
    parser.add_argument("--top", type=int, default=25, help="rows per profile (default 25)")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.n, args.span, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
