"""This checkout's ctxkit against another commit's, side by side in one process.

``python -m benchmarks.paired REV [--case spawn|trio|clone] [--vars tuple,list,registered]
[--rounds 21] [--seed 1]`` compares ctxkit of this checkout with that of commit ``REV``
(exported with ``git archive`` into a temporary directory and imported as the package
``ctxkit_rev``; ctxkit's modules import each other relatively), in interleaved rounds in a
shuffled order:

- ``spawn`` (the default): case 1's shape (a burst of 10,000 trivial tasks, 4 vars, a valid
  request span, no task span), ``ctxkit.spawn`` with both limits, plus a bare ``create_task``;
  the 4 vars passed as a tuple, as a list, and registered (``ctxkit.register``, outside the
  clock, and no ``vars=``), as ``--vars`` picks (default: all three);
- ``trio``: case 1's shape on trio (case 7), against native ``nursery.start_soon``, with the
  same shapes of vars;
- ``clone``: case 3's shape, ``clone_without_span`` of 4 vars from the same source and from a
  new source per call, plus ``copy_context()`` + 1 var set.

The ``vs ref`` column is this checkout's time over ``REV``'s in the same round: the figure for
a change too small to see across two full runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

import ctxkit

from . import case_clone, case_trio
from ._common import VARS, VARS_LIST, Batch, now, request_span, set_vars, tick
from ._harness import CHUNKS, Variant, measure, measure_sync, set_seed

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

N = 10_000
BARE = "bare create_task"


def _import_rev(rev: str, into: Path) -> Any:
    """Export ``ctxkit/`` at ``rev`` into ``into`` and import it as ``ctxkit_rev``."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "ctxkit"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "ctxkit").rename(into / "ctxkit_rev")
    sys.path.insert(0, str(into))
    return importlib.import_module("ctxkit_rev")


def _variants(other: Any, rev: str, shapes: Sequence[str]) -> list[Variant]:
    async def bare() -> int:
        batch = Batch(N, asyncio.Event())
        with trace.use_span(request_span()):
            t0 = now()
            for _ in range(N):
                asyncio.create_task(tick(batch))  # noqa: RUF006 - the baseline
            await batch.done.wait()
            await asyncio.sleep(0)
            return now() - t0

    settle = partial(asyncio.sleep, 0)
    return [Variant(BARE, bare, N), *_both(other, rev, asyncio.Event, settle, shapes)]


#: The shapes in which a spawn's vars are passed, by ``--vars`` name: the suffix of the row names
#: (the tuple's rows keep the plain names) and the ``vars=`` argument (None: registered instead).
SHAPES: dict[str, tuple[str, tuple[Any, ...] | list[Any] | None]] = {
    "tuple": ("", VARS),
    "list": (", vars list", VARS_LIST),
    "registered": (", registered vars", None),
}


def _both(
    other: Any,
    rev: str,
    event: Callable[[], Any],
    settle: Callable[[], Awaitable[None]],
    shapes: Sequence[str] = tuple(SHAPES),
) -> list[Variant]:
    """ctxkit at ``rev`` and here, with both limits and each of ``shapes``: the compared variants.

    ``event``: the backend's event class; ``settle``: what lets the last task's end go through.
    """

    def spawning(name: str, module: Any, limit: int | None, shape: str, ref: str | None) -> Variant:
        vars = SHAPES[shape][1]

        async def run() -> int:
            batch = Batch(N, event())
            if vars is None:
                module.register(*VARS)
            try:
                async with module.BackgroundRunner(limit=limit):
                    with trace.use_span(request_span()):
                        t0 = now()
                        if vars is None:
                            for _ in range(N):
                                module.spawn(tick(batch), span=False)
                        else:
                            for _ in range(N):
                                module.spawn(tick(batch), span=False, vars=vars)
                        await batch.done.wait()
                        await settle()
                        return now() - t0
            finally:
                if vars is None:
                    module.unregister(*VARS)

        return Variant(name, run, N, ref=ref)

    variants = []
    for limit in (None, 100):
        for shape in shapes:
            suffix = SHAPES[shape][0]
            theirs = f"ctxkit at {rev} (limit={limit}){suffix}"
            variants.append(spawning(theirs, other, limit, shape, None))
            here = f"ctxkit here (limit={limit}){suffix}"
            variants.append(spawning(here, ctxkit, limit, shape, theirs))
    return variants


