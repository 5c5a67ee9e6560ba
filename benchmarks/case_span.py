"""Case 2: spawn and finish a batch of trivial tasks with one span per task.

Every variant spawns from inside a recording request span of the same SDK TracerProvider,
so each task span is a child of it. Two tracer set-ups: an SDK ``TracerProvider`` with no
span processor, and one with a ``BatchSpanProcessor`` (default settings) to an exporter that
drops everything; the processor is flushed after each batch, outside the clock.

``opentelemetry-instrumentation-asyncio`` is instrumented (tracing the coroutine ``tick`` by
name through ``OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE``, read at instrument time) just
before its batch and uninstrumented just after, both outside the clock, because it wraps
``asyncio.create_task`` for the whole process. It always records its two metrics; "no-op
meter" gives it the API's no-op MeterProvider, "SDK meter" an SDK MeterProvider with an
``InMemoryMetricReader`` (aggregation on every measurement, no export). ctxkit's runner gets
the same meter provider in the matching variant.

The "10% ratio sampler" variants use a third provider, sampling with
``ParentBased(TraceIdRatioBased(0.1))``, the usual production set-up: each batch spawns 10
tasks from each of ``n / 10`` request contexts (made outside the clock, each with a trace of its
own, sampled at its root as that sampler decides; exactly 10% are), so 10% of the task spans
are recorded and the others are sampled out because their parent is.

Two floors of the always-on span stand beside ctxkit's row (``spawn(..., vars=<4 vars tuple>,
span=True)``): ``spawn(span=False)`` plus the SDK's start and end of a span with ctxkit's
attributes, never made current; and the hand-written span per task that does ctxkit's work with
public APIs: at spawn, the SDK span with ctxkit's kind and attributes is started and made
current in a copy of the caller's context, and a bare ``create_task`` in that copy runs a
wrapper that sets ctxkit's outcome attribute and ends it (``ending_span``). Beside them, for
reading only, a wrapper that starts its span when the task first runs (``in_task_span``): a
burst then holds one live span instead of one per pending task (far less for the garbage
collector to walk), and the span's ids are unknown at spawn, so it does less than ctxkit does.
The "vars list" row passes the same 4 vars as a list.

Case 2b is the ladder: what a span costs when it will not be recorded, side by side with no span
and a recorded one, each against a bare ``create_task``. The spans there come from the ratio
provider under one request context whose span is not sampled ("sampled out") or is ("recorded");
the floor rows are a bare ``create_task`` plus the SDK's own ``start_span`` and ``end`` of one
span per task, what any span costs before ctxkit or the instrumentation do anything with it.
"""

from __future__ import annotations

import asyncio
import os
from contextvars import copy_context
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode

import ctxkit

from ._common import (
    VARS,
    VARS_LIST,
    Batch,
    HandSpan,
    NoOpExporter,
    log,
    now,
    ratio_requests,
    request_span,
    set_vars,
    tick,
    unsampled_request_span,
)
from ._harness import Target, Variant, measure

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence
    from contextvars import ContextVar

    from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor

    from ._harness import CaseResult, Settings

TITLE = "spawn + finish with a span per task, 4 vars (asyncio)"

BARE = "bare create_task (no span)"
OTEL = "otel-asyncio, SDK, no-op meter"
CTXKIT = "ctxkit.spawn, SDK, no-op meter"
HAND = "hand-written, SDK"
OTEL_BSP = "otel-asyncio, SDK+BatchSpanProcessor"
CTXKIT_BSP = "ctxkit.spawn, SDK+BatchSpanProcessor"
HAND_BSP = "hand-written, SDK+BatchSpanProcessor"
OTEL_METRICS = "otel-asyncio, SDK, SDK meter"
CTXKIT_METRICS = "ctxkit.spawn, SDK, SDK meter"
OTEL_RATIO = "otel-asyncio, SDK 10% ratio sampler"
CTXKIT_RATIO = "ctxkit.spawn, SDK 10% ratio sampler"
HAND_RATIO = "hand-written, SDK 10% ratio sampler"
FLOOR = "floor: spawn(span=False) + SDK span with ctxkit's attributes"
FLOOR_BARE = "floor: spawn(span=False) + SDK span, no attributes"
FLOOR_RATIO = "floor: spawn(span=False) + SDK span with ctxkit's attributes, 10% ratio"
FLOOR_TASK = "floor: span at spawn, create_task of a wrapper that ends it, current in a copy"
LAZY_TASK = "create_task of a wrapper that starts and ends a current SDK span (in the task)"
CTXKIT_LIST = "ctxkit.spawn, SDK, no-op meter, vars list"

