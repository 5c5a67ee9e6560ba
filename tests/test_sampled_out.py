"""Task spans and clone markers the sampler drops: when the caller's span stands in for them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

import ctxkit
from ctxkit import _trace

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from opentelemetry.context import Context
    from opentelemetry.util.types import Attributes

    from ._support import MakeRunner

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331


def _sdk_flag_bits() -> int:
    """The trace-flag bits besides "sampled" that this SDK gives the spans it makes.

    OpenTelemetry SDK 1.42 sets 0x02 ("random trace id") on every span it makes; later ones
    copy the parent's bits. A parent made by the SDK carries them too, so the parent spans
    of these tests do, as a request span of the same SDK would.
    """
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    parent = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, False, TraceFlags(0)))
    child = provider.get_tracer("probe").start_span(
        "probe", context=trace.set_span_in_context(parent)
    )
    return int(child.get_span_context().trace_flags) & ~TraceFlags.SAMPLED


SDK_FLAG_BITS = _sdk_flag_bits()


def parent_span(
    sampled: bool, *, remote: bool = False, state: TraceState | None = None
) -> trace.Span:
    flags = TraceFlags((TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT) | SDK_FLAG_BITS)
    return NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, remote, flags, state))


class DropNamed(Sampler):
    """``ParentBased(root)``, except that spans named ``names`` are dropped (with ``state``)."""

    def __init__(
        self,
        names: Sequence[str] = (),
        state: TraceState | None = None,
        root: Sampler = ALWAYS_ON,
    ) -> None:
        self._names = names
        self._state = state
        self._inner = ParentBased(root)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if name in self._names:
            parent = trace.get_current_span(parent_context).get_span_context()
            state = parent.trace_state if self._state is None else self._state
            return SamplingResult(Decision.DROP, None, state)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links)

    def get_description(self) -> str:
        return "DropNamed"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider_for(exporter: InMemorySpanExporter) -> Iterator[Any]:
    made: list[TracerProvider] = []

    def make(sampler: Sampler) -> TracerProvider:
        provider = TracerProvider(sampler=sampler)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.shutdown()


class Seen:
    """What a task saw: its current span context and the trace id of its log lines."""

    span: SpanContext | None = None
    trace_id: str | None = None


def work(seen: Seen, tracer: trace.Tracer) -> Any:
    async def run() -> None:
        seen.span = trace.get_current_span().get_span_context()
        seen.trace_id = ctxkit.current_trace_id()
        with tracer.start_as_current_span("inner"):
            pass

    return run


@pytest.mark.anyio
class TestSpawn:
    async def test_dropped_with_the_callers_trace_keeps_the_callers_span(
        self, make_runner: MakeRunner, provider_for: Any, exporter: InMemorySpanExporter
    ) -> None:
        """Under a local parent that was not sampled the task span is dropped like it: the
        caller's span stays current in the task, with the same trace id; nothing is exported;
        the handle has no span, as with span=False."""
        provider = provider_for(ParentBased(ALWAYS_ON))
        seen = Seen()
        parent = parent_span(sampled=False)
        async with make_runner(tracer_provider=provider) as runner:
            with trace.use_span(parent):
                handle = runner.spawn(work(seen, provider.get_tracer("t")), name="job")
        assert seen.span == parent.get_span_context()
        assert seen.trace_id == handle.trace_id == f"{TRACE_ID:032x}"
        assert exporter.get_finished_spans() == ()
        assert handle.span_context == trace.INVALID_SPAN_CONTEXT

    async def test_no_op_tracer_keeps_the_callers_span(self, make_runner: MakeRunner) -> None:
        """Without an SDK the tracer hands back the caller's span: it stays current, and the
        handle's span context is the caller's (as before dropped spans had a stand-in)."""
        seen = Seen()
        parent = parent_span(sampled=True)
        async with make_runner(tracer_provider=trace.NoOpTracerProvider()) as runner:
            with trace.use_span(parent):
                handle = runner.spawn(work(seen, trace.NoOpTracer()), name="job")
        assert seen.span == handle.span_context == parent.get_span_context()
        assert handle.trace_id == f"{TRACE_ID:032x}"

    async def test_error_in_a_dropped_task_is_still_reported(
        self, make_runner: MakeRunner, provider_for: Any, exporter: InMemorySpanExporter
    ) -> None:
        """A task whose span was dropped fails as any other: outcome error, nothing exported."""
        provider = provider_for(ParentBased(ALWAYS_ON))

        async def fail() -> None:
            raise ValueError("boom")

        async with make_runner(tracer_provider=provider) as runner:
            with trace.use_span(parent_span(sampled=False)):
                handle = runner.spawn(fail)
        assert handle.outcome == "error"
        assert exporter.get_finished_spans() == ()

    async def test_dropped_under_a_sampled_caller_is_current(
        self, make_runner: MakeRunner, provider_for: Any, exporter: InMemorySpanExporter
    ) -> None:
        """A sampler that drops the task span in a sampled trace: the dropped span is current,
        so that the task's own spans are dropped too (ParentBased), not recorded under the
        caller's."""
        provider = provider_for(DropNamed(["job"]))
        seen = Seen()
        async with make_runner(tracer_provider=provider) as runner:
            with provider.get_tracer("t").start_as_current_span("request"):
                handle = runner.spawn(work(seen, provider.get_tracer("t")), name="job")
        assert seen.span == handle.span_context
        assert [s.name for s in exporter.get_finished_spans()] == ["request"]

    async def test_dropped_under_a_remote_caller_is_current(
        self, make_runner: MakeRunner, provider_for: Any
    ) -> None:
        """A remote parent is sampled by other rules than a local one: no stand-in."""
        provider = provider_for(ParentBased(ALWAYS_ON))
        seen = Seen()
        async with make_runner(tracer_provider=provider) as runner:
            with trace.use_span(parent_span(sampled=False, remote=True)):
                handle = runner.spawn(work(seen, provider.get_tracer("t")), name="job")
        assert seen.span == handle.span_context
        assert seen.span.span_id != SPAN_ID

    @pytest.mark.parametrize("propagation", ["link", "none"])
    async def test_dropped_new_trace_is_current(
        self, make_runner: MakeRunner, provider_for: Any, propagation: Any
    ) -> None:
        """A dropped root of a new trace (link, none) has a trace of its own: it is current."""
        provider = provider_for(ParentBased(ALWAYS_OFF))
        seen = Seen()
        async with make_runner(tracer_provider=provider) as runner:
            with trace.use_span(parent_span(sampled=False)):
                handle = runner.spawn(
                    work(seen, provider.get_tracer("t")), name="job", propagation=propagation
                )
        assert seen.span == handle.span_context
        assert seen.span.trace_id != TRACE_ID
        assert seen.trace_id == handle.trace_id == f"{seen.span.trace_id:032x}"

    @pytest.mark.parametrize(
        ("state", "stands_in"),
        [(TraceState([("k", "v")]), True), (TraceState([("k", "other")]), False)],
        ids=["equal-state", "other-state"],
    )
    async def test_trace_state_must_match(
        self, make_runner: MakeRunner, provider_for: Any, state: TraceState, stands_in: bool
    ) -> None:
        """The caller's span stands in only when the sampler left the trace state as it was
        (an equal one will do); a changed state is carried by the dropped span, made current."""
        provider = provider_for(DropNamed(["job"], state=state))
        seen = Seen()
        parent = parent_span(sampled=False, state=TraceState([("k", "v")]))
        async with make_runner(tracer_provider=provider) as runner:
            with trace.use_span(parent):
                handle = runner.spawn(work(seen, provider.get_tracer("t")), name="job")
        expected = parent.get_span_context() if stands_in else handle.span_context
        assert seen.span == expected


