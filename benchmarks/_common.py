"""What the cases share: the carried vars, the trivial task, and the hand-written patterns.

The hand-written patterns are what a careful user writes without ctxkit:

- ``StrongSet``: the correct fire-and-forget -- a strong reference in a set until the task
  ends, and a done-callback that retrieves (and logs) the exception, so nothing is collected
  mid-flight and nothing is reported only at garbage collection.
- ``HandClone``: the same plus what ctxkit does for ``span=False`` -- a fresh
  ``contextvars.Context`` holding the selected vars and a detached OpenTelemetry context
  with the caller's span and baggage.
- ``HandSpan``: the same plus a child span per task, current in the task, ended with it,
  with the exception recorded on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from contextvars import Context, ContextVar
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

if TYPE_CHECKING:
    from collections.abc import Coroutine, Sequence

    from opentelemetry.sdk.trace import ReadableSpan

now = time.perf_counter_ns

log = logging.getLogger("benchmarks")

#: The four ContextVars every "4 vars" variant carries (a request id, a tenant, a user, a locale).
VARS: Final = tuple(
    ContextVar[str](name)
    for name in ("bench.request_id", "bench.tenant", "bench.user", "bench.lang")
)
#: The same 4 vars as a list: ``vars=`` takes a tuple or a list, and users write both.
VARS_LIST: Final = list(VARS)
_MISSING: Final = object()


def set_vars(vars: Sequence[ContextVar[str]] = VARS) -> None:
    """Give ``vars`` a value in the current context, as a request handler would."""
    for i, var in enumerate(vars):
        var.set(f"value-{i}-{var.name}")


def request_span() -> trace.Span:
    """Return a valid, non-recording span: the current span of an instrumented request."""
    return NonRecordingSpan(
        SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C80319C,
            span_id=0xB7AD6B7169203331,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    )


def unsampled_request_span() -> trace.Span:
    """Return ``request_span()``'s twin not sampled: the request's trace was sampled out."""
    sampled = request_span().get_span_context()
    return NonRecordingSpan(
        SpanContext(sampled.trace_id, sampled.span_id, False, TraceFlags(TraceFlags.DEFAULT))
    )


def request_context(i: int, vars: Sequence[ContextVar[str]] = VARS) -> Context:
    """Return the context of request number ``i``: ``vars`` set to values unique to it, and a
    valid span of its own (a new trace id per request), as an instrumented handler has."""
    span = NonRecordingSpan(
        SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C800000 + i + 1,
            span_id=0xB7AD6B7169200000 + i + 1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    )

    def fill() -> None:
        for j, var in enumerate(vars):
            var.set(f"value-{j}-{i}")
        otel_context.attach(trace.set_span_in_context(span))

    ctx = Context()
    ctx.run(fill)
    return ctx


def ratio_requests(n: int, rate: float) -> list[otel_context.Context]:
    """Return the OpenTelemetry contexts of ``n`` requests under ``TraceIdRatioBased(rate)``.

    Each holds a valid local span of a trace of its own, sampled as that sampler decides for its
    trace id at the root of the request; the trace ids are spread evenly over the sampler's range
    (in a fixed shuffled order), so that exactly ``round(n * rate)`` of them are sampled, spread
    over the list, and every run sees the same mix.
    """
    sampler = TraceIdRatioBased(rate)
    lows = [((2 * i + 1) << 64) // (2 * n) for i in range(n)]  # the middle of each step
    random.Random(15).shuffle(lows)
    result = []
    for i, low in enumerate(lows):
        trace_id = ((0x0AF76519 + i) << 64) | low
        sampled = sampler.should_sample(None, trace_id, "request").decision.is_sampled()
        span = NonRecordingSpan(
            SpanContext(
                trace_id=trace_id,
                span_id=0xB7AD6B7169200000 + i + 1,
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
            )
        )
        result.append(trace.set_span_in_context(span, otel_context.Context()))
    return result


class Batch:
    """Counts the tasks of one batch down and sets ``done`` when the last one has run."""

    __slots__ = ("done", "left")

    def __init__(self, n: int, done: Any) -> None:
        self.left = n
        self.done = done


async def tick(batch: Batch) -> None:
    """The trivial task every spawn case runs: count down, wake the waiter at zero."""
    batch.left -= 1
    if not batch.left:
        batch.done.set()


class Gate:
    """Lets ``n`` tasks block, and tells when all of them are blocked (memory, cancel cases)."""

    __slots__ = ("all_blocked", "left", "n", "open")

    def __init__(self, n: int) -> None:
        self.n = n
        self.left = n
        self.open = asyncio.Event()
        self.all_blocked = asyncio.Event()


async def blocked(gate: Gate) -> None:
    """Block on ``gate.open`` (the pending task of the memory and shutdown cases)."""
    gate.left -= 1
    if not gate.left:
        gate.all_blocked.set()
    await gate.open.wait()


async def parked(gate: Gate) -> None:
    """Block forever on a future of its own (the task the cancel-at-shutdown case cancels).

    Not on the shared ``gate.open``: ``asyncio.Event.wait`` removes its waiter from a deque
    when cancelled, so cancelling N waiters of one Event in any order but FIFO costs O(N**2).
    """
    gate.left -= 1
    if not gate.left:
        gate.all_blocked.set()
    await asyncio.get_running_loop().create_future()


class NoOpExporter(SpanExporter):
    """A span exporter that drops everything (the cost of the SDK pipeline, not of I/O)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        exc = task.exception()
        if exc is not None:
            log.error("background task failed", exc_info=exc)