def _trio_variants(other: Any, rev: str, shapes: Sequence[str]) -> list[Variant]:
    import trio

    async def nursery() -> int:
        batch = Batch(N, trio.Event())
        with trace.use_span(request_span()):
            t0 = now()
            async with trio.open_nursery() as tasks:
                for _ in range(N):
                    tasks.start_soon(tick, batch)
            return now() - t0

    settle = trio.lowlevel.checkpoint
    variants = _both(other, rev, trio.Event, settle, shapes)
    return [Variant(case_trio.NURSERY, nursery, N), *variants]


def _clone_variants(other: Any, rev: str) -> list[Variant]:
    n = 20_000
    same = [case_clone.source(0)] * n
    fresh = [case_clone.source(i) for i in range(n)]
    variants = [case_clone.variant(case_clone.COPY_SET, case_clone.copy_set, same)]
    for label, sources in (("same source", same), ("new source", fresh)):
        theirs = f"clone_without_span at {rev}, 4 vars, {label}"
        variants += [
            case_clone.variant(theirs, partial(other.clone_without_span, *VARS), sources),
            case_clone.variant(
                f"clone_without_span here, 4 vars, {label}",
                partial(ctxkit.clone_without_span, *VARS),
                sources,
                ref=theirs,
            ),
        ]
    return variants


async def _burst(
    case: str, title: str, variants: list[Variant], baseline: str, rounds: int
) -> None:
    """Measure a burst shape's variants in the running loop (asyncio or trio) and print them."""
    set_vars()
    result = await measure(case, title, variants, baseline=baseline, rounds=rounds, notes=[_NOTE])
    print(result.table())


def _clone_main(other: Any, rev: str, rounds: int) -> None:
    result = measure_sync(
        "paired-clone",
        f"ctxkit here vs at {rev}, case 3's shape, 20,000 ops/batch",
        _clone_variants(other, rev),
        baseline=case_clone.COPY_SET,
        rounds=rounds,
        notes=[_NOTE, f"each round's figure is the fastest of {CHUNKS} equal sub-batches"],
    )
    print(result.table())


_NOTE = "vs ref: this checkout's time over the other commit's, same round"


def _parse_shapes(text: str) -> list[str]:
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise argparse.ArgumentTypeError(
            f"unknown shape(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(SHAPES)}"
        )
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paired")
    parser.add_argument("rev", help="the commit to compare with (anything git archive takes)")
    parser.add_argument(
        "--case",
        choices=("spawn", "trio", "clone"),
        default="spawn",
        help="the shape (default spawn)",
    )
    parser.add_argument(
        "--vars",
        type=_parse_shapes,
        default=list(SHAPES),
        metavar="tuple,list,registered",
        help="how the spawn and trio shapes pass the 4 vars (default: all three)",
    )
    parser.add_argument("--rounds", type=int, default=21, help="measured rounds (default 21)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the round order")
    args = parser.parse_args(argv)
    set_seed(args.seed)
    with tempfile.TemporaryDirectory() as directory:
        try:
            other = _import_rev(args.rev, Path(directory))
            shape = f"no span, 4 vars, {N:,} tasks/batch"
            if args.case == "spawn":
                title = f"ctxkit here vs at {args.rev}, case 1's shape, {shape}"
                variants = _variants(other, args.rev, args.vars)
                asyncio.run(_burst("paired", title, variants, BARE, args.rounds))
            elif args.case == "trio":
                import trio

                title = f"ctxkit here vs at {args.rev}, case 7's shape (trio), {shape}"
                variants = _trio_variants(other, args.rev, args.vars)
                baseline = case_trio.NURSERY
                trio.run(_burst, "paired-trio", title, variants, baseline, args.rounds)
            else:
                _clone_main(other, args.rev, args.rounds)
        finally:  # a later call (another REV) imports its own copy
            sys.path[:] = [entry for entry in sys.path if entry != directory]
            for name in [name for name in sys.modules if name.split(".")[0] == "ctxkit_rev"]:
                del sys.modules[name]
    return 0


if __name__ == "__main__":
    sys.exit(main())