class TestClone:
    @pytest.mark.parametrize("explicit", [False, True], ids=["current", "context="])
    def test_dropped_marker_leaves_the_callers_span_current(
        self, provider_for: Any, explicit: bool
    ) -> None:
        """clone(): a marker dropped like the caller's span is not made current, with or
        without ``context=``."""
        provider = provider_for(ParentBased(ALWAYS_ON))
        parent = parent_span(sampled=False)
        with trace.use_span(parent):
            source = ctxkit.clone_without_span() if explicit else None
            ctx = ctxkit.clone(context=source, tracer_provider=provider)
        assert ctx.run(trace.get_current_span) is parent

    @pytest.mark.parametrize("explicit", [False, True], ids=["current", "context="])
    def test_recorded_marker_is_current(self, provider_for: Any, explicit: bool) -> None:
        """A recorded marker is current in the clone, although it has ended (and so is no
        longer recording) when the clone is built."""
        provider = provider_for(ParentBased(ALWAYS_ON))
        with provider.get_tracer("t").start_as_current_span("request") as request:
            source = ctxkit.clone_without_span() if explicit else None
            ctx = ctxkit.clone(context=source, tracer_provider=provider)
        current = ctx.run(trace.get_current_span).get_span_context()
        assert current.trace_id == request.get_span_context().trace_id
        assert current.span_id != request.get_span_context().span_id


class TestDroppedLike:
    def test_a_recording_span_never_matches(self, provider_for: Any) -> None:
        provider = provider_for(ParentBased(ALWAYS_ON))
        with provider.get_tracer("t").start_as_current_span("request") as request:
            child = provider.get_tracer("t").start_span("child")
        context = request.get_span_context()
        assert not _trace.dropped_like(child, child.get_span_context(), context)
        child.end()

    def test_another_trace_never_matches(self) -> None:
        span = parent_span(sampled=False)
        other = SpanContext(TRACE_ID + 1, SPAN_ID, False, TraceFlags(TraceFlags.DEFAULT))
        assert not _trace.dropped_like(span, span.get_span_context(), other)
        assert not _trace.dropped_like(span, span.get_span_context(), trace.INVALID_SPAN_CONTEXT)