#: Tasks spawned from each request context in the ratio-sampler variants.
PER_REQUEST = 10
RATE = 0.1

TARGETS = (
    Target(
        "span per task, 10% ratio sampler <= 1.0x otel-asyncio",
        CTXKIT_RATIO,
        OTEL_RATIO,
        1.0,
        floor=FLOOR_RATIO,
    ),
    Target("span per task, SDK always-on <= 1.2x otel-asyncio", CTXKIT, OTEL, 1.2, floor=FLOOR),
    Target(
        "span per task, SDK always-on <= 1.15x create_task of a wrapper with a current span",
        CTXKIT,
        FLOOR_TASK,
        1.15,
        floor=FLOOR_TASK,
    ),
    Target("... with BatchSpanProcessor <= 1.0x otel-asyncio", CTXKIT_BSP, OTEL_BSP, 1.0),
    Target(
        "with metrics on <= 1.0x otel-asyncio with its metrics", CTXKIT_METRICS, OTEL_METRICS, 1.0
    ),
)


# Case 2b, the ladder.
L_BARE = "bare create_task (no span)"
L_NO_SPAN = "ctxkit.spawn(span=False)"
L_OUT = "ctxkit.spawn, span sampled out"
L_REC = "ctxkit.spawn, span recorded"
L_OTEL_OUT = "otel-asyncio, span sampled out"
L_OTEL_REC = "otel-asyncio, span recorded"
L_FLOOR_OUT = "floor: bare + SDK start_span/end, sampled out"
L_FLOOR_REC = "floor: bare + SDK start_span/end, recorded"

L_FLOOR_CTX_OUT = "floor: spawn(span=False) + SDK span, sampled out"

LADDER_TARGETS = (
    Target(
        "span sampled out <= 1.1x spawn(span=False) + the SDK's own sampled-out span",
        L_OUT,
        L_FLOOR_CTX_OUT,
        1.1,
        floor=L_FLOOR_CTX_OUT,
    ),
)


def _parent(sampled: bool) -> otel_context.Context:
    """Return an OpenTelemetry context whose current span is a valid local one, sampled or not."""
    span = request_span() if sampled else unsampled_request_span()
    return trace.set_span_in_context(span, otel_context.Context())


class _Setup:
    """The providers of the case, made once and shut down at its end."""

    def __init__(self) -> None:
        self.plain = TracerProvider()
        self.ratio = TracerProvider(sampler=ParentBased(TraceIdRatioBased(RATE)))
        self.batched = TracerProvider()
        self.processor = BatchSpanProcessor(NoOpExporter())
        self.batched.add_span_processor(self.processor)
        self.noop_meter = metrics.NoOpMeterProvider()
        self.reader = InMemoryMetricReader()
        self.sdk_meter = MeterProvider(metric_readers=[self.reader])

    def shutdown(self) -> None:
        self.plain.shutdown()
        self.ratio.shutdown()
        self.batched.shutdown()
        self.sdk_meter.shutdown()


async def _drive(
    requests: Sequence[otel_context.Context], spawn: Callable[[], object], batch: Batch
) -> int:
    """Spawn the batch from ``requests`` in turn (an equal share from each, each made current
    around its spawns); return the elapsed ns until the last task has run."""
    per = batch.left // len(requests)
    t0 = now()
    for request in requests:
        token = otel_context.attach(request)
        for _ in range(per):
            spawn()
        otel_context.detach(token)
    await batch.done.wait()
    await asyncio.sleep(0)
    return now() - t0


def _instrumented(tp: TracerProvider, mp: Any) -> AsyncioInstrumentor:
    # A peer, of the bench extra: imported here, so the suite's tests can build the variants.
    from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor
    from opentelemetry.instrumentation.asyncio.environment_variables import (
        OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE,
    )

    os.environ[OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE] = tick.__name__
    instrumentor = AsyncioInstrumentor()
    instrumentor.instrument(tracer_provider=tp, meter_provider=mp, skip_dep_check=True)
    return instrumentor