class StrongSet:
    """The hand-written correct fire-and-forget: strong set plus exception-retrieving callback."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def done(self, task: asyncio.Task[Any]) -> None:
        """The done-callback: drop the reference, retrieve the exception."""
        self.tasks.discard(task)
        _retrieve(task)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.done)
        return task


class StrongSpan(StrongSet):
    """``StrongSet`` plus a span per task, started at spawn and ended with the task (not made
    current, no vars carried): the strong-set pattern with a span."""

    def __init__(self, tracer: trace.Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return super().spawn(_in_span(coro, self.tracer.start_span("task")))


def _install(values: Sequence[tuple[ContextVar[Any], object]], otel: otel_context.Context) -> None:
    for var, value in values:
        if value is not _MISSING:
            var.set(value)
    otel_context.attach(otel)


def detached_otel(span: trace.Span) -> otel_context.Context:
    """Return a new OpenTelemetry context with only ``span`` and the current baggage."""
    result = trace.set_span_in_context(span, otel_context.Context())
    entries = otel_baggage.get_all()
    for key, value in entries.items():
        result = otel_baggage.set_baggage(key, value, result)
    return result


def hand_clone(vars: Sequence[ContextVar[Any]], span: trace.Span | None = None) -> Context:
    """Build, by hand, the Context ctxkit builds: the vars plus a detached OTel context."""
    values = [(var, var.get(_MISSING)) for var in vars]
    otel = detached_otel(trace.get_current_span() if span is None else span)
    ctx = Context()
    ctx.run(_install, values, otel)
    return ctx


class HandClone(StrongSet):
    """``StrongSet`` running each task in a fresh Context with the vars and the OTel context."""

    def __init__(self, vars: Sequence[ContextVar[Any]] = VARS) -> None:
        super().__init__()
        self.vars = vars

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, context=hand_clone(self.vars))
        self.tasks.add(task)
        task.add_done_callback(self.done)
        return task


async def _in_span(coro: Coroutine[Any, Any, Any], span: trace.Span) -> None:
    try:
        await coro
    except Exception as exc:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.record_exception(exc)
        log.error("background task failed", exc_info=exc)
    finally:
        span.end()


class HandSpan(HandClone):
    """``HandClone`` plus a child span per task, current in it and ended with it."""

    def __init__(self, tracer: trace.Tracer, vars: Sequence[ContextVar[Any]] = VARS) -> None:
        super().__init__(vars)
        self.tracer = tracer

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        name: str = getattr(coro, "__qualname__", "task")
        span = self.tracer.start_span(name, attributes={"task.name": name})
        task = asyncio.get_running_loop().create_task(
            _in_span(coro, span), context=hand_clone(self.vars, span)
        )
        self.tasks.add(task)
        task.add_done_callback(self.done)
        return task
