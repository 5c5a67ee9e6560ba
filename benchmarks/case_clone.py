"""Case 3: the cost of one clone, for k = 0, 1, 4, 16 carried vars.

Every operation runs inside a source context (``source.run(op)``, the same overhead for every
variant) that has all 16 vars set and a valid current span. "same source" runs every
operation in one source: what a request that fans out many tasks sees, and where ctxkit's
clone caches hit. "new source" runs each operation in a different source (other
values, other span): what one spawn per request sees, where the caches miss. ``copy_context``
does not care which. "by hand" builds the same Context ctxkit builds (the vars plus a detached
OpenTelemetry context with the span and baggage) with no cache. ``clone()`` also starts and
ends its marker span on an SDK TracerProvider with no processor.

Two floor rows show what any clone of the calling context must do with the public APIs: read
the OpenTelemetry context (``otel_context.get_current()``; the issue rules out reading its
private ContextVar) and, for 4 vars, also read the 4 vars -- before building or reusing
anything.
"""

from __future__ import annotations

import functools
from contextvars import Context, ContextVar, copy_context
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider

import ctxkit

from ._common import VARS, hand_clone, now, request_context
from ._harness import CHUNKS, Target, Variant, best_of, measure_sync

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._harness import CaseResult, Settings

TITLE = "clone one context (sync)"

ALL_VARS: tuple[ContextVar[str], ...] = VARS + tuple(
    ContextVar[str](f"bench.extra{i}") for i in range(12)
)
KS = (0, 1, 4, 16)

EMPTY = "empty call (floor)"
OTEL_READ = "otel_context.get_current() (floor)"
READS_4 = "get_current() + 4 var reads (floor)"
COPY = "copy_context()"
COPY_SET = "copy_context() + 1 var set"


def source(i: int) -> Context:
    """Return a source context: all vars set to values unique to ``i``, a span of its own."""
    return request_context(i, ALL_VARS)


def _baseline() -> Callable[[], None]:
    first = VARS[0]

    def copy_set() -> None:
        copy_context().run(first.set, "x")

    return copy_set


#: The baseline: a copy of the calling context with one var set in it.
copy_set: Final = _baseline()


def variant(
    name: str, op: Callable[[], object], sources: Sequence[Context], ref: str | None = None
) -> Variant:
    """Return a variant that runs ``op`` once in each of ``sources`` (``source.run(op)``)."""

    def chunk(start: int, stop: int) -> int:
        part = sources[start:stop]
        t0 = now()
        for context in part:
            context.run(op)
        return now() - t0

    return Variant(name, lambda: best_of(chunk, len(sources)), len(sources), ref=ref)


def variants(n: int, n_span: int) -> list[Variant]:
    """Return the variants; ``n`` operations per batch (``n_span`` for span-starting ones)."""
    provider = TracerProvider()
    one = source(0)
    same = [one] * n
    same_span = [one] * n_span
    fresh = [source(i) for i in range(n)]
    v0, v1, v2, v3 = VARS
    missing = object()
    get_current = otel_context.get_current

    def reads_4() -> None:
        get_current()
        v0.get(missing)
        v1.get(missing)
        v2.get(missing)
        v3.get(missing)

    result = [
        variant(COPY_SET, copy_set, same),
        variant(COPY, copy_context, same),
        variant(EMPTY, lambda: None, same),
        variant(OTEL_READ, get_current, same),
        variant(READS_4, reads_4, same),
    ]
    for k in KS:
        vars_k: tuple[ContextVar[Any], ...] = ALL_VARS[:k]
        without = functools.partial(ctxkit.clone_without_span, *vars_k)
        marked = functools.partial(ctxkit.clone, *vars_k, tracer_provider=provider)
        result += [
            variant(f"by hand, {k} vars", functools.partial(hand_clone, vars_k), same),
            variant(f"clone_without_span, {k} vars, same source", without, same),
            variant(f"clone_without_span, {k} vars, new source", without, fresh),
            variant(f"clone, {k} vars (SDK span)", marked, same_span),
        ]
    return result


TARGETS = (
    Target(
        "clone_without_span, 4 vars (same source) <= 1.5x copy_context() + 1 var set",
        "clone_without_span, 4 vars, same source",
        COPY_SET,
        1.5,
        floor=READS_4,
    ),
    Target(
        "clone_without_span, 4 vars (new source) <= 1.5x copy_context() + 1 var set",
        "clone_without_span, 4 vars, new source",
        COPY_SET,
        1.5,
        floor="by hand, 4 vars",
    ),
)


def run(settings: Settings) -> list[CaseResult]:
    """Run case 3."""
    n = 5_000 if settings.quick else 20_000
    n_span = 1_000 if settings.quick else 5_000
    rounds = settings.pick_rounds(full=9, quick=3)
    return [
        measure_sync(
            "3",
            f"{TITLE}, {n:,} ops/batch ({n_span:,} for clone())",
            variants(n, n_span),
            baseline=COPY_SET,
            rounds=rounds,
            targets=TARGETS,
            notes=[
                "each op includes source.run(op) and the loop: see the 'empty call' row for "
                "that floor",
                f"each round's figure is the fastest of {CHUNKS} equal sub-batches",
                "the target also asks for '1 us-class': read the median column",
            ],
        )
    ]