def variants(n: int, s: _Setup) -> list[Variant]:
    """Return the variants of case 2, each spawning ``n`` tasks per batch."""

    async def bare() -> int:
        batch = Batch(n, asyncio.Event())
        with s.plain.get_tracer("bench").start_as_current_span("request"):
            t0 = now()
            for _ in range(n):
                asyncio.create_task(tick(batch))  # noqa: RUF006 - the point of the baseline
            await batch.done.wait()
            await asyncio.sleep(0)
            return now() - t0

    def otel(name: str, tp: TracerProvider, mp: Any) -> Variant:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            instrumentor = _instrumented(tp, mp)
            try:
                tasks = set()
                with tp.get_tracer("bench").start_as_current_span("request"):
                    t0 = now()
                    for _ in range(n):
                        # the strong reference users need anyway; the instrumentation adds none
                        tasks.add(asyncio.create_task(tick(batch)))
                    await batch.done.wait()
                    await asyncio.sleep(0)
                    return now() - t0
            finally:
                instrumentor.uninstrument()

        return Variant(name, run, n)

    def ctx(
        name: str,
        tp: TracerProvider,
        mp: Any,
        ref: str,
        vars: tuple[ContextVar[str], ...] | list[ContextVar[str]] = VARS,
    ) -> Variant:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            async with ctxkit.BackgroundRunner(limit=None, tracer_provider=tp, meter_provider=mp):
                with tp.get_tracer("bench").start_as_current_span("request"):
                    t0 = now()
                    for _ in range(n):
                        ctxkit.spawn(tick(batch), vars=vars, span=True)
                    await batch.done.wait()
                    await asyncio.sleep(0)
                    return now() - t0

        return Variant(name, run, n, ref=ref)

    def hand(name: str, tp: TracerProvider, ref: str) -> Variant:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            spawner = HandSpan(tp.get_tracer("bench"), VARS)
            with tp.get_tracer("bench").start_as_current_span("request"):
                t0 = now()
                for _ in range(n):
                    spawner.spawn(tick(batch))
                await batch.done.wait()
                await asyncio.sleep(0)
                return now() - t0

        return Variant(name, run, n, ref=ref)

    async def floor_task() -> int:
        batch = Batch(n, asyncio.Event())
        tracer = s.plain.get_tracer("bench")
        with tracer.start_as_current_span("request"):
            t0 = now()
            for _ in range(n):
                spawn_in_span(tick(batch), tracer)
            await batch.done.wait()
            await asyncio.sleep(0)
            return now() - t0

    async def lazy_task() -> int:
        batch = Batch(n, asyncio.Event())
        tracer = s.plain.get_tracer("bench")
        with tracer.start_as_current_span("request"):
            t0 = now()
            for _ in range(n):
                asyncio.create_task(in_task_span(tick(batch), tracer))  # noqa: RUF006 - bare
            await batch.done.wait()
            await asyncio.sleep(0)
            return now() - t0

    requests = ratio_requests(n // PER_REQUEST, RATE)
    return [
        otel(OTEL, s.plain, s.noop_meter),
        ctx(CTXKIT, s.plain, s.noop_meter, OTEL),
        ctx(CTXKIT_LIST, s.plain, s.noop_meter, CTXKIT, VARS_LIST),
        Variant(FLOOR_TASK, floor_task, n, ref=OTEL),
        Variant(LAZY_TASK, lazy_task, n, ref=FLOOR_TASK),
        hand(HAND, s.plain, OTEL),
        otel_in(OTEL_RATIO, n, s.ratio, requests, s.noop_meter),
        ctx_in(CTXKIT_RATIO, n, s.ratio, requests, s.noop_meter, ref=OTEL_RATIO),
        hand_in(HAND_RATIO, n, s.ratio, requests, ref=OTEL_RATIO),
        floor(FLOOR, n, s.plain, None, s.noop_meter, ref=OTEL),
        floor(FLOOR_BARE, n, s.plain, None, s.noop_meter, attributes=False, ref=OTEL),
        floor(FLOOR_RATIO, n, s.ratio, requests, s.noop_meter, ref=OTEL_RATIO),
        otel(OTEL_BSP, s.batched, s.noop_meter),
        ctx(CTXKIT_BSP, s.batched, s.noop_meter, OTEL_BSP),
        hand(HAND_BSP, s.batched, OTEL_BSP),
        otel(OTEL_METRICS, s.plain, s.sdk_meter),
        ctx(CTXKIT_METRICS, s.plain, s.sdk_meter, OTEL_METRICS),
        Variant(BARE, bare, n),
    ]


def spawn_in_span(coro: Coroutine[Any, Any, None], tracer: trace.Tracer) -> asyncio.Task[None]:
    """Start ``coro`` as a bare task in a span started now: the floor of a span per task.

    The span has ctxkit's kind and start attributes and is made current in a copy of the
    caller's context, in which the task runs ``ending_span``.
    """
    name: str = coro.__qualname__  # type: ignore[attr-defined]  # a coroutine's, as ctxkit's
    span = tracer.start_span(
        name,
        kind=trace.SpanKind.INTERNAL,
        attributes={"ctxkit.async": True, "ctxkit.task.name": name},
    )
    context = copy_context()
    context.run(otel_context.attach, trace.set_span_in_context(span))
    return asyncio.create_task(ending_span(coro, span), context=context)


async def ending_span(coro: Coroutine[Any, Any, None], span: trace.Span) -> None:
    """Run ``coro``, then give ``span`` ctxkit's outcome attribute and end it.

    The floor of a span per task: ``span`` was started at spawn with ctxkit's kind and start
    attributes (so it covers any wait, and its ids are known at spawn, as a ctxkit task span's
    are) and made current in the copy of the caller's context the task runs in. An error is
    recorded on it and logged.
    """
    try:
        await coro
    except Exception as exc:
        span.set_attribute("ctxkit.task.outcome", "error")
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.record_exception(exc)
        log.error("background task failed", exc_info=exc)
    else:
        span.set_attribute("ctxkit.task.outcome", "ok")
    finally:
        span.end()


async def in_task_span(coro: Coroutine[Any, Any, None], tracer: trace.Tracer) -> None:
    """Run ``coro`` inside a span of its own, current, with the attributes of ctxkit's task span.

    Not a floor (its span starts when the task first runs, so a burst holds one live span, not
    one per pending task, and the span's ids are unknown at spawn): the task runs in the copy of
    the caller's context that ``create_task`` makes (the caller's vars and current span, here a
    request span: the parent); the span is started when the task first runs, with ctxkit's kind
    and start attributes, made current by an ``attach`` in that copy (the task's own: nothing to
    detach), and ended by ``ending_span``.
    """
    name: str = getattr(coro, "__qualname__", "task")  # a coroutine's, as ctxkit names a task
    span = tracer.start_span(
        name,
        kind=trace.SpanKind.INTERNAL,
        attributes={"ctxkit.async": True, "ctxkit.task.name": name},
    )
    otel_context.attach(trace.set_span_in_context(span))
    await ending_span(coro, span)


def otel_in(
    name: str, n: int, tp: TracerProvider, requests: Sequence[otel_context.Context], mp: Any
) -> Variant:
    """otel-asyncio spawning ``n`` tasks from ``requests``."""

    async def run() -> int:
        batch = Batch(n, asyncio.Event())
        instrumentor = _instrumented(tp, mp)
        try:
            tasks: set[asyncio.Task[None]] = set()  # the strong reference, as above

            def spawn() -> None:
                tasks.add(asyncio.create_task(tick(batch)))

            return await _drive(requests, spawn, batch)
        finally:
            instrumentor.uninstrument()

    return Variant(name, run, n)


def ctx_in(
    name: str,
    n: int,
    tp: TracerProvider,
    requests: Sequence[otel_context.Context],
    mp: Any,
    *,
    span: bool = True,
    ref: str | None = None,
) -> Variant:
    """ctxkit spawning ``n`` tasks from ``requests``."""

    async def run() -> int:
        batch = Batch(n, asyncio.Event())
        async with ctxkit.BackgroundRunner(limit=None, tracer_provider=tp, meter_provider=mp):
            return await _drive(
                requests, lambda: ctxkit.spawn(tick(batch), vars=VARS, span=span), batch
            )

    return Variant(name, run, n, ref=ref)


def hand_in(
    name: str,
    n: int,
    tp: TracerProvider,
    requests: Sequence[otel_context.Context],
    *,
    ref: str | None = None,
) -> Variant:
    """The hand-written pattern spawning ``n`` tasks from ``requests``."""

    async def run() -> int:
        batch = Batch(n, asyncio.Event())
        spawner = HandSpan(tp.get_tracer("bench"), VARS)
        return await _drive(requests, lambda: spawner.spawn(tick(batch)), batch)

    return Variant(name, run, n, ref=ref)


def floor(
    name: str,
    n: int,
    tp: TracerProvider,
    requests: Sequence[otel_context.Context] | None,
    mp: Any,
    *,
    attributes: bool = True,
    ref: str,
) -> Variant:
    """``ctxkit.spawn(span=False)`` plus, beside it, the SDK's part of a ctxkit task span.

    The span is started (with ctxkit's two start attributes, or none), given the outcome
    attribute (with them) and ended at spawn, and never made current: what is left of ctxkit's
    span cost if all of its own span handling cost nothing. ``requests`` None: every spawn
    under one recording request span, as the always-on variants.
    """
    tracer = tp.get_tracer("bench")
    kind = trace.SpanKind.INTERNAL

    async def run() -> int:
        batch = Batch(n, asyncio.Event())

        def spawn() -> None:
            ctxkit.spawn(tick(batch), vars=VARS, span=False)
            if attributes:
                span = tracer.start_span(
                    "tick", kind=kind, attributes={"ctxkit.async": True, "ctxkit.task.name": "tick"}
                )
                span.set_attribute("ctxkit.task.outcome", "ok")
            else:
                span = tracer.start_span("tick", kind=kind)
            span.end()

        async with ctxkit.BackgroundRunner(limit=None, tracer_provider=tp, meter_provider=mp):
            if requests is not None:
                return await _drive(requests, spawn, batch)
            with tracer.start_as_current_span("request"):
                return await _drive([otel_context.get_current()], spawn, batch)

    return Variant(name, run, n, ref=ref)


def ladder(n: int, s: _Setup) -> list[Variant]:
    """Return the variants of case 2b: no span, a span sampled out, a span recorded."""
    out, rec = [_parent(False)], [_parent(True)]
    tracer = s.ratio.get_tracer("bench")

    async def bare() -> int:
        batch = Batch(n, asyncio.Event())
        return await _drive(out, lambda: asyncio.create_task(tick(batch)), batch)

    def bare_floor(name: str, requests: Sequence[otel_context.Context]) -> Variant:
        def spawn_one(batch: Batch) -> None:
            asyncio.create_task(tick(batch))  # noqa: RUF006 - as the bare baseline
            tracer.start_span("tick").end()

        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            return await _drive(requests, lambda: spawn_one(batch), batch)

        return Variant(name, run, n, ref=L_BARE)

    noop = s.noop_meter
    return [
        Variant(L_BARE, bare, n),
        ctx_in(L_NO_SPAN, n, s.ratio, out, noop, span=False),
        ctx_in(L_OUT, n, s.ratio, out, noop, ref=L_NO_SPAN),
        ctx_in(L_REC, n, s.ratio, rec, noop, ref=L_NO_SPAN),
        otel_in(L_OTEL_OUT, n, s.ratio, out, noop),
        otel_in(L_OTEL_REC, n, s.ratio, rec, noop),
        bare_floor(L_FLOOR_OUT, out),
        bare_floor(L_FLOOR_REC, rec),
        floor(L_FLOOR_CTX_OUT, n, s.ratio, out, noop, ref=L_NO_SPAN),
    ]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 2 and its ladder, 2b."""
    n = 2_000 if settings.quick else 10_000
    rounds = settings.pick_rounds(full=9, quick=3)

    async def main() -> list[CaseResult]:
        set_vars()
        setup = _Setup()

        async def settle() -> None:
            setup.processor.force_flush()

        try:
            main_table = await measure(
                "2",
                f"{TITLE}, {n:,} tasks/batch",
                variants(n, setup),
                baseline=OTEL,
                rounds=rounds,
                targets=TARGETS,
                between=settle,
                notes=[
                    "ctxkit runs with limit=None (no queueing); its task span is current in "
                    "the task, the instrumentation's is not",
                    "otel-asyncio variants keep a strong set of their tasks, as any correct "
                    "caller must; the instrumentation starts its span when the task first "
                    "runs, ctxkit and the hand-written pattern at spawn",
                    f"10% ratio sampler: ParentBased(TraceIdRatioBased({RATE})), {PER_REQUEST} "
                    "tasks from each request context, 10% of the requests sampled",
                    "floor, span at spawn: the SDK span with ctxkit's kind and attributes "
                    "started at spawn, made current in a copy of the caller's context (which "
                    "carries the 4 vars), a bare create_task in it of a wrapper that sets the "
                    "outcome and ends the span",
                    "span started in the task: not a floor (one live span in a burst instead of "
                    "one per pending task; ids unknown at spawn); vs ref: the floor",
                    "'vars list': the same 4 vars passed as a list; vs ref: the tuple's row",
                ],
            )
            ladder_table = await measure(
                "2b",
                f"what a span costs when it is not recorded (asyncio, 4 vars), {n:,} tasks/batch",
                ladder(n, setup),
                baseline=L_BARE,
                rounds=rounds,
                targets=LADDER_TARGETS,
                notes=[
                    f"spans from a ParentBased(TraceIdRatioBased({RATE})) provider without "
                    "processor; every task of a batch spawned under one request span, not "
                    "sampled (sampled out) or sampled (recorded)",
                    "vs ref: ctxkit's rungs and its floor against span=False, the bare "
                    "floors against bare",
                    "floor, bare: the SDK's start_span + end of one span per task, no "
                    "attributes, beside a bare create_task; floor, spawn(span=False): the SDK's "
                    "part of ctxkit's task span (its attributes), never made current",
                ],
            )
            return [main_table, ladder_table]
        finally:
            setup.shutdown()

    return asyncio.run(main())
