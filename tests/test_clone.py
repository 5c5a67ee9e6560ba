"""Tests for ctxkit.clone, ctxkit.clone_without_span, register/unregister and the fake trace id."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import Context, ContextVar
from typing import TYPE_CHECKING, Literal

import anyio
import pytest
import trio
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

import ctxkit

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

Cloner = Callable[..., Context]
Propagation = Literal["child", "link", "none"]

HEX32 = re.compile(r"[0-9a-f]{32}")

#: A valid span context that no SDK created, as an incoming request's remote parent would be.
REMOTE_PARENT = SpanContext(
    trace_id=0x0123456789ABCDEF0123456789ABCDEF,
    span_id=0x0123456789ABCDEF,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
)


# --- helpers -------------------------------------------------------------------------------------


@contextmanager
def attached(ctx: otel_context.Context) -> Iterator[None]:
    """Make ``ctx`` the current OpenTelemetry context for the block."""
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def hex_trace_id(span_context: SpanContext) -> str:
    return f"{span_context.trace_id:032x}"


def current_span_context() -> SpanContext:
    return trace.get_current_span().get_span_context()


def span_context_in(ctx: Context) -> SpanContext:
    """Return the span context current in ``ctx``."""
    return ctx.run(current_span_context)


def trace_id_in(ctx: Context) -> str | None:
    """Return ``ctxkit.current_trace_id()`` as seen in ``ctx``."""
    return ctx.run(ctxkit.current_trace_id)


def start_span_in(ctx: Context, tracer: trace.Tracer, name: str) -> SpanContext:
    """Start and end a span named ``name`` inside ``ctx``; return its span context."""

    def run() -> SpanContext:
        with tracer.start_as_current_span(name) as span:
            return span.get_span_context()

    return ctx.run(run)


def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    """Return the one finished span named ``name``."""
    spans = [span for span in exporter.get_finished_spans() if span.name == name]
    assert len(spans) == 1, spans
    return spans[0]


def parent_span_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    trace_id: int = span.context.trace_id
    return trace_id


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def request_id() -> ContextVar[str]:
    """A fresh var per test, so values set by one test never reach another."""
    return ContextVar("test.request_id")


@pytest.fixture
def tenant() -> ContextVar[str]:
    return ContextVar("test.tenant")


@pytest.fixture
def tracer(tracer_provider: TracerProvider) -> trace.Tracer:
    return tracer_provider.get_tracer("test")


@pytest.fixture(params=["clone", "clone_without_span"])
def cloner(request: pytest.FixtureRequest, tracer_provider: TracerProvider) -> Cloner:
    """Each of the two public cloning functions (clone with the test's SDK provider)."""
    if request.param == "clone":
        return functools.partial(ctxkit.clone, tracer_provider=tracer_provider)
    return ctxkit.clone_without_span


# --- selection -----------------------------------------------------------------------------------


class TestSelection:
    def test_carries_the_passed_vars(
        self, cloner: Cloner, request_id: ContextVar[str], tenant: ContextVar[str]
    ) -> None:
        """Each passed var holds the value it has in the source."""
        request_id.set("r-1")
        tenant.set("acme")
        result = cloner(request_id, tenant)
        assert result.run(request_id.get) == "r-1"
        assert result.run(tenant.get) == "acme"

    def test_unselected_var_without_default_is_unset(
        self, cloner: Cloner, request_id: ContextVar[str], tenant: ContextVar[str]
    ) -> None:
        """A var set in the source but not selected is unset: get() raises LookupError."""
        request_id.set("r-1")
        tenant.set("acme")
        result = cloner(request_id)
        assert tenant not in result
        with pytest.raises(LookupError):
            result.run(tenant.get)

    def test_unselected_var_with_default_reads_its_default(self, cloner: Cloner) -> None:
        """A var set in the source but not selected reads its default in the clone."""
        session: ContextVar[str] = ContextVar("test.session", default="no session")
        session.set("db-session")
        result = cloner()
        assert result.run(session.get) == "no session"

    def test_selected_var_unset_in_source_stays_unset(
        self, cloner: Cloner, request_id: ContextVar[str]
    ) -> None:
        """A selected var that is unset in the source is unset in the clone."""
        result = cloner(request_id)
        assert request_id not in result
        with pytest.raises(LookupError):
            result.run(request_id.get)

    @pytest.mark.parametrize("count", [1, 16, 17, 40])
    def test_many_vars_each_carried_and_reread(self, cloner: Cloner, count: int) -> None:
        """Small and large selections (read by generated code or by a loop) carry every var's
        current value, also on a repeated clone after one value changed."""
        many = [ContextVar[int](f"test.many.{count}.{i}") for i in range(count)]
        for i, var in enumerate(many):
            var.set(i)
        first = cloner(*many)
        many[-1].set(-1)
        second = cloner(*many)
        assert [first.run(var.get) for var in many] == list(range(count))
        assert [second.run(var.get) for var in many] == [*range(count - 1), -1]

    def test_more_selections_than_the_plan_cache_holds(self, request_id: ContextVar[str]) -> None:
        """Past the cache's 256 selections, old ones are dropped and rebuilt when used again."""
        request_id.set("r-1")
        others = [ContextVar[str](f"test.plans.{i}") for i in range(300)]
        for var in others:
            var.set(var.name)
            clone = ctxkit.clone_without_span(request_id, var)
            assert clone.run(var.get) == var.name
            assert clone.run(request_id.get) == "r-1"
        assert ctxkit.clone_without_span(request_id, others[0]).run(others[0].get) == "test.plans.0"

    def test_setting_a_var_in_the_clone_does_not_change_the_source(
        self, cloner: Cloner, request_id: ContextVar[str], tenant: ContextVar[str]
    ) -> None:
        """Nothing set inside the clone flows back to the source."""
        request_id.set("r-1")
        result = cloner(request_id)
        result.run(request_id.set, "inside")
        result.run(tenant.set, "inside")
        assert request_id.get() == "r-1"
        assert tenant.get("unset") == "unset"

    def test_later_changes_in_the_source_do_not_reach_the_clone(
        self, cloner: Cloner, request_id: ContextVar[str]
    ) -> None:
        """The clone keeps the value the var had at clone time."""
        request_id.set("r-1")
        result = cloner(request_id)
        request_id.set("r-2")
        assert result.run(request_id.get) == "r-1"

    def test_context_argument_is_the_source(
        self, cloner: Cloner, request_id: ContextVar[str]
    ) -> None:
        """With context=, values come from that context, not the current one."""
        request_id.set("old")
        snapshot = contextvars.copy_context()
        request_id.set("new")
        result = cloner(request_id, context=snapshot)
        assert result.run(request_id.get) == "old"

    def test_repeated_var_is_carried_once(
        self, cloner: Cloner, request_id: ContextVar[str]
    ) -> None:
        """Passing the same var twice carries it like passing it once."""
        request_id.set("r-1")
        result = cloner(request_id, request_id)
        assert result.run(request_id.get) == "r-1"


class TestRegister:
    def test_registered_vars_are_carried_without_being_passed(
        self, cloner: Cloner, request_id: ContextVar[str], tenant: ContextVar[str]
    ) -> None:
        """A registered var is carried by every clone, with or without other vars passed."""
        ctxkit.register(tenant)
        tenant.set("acme")
        request_id.set("r-1")
        assert cloner().run(tenant.get) == "acme"
        result = cloner(request_id)
        assert result.run(tenant.get) == "acme"
        assert result.run(request_id.get) == "r-1"

    def test_unregistered_var_is_no_longer_carried(
        self, cloner: Cloner, tenant: ContextVar[str]
    ) -> None:
        """After unregister, a var is carried only when passed."""
        ctxkit.register(tenant)
        ctxkit.unregister(tenant)
        tenant.set("acme")
        assert tenant not in cloner()
        assert cloner(tenant).run(tenant.get) == "acme"

    def test_registering_the_same_var_again_is_a_no_op(
        self, cloner: Cloner, tenant: ContextVar[str]
    ) -> None:
        """Registering a var twice registers it once: one unregister removes it."""
        ctxkit.register(tenant)
        ctxkit.register(tenant, tenant)
        ctxkit.unregister(tenant)
        tenant.set("acme")
        assert tenant not in cloner()

    def test_unregistering_an_unregistered_var_is_a_no_op(
        self, cloner: Cloner, request_id: ContextVar[str], tenant: ContextVar[str]
    ) -> None:
        """Unregistering a var that is not registered changes nothing."""
        ctxkit.register(tenant)
        ctxkit.unregister(request_id)
        tenant.set("acme")
        assert cloner().run(tenant.get) == "acme"

    def test_two_vars_with_the_same_name_cannot_both_be_registered(self, cloner: Cloner) -> None:
        """Registering a second var with a registered var's name raises ValueError."""
        first: ContextVar[str] = ContextVar("test.same_name")
        second: ContextVar[str] = ContextVar("test.same_name")
        ctxkit.register(first)
        with pytest.raises(ValueError, match=re.escape(repr(second))):
            ctxkit.register(second)
        second.set("value")
        assert second not in cloner()

    def test_failed_register_registers_none_of_its_vars(
        self, cloner: Cloner, tenant: ContextVar[str]
    ) -> None:
        """A register call that raises leaves the registry as it was."""
        first: ContextVar[str] = ContextVar("test.same_name")
        second: ContextVar[str] = ContextVar("test.same_name")
        with pytest.raises(ValueError, match="same name"):
            ctxkit.register(tenant, first, second)
        tenant.set("acme")
        assert tenant not in cloner()


class TestDistinctClones:
    """Each call returns a new Context, even from an unchanged source (ctxkit caches)."""

    def test_each_call_returns_a_distinct_context(
        self, cloner: Cloner, tracer: trace.Tracer, request_id: ContextVar[str]
    ) -> None:
        """Repeated clones of an unchanged source are all different objects."""
        request_id.set("r-1")
        with tracer.start_as_current_span("request"):
            clones = [cloner(request_id) for _ in range(4)]
        assert len({id(result) for result in clones}) == 4

    def test_var_set_in_a_clone_does_not_leak_into_the_next_clone(
        self,
        cloner: Cloner,
        tracer: trace.Tracer,
        request_id: ContextVar[str],
        tenant: ContextVar[str],
    ) -> None:
        """Vars set inside a returned clone are absent from later clones of the same source."""
        request_id.set("r-1")
        with tracer.start_as_current_span("request"):
            for attempt in range(4):
                result = cloner(request_id)
                assert result.run(request_id.get) == "r-1", attempt
                assert tenant not in result, attempt
                result.run(request_id.set, "changed in a clone")
                result.run(tenant.set, "leaked from a clone")

    def test_var_set_in_a_clone_of_a_fake_id_source_does_not_leak(
        self, cloner: Cloner, request_id: ContextVar[str], tenant: ContextVar[str]
    ) -> None:
        """The no-leak rule also holds when the source carries a fake trace id."""
        request_id.set("r-1")
        source = ctxkit.clone_without_span(request_id)
        for attempt in range(4):
            result = cloner(request_id, context=source)
            assert result.run(request_id.get) == "r-1", attempt
            assert tenant not in result, attempt
            result.run(request_id.set, "changed in a clone")
            result.run(tenant.set, "leaked from a clone")

    def test_registered_var_set_in_a_clone_does_not_leak(
        self, cloner: Cloner, tracer: trace.Tracer, tenant: ContextVar[str]
    ) -> None:
        """A registered var changed inside a clone keeps its source value in the next clone."""
        ctxkit.register(tenant)
        tenant.set("acme")
        with tracer.start_as_current_span("request"):
            for attempt in range(4):
                result = cloner()
                assert result.run(tenant.get) == "acme", attempt
                result.run(tenant.set, "changed in a clone")

    def test_next_clone_sees_a_changed_source_value(
        self, cloner: Cloner, tracer: trace.Tracer, request_id: ContextVar[str]
    ) -> None:
        """A var changed in the source between two clones has its new value in the second."""
        with tracer.start_as_current_span("request"):
            request_id.set("r-1")
            first = cloner(request_id)
            request_id.set("r-2")
            second = cloner(request_id)
        assert first.run(request_id.get) == "r-1"
        assert second.run(request_id.get) == "r-2"

    def test_next_clone_sees_a_newly_registered_var(
        self,
        cloner: Cloner,
        tracer: trace.Tracer,
        request_id: ContextVar[str],
        tenant: ContextVar[str],
    ) -> None:
        """A var registered between two clones of an unchanged source is in the second."""
        request_id.set("r-1")
        tenant.set("acme")
        with tracer.start_as_current_span("request"):
            first = cloner(request_id)
            ctxkit.register(tenant)
            second = cloner(request_id)
        assert tenant not in first
        assert second.run(tenant.get) == "acme"

    def test_next_clone_sees_a_changed_span(
        self, tracer: trace.Tracer, request_id: ContextVar[str]
    ) -> None:
        """clone_without_span of the same vars under another span carries the new span."""
        request_id.set("r-1")
        with tracer.start_as_current_span("first") as first_span:
            first = ctxkit.clone_without_span(request_id)
        with tracer.start_as_current_span("second") as second_span:
            second = ctxkit.clone_without_span(request_id)
        assert span_context_in(first) == first_span.get_span_context()
        assert span_context_in(second) == second_span.get_span_context()


# --- trace ---------------------------------------------------------------------------------------


class TestTraceCarried:
    def test_clone_without_span_carries_the_source_span(self, tracer: trace.Tracer) -> None:
        """The source's current span is current in the clone."""
        with tracer.start_as_current_span("request") as span:
            result = ctxkit.clone_without_span()
        assert span_context_in(result) == span.get_span_context()

    def test_clone_carries_the_source_trace(
        self, tracer: trace.Tracer, tracer_provider: TracerProvider
    ) -> None:
        """A child clone's current span is in the source's trace."""
        with tracer.start_as_current_span("request") as span:
            result = ctxkit.clone(tracer_provider=tracer_provider)
        assert span_context_in(result).trace_id == span.get_span_context().trace_id

    def test_baggage_is_carried(self, cloner: Cloner, tracer: trace.Tracer) -> None:
        """The source's baggage entries are in the clone."""
        with (
            attached(baggage.set_baggage("tenant", "acme")),
            tracer.start_as_current_span("request"),
        ):
            result = cloner()
        assert result.run(baggage.get_all) == {"tenant": "acme"}

    def test_baggage_is_carried_without_a_span(self, cloner: Cloner) -> None:
        """Baggage is carried even when no span is active."""
        with attached(baggage.set_baggage("tenant", "acme")):
            result = cloner()
        assert result.run(baggage.get_baggage, "tenant") == "acme"

    def test_other_otel_context_entries_are_dropped(
        self, cloner: Cloner, tracer: trace.Tracer
    ) -> None:
        """A custom OpenTelemetry context value of the source is absent from the clone."""
        with (
            attached(otel_context.set_value("test.custom", "request-only")),
            tracer.start_as_current_span("request"),
        ):
            assert otel_context.get_value("test.custom") == "request-only"
            result = cloner()
        assert result.run(otel_context.get_value, "test.custom") is None

    def test_cache_keeps_no_other_otel_context_entry_alive(
        self, tracer: trace.Tracer, request_id: ContextVar[str]
    ) -> None:
        """A source's OpenTelemetry entry beside span and baggage is freed after its clone."""

        class Session:
            """Stands for a per-request object an instrumentation keeps in the context."""

        session = Session()
        freed = weakref.ref(session)
        request_id.set("r-1")
        with (
            attached(otel_context.set_value("test.session", session)),
            tracer.start_as_current_span("request"),
        ):
            result = ctxkit.clone_without_span(request_id)
        del session
        gc.collect()
        assert freed() is None
        assert result.run(request_id.get) == "r-1"

    def test_clones_of_two_alternating_sources_each_carry_their_own(
        self, tracer: trace.Tracer, request_id: ContextVar[str]
    ) -> None:
        """Alternating between two sources with equal vars, each clone has its source's span."""
        request_id.set("r-1")
        with tracer.start_as_current_span("a") as a:
            source_a = contextvars.copy_context()
        with (
            attached(otel_context.set_value("test.custom", "b-only")),
            tracer.start_as_current_span("b") as b,
        ):
            source_b = contextvars.copy_context()
        for _ in range(3):
            for source, span in ((source_a, a), (source_b, b)):
                result = source.run(ctxkit.clone_without_span, request_id)
                assert span_context_in(result) == span.get_span_context()
                assert result.run(otel_context.get_value, "test.custom") is None

    def test_baggage_is_carried_from_a_source_with_span_and_baggage_only(
        self, cloner: Cloner, tracer: trace.Tracer
    ) -> None:
        """A source holding just a span and baggage gives both to the clone, nothing more."""
        with (
            attached(baggage.set_baggage("tenant", "acme")),
            tracer.start_as_current_span("request") as span,
        ):
            result = cloner()
        assert result.run(baggage.get_baggage, "tenant") == "acme"
        assert span_context_in(result).trace_id == span.get_span_context().trace_id

    def test_caller_span_and_context_are_unchanged(
        self, cloner: Cloner, tracer: trace.Tracer
    ) -> None:
        """Cloning leaves the caller's current span and OpenTelemetry context as they were."""
        with tracer.start_as_current_span("request") as span:
            before = otel_context.get_current()
            cloner()
            assert otel_context.get_current() is before
            assert trace.get_current_span() is span

    def test_caller_context_is_unchanged_without_a_span(self, cloner: Cloner) -> None:
        """Cloning with no active span leaves the caller without a span or trace id."""
        before = otel_context.get_current()
        cloner()
        assert otel_context.get_current() is before
        assert not current_span_context().is_valid
        assert ctxkit.current_trace_id() is None


class TestCloneMarkerSpan:
    def test_marker_is_one_ended_internal_span(
        self,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """clone() ends one INTERNAL span named ctxkit.clone with ctxkit.async=True."""
        with tracer.start_as_current_span("request"):
            ctxkit.clone(tracer_provider=tracer_provider)
            spans = span_exporter.get_finished_spans()
            assert [span.name for span in spans] == ["ctxkit.clone"]
            marker = spans[0]
            assert marker.end_time is not None
            assert marker.kind is SpanKind.INTERNAL
            assert dict(marker.attributes or {}) == {"ctxkit.async": True}

    def test_marker_is_current_in_the_clone(
        self,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """Spans started in the clone are children of the marker."""
        with tracer.start_as_current_span("request"):
            result = ctxkit.clone(tracer_provider=tracer_provider)
        marker = finished(span_exporter, "ctxkit.clone")
        assert span_context_in(result) == marker.context
        start_span_in(result, tracer, "work")
        work = finished(span_exporter, "work")
        assert marker.context is not None
        assert parent_span_id(work) == marker.context.span_id
        assert span_trace_id(work) == marker.context.trace_id

    def test_child_marker_is_a_child_of_the_source_span(
        self,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """propagation="child" (the default) parents the marker on the source's span."""
        with tracer.start_as_current_span("request") as span:
            result = ctxkit.clone(tracer_provider=tracer_provider)
        source = span.get_span_context()
        marker = finished(span_exporter, "ctxkit.clone")
        assert parent_span_id(marker) == source.span_id
        assert span_trace_id(marker) == source.trace_id
        assert marker.links == ()
        assert trace_id_in(result) == hex_trace_id(source)

    def test_explicit_child_is_the_default(
        self,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """propagation="child" passed explicitly parents the marker on the source's span."""
        with tracer.start_as_current_span("request") as span:
            ctxkit.clone(propagation="child", tracer_provider=tracer_provider)
        marker = finished(span_exporter, "ctxkit.clone")
        assert parent_span_id(marker) == span.get_span_context().span_id

    def test_child_marker_without_an_active_span_is_a_root(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """With no active span, a child clone's marker starts a new trace."""
        result = ctxkit.clone(tracer_provider=tracer_provider)
        marker = finished(span_exporter, "ctxkit.clone")
        assert marker.parent is None
        assert marker.context is not None
        assert trace_id_in(result) == hex_trace_id(marker.context)

    def test_link_marker_starts_a_new_trace_linked_to_the_source_span(
        self,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """propagation="link": the marker is a root with one link to the source's span."""
        with tracer.start_as_current_span("request") as span:
            result = ctxkit.clone(propagation="link", tracer_provider=tracer_provider)
        source = span.get_span_context()
        marker = finished(span_exporter, "ctxkit.clone")
        assert marker.parent is None
        assert span_trace_id(marker) != source.trace_id
        assert len(marker.links) == 1
        assert marker.links[0].context.trace_id == source.trace_id
        assert marker.links[0].context.span_id == source.span_id
        assert marker.context is not None
        assert trace_id_in(result) == hex_trace_id(marker.context)

    def test_link_marker_without_an_active_span_is_a_root_without_links(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """propagation="link" with no active span gives a root marker and no link."""
        ctxkit.clone(propagation="link", tracer_provider=tracer_provider)
        marker = finished(span_exporter, "ctxkit.clone")
        assert marker.parent is None
        assert marker.links == ()

    def test_link_marker_links_a_valid_remote_parent(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """A valid non-recording source span (a remote parent) is linked too."""
        with trace.use_span(NonRecordingSpan(REMOTE_PARENT)):
            ctxkit.clone(propagation="link", tracer_provider=tracer_provider)
        marker = finished(span_exporter, "ctxkit.clone")
        assert [link.context.span_id for link in marker.links] == [REMOTE_PARENT.span_id]

    def test_none_marker_starts_a_new_trace_without_links(
        self,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """propagation="none": the marker is a root of a new trace with no link."""
        with tracer.start_as_current_span("request") as span:
            result = ctxkit.clone(propagation="none", tracer_provider=tracer_provider)
        marker = finished(span_exporter, "ctxkit.clone")
        assert marker.parent is None
        assert marker.links == ()
        assert span_trace_id(marker) != span.get_span_context().trace_id
        assert marker.context is not None
        assert trace_id_in(result) == hex_trace_id(marker.context)

    def test_marker_relates_to_the_span_of_the_context_argument(
        self,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """With context=, the marker's parent or link is that context's span."""
        with tracer.start_as_current_span("request") as span:
            snapshot = contextvars.copy_context()
        source = span.get_span_context()
        ctxkit.clone(context=snapshot, tracer_provider=tracer_provider)
        child = finished(span_exporter, "ctxkit.clone")
        assert parent_span_id(child) == source.span_id
        span_exporter.clear()
        ctxkit.clone(context=snapshot, propagation="link", tracer_provider=tracer_provider)
        linked = finished(span_exporter, "ctxkit.clone")
        assert [link.context.span_id for link in linked.links] == [source.span_id]

    def test_every_call_ends_its_own_marker(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """Each clone() call records one marker span of its own."""
        first = ctxkit.clone(tracer_provider=tracer_provider)
        second = ctxkit.clone(tracer_provider=tracer_provider)
        spans = span_exporter.get_finished_spans()
        assert [span.name for span in spans] == ["ctxkit.clone", "ctxkit.clone"]
        assert span_context_in(first) != span_context_in(second)


class TestCloneWithoutSpan:
    def test_creates_no_span(
        self, tracer: trace.Tracer, span_exporter: InMemorySpanExporter
    ) -> None:
        """clone_without_span records no span, with or without an active span."""
        ctxkit.clone_without_span()
        with tracer.start_as_current_span("request"):
            ctxkit.clone_without_span()
            assert span_exporter.get_finished_spans() == ()
        assert [span.name for span in span_exporter.get_finished_spans()] == ["request"]

    def test_spans_in_the_clone_are_children_of_the_source_span(
        self, tracer: trace.Tracer, span_exporter: InMemorySpanExporter
    ) -> None:
        """A span started in the clone has the source's span as parent."""
        with tracer.start_as_current_span("request") as span:
            result = ctxkit.clone_without_span()
        start_span_in(result, tracer, "work")
        work = finished(span_exporter, "work")
        assert parent_span_id(work) == span.get_span_context().span_id
        assert span_trace_id(work) == span.get_span_context().trace_id

    def test_trace_id_in_the_clone_is_the_source_trace_id(self, tracer: trace.Tracer) -> None:
        """current_trace_id() in the clone equals the source's trace id."""
        with tracer.start_as_current_span("request") as span:
            result = ctxkit.clone_without_span()
        assert trace_id_in(result) == hex_trace_id(span.get_span_context())

    def test_carries_the_span_of_the_context_argument(self, tracer: trace.Tracer) -> None:
        """With context=, the clone carries that context's span, not the current one."""
        with tracer.start_as_current_span("request") as span:
            snapshot = contextvars.copy_context()
        with tracer.start_as_current_span("other"):
            result = ctxkit.clone_without_span(context=snapshot)
        assert span_context_in(result) == span.get_span_context()


# --- fake trace id -------------------------------------------------------------------------------


class TestFakeTraceId:
    def test_clone_without_span_and_no_active_span_has_a_fake_id(self) -> None:
        """With no valid source span, the clone has a 32-hex, non-zero generated trace id."""
        fake = trace_id_in(ctxkit.clone_without_span())
        assert fake is not None
        assert HEX32.fullmatch(fake)
        assert fake != "0" * 32

    def test_clone_with_a_no_op_provider_has_a_fake_id(self) -> None:
        """A clone whose marker is invalid (no-op tracing) and no source span gets a fake id."""
        fake = trace_id_in(ctxkit.clone(tracer_provider=trace.NoOpTracerProvider()))
        assert fake is not None
        assert HEX32.fullmatch(fake)
        assert fake != "0" * 32

    def test_fake_id_is_not_a_span(self) -> None:
        """The fake id is only a correlation id: no valid span is current in the clone."""
        assert not span_context_in(ctxkit.clone_without_span()).is_valid

    def test_each_clone_gets_a_different_fake_id(self) -> None:
        """Clones of the same span-less source each get their own fake id."""
        source = contextvars.copy_context()
        ids = {trace_id_in(ctxkit.clone_without_span()) for _ in range(20)}
        ids |= {trace_id_in(ctxkit.clone_without_span(context=source)) for _ in range(20)}
        noop = trace.NoOpTracerProvider()
        ids |= {trace_id_in(ctxkit.clone(tracer_provider=noop)) for _ in range(20)}
        assert len(ids) == 60

    def test_reused_traceless_clones_keep_values_and_get_new_ids(self) -> None:
        """Repeated clones of a span-less source reuse the cached clone: each still carries the
        current values of the selected vars, and each gets its own fake id."""
        var: ContextVar[str] = ContextVar("test_clone.traceless")

        def clone_twice(value: str) -> list[Context]:
            var.set(value)
            return [ctxkit.clone_without_span(var) for _ in range(2)]

        clones = Context().run(clone_twice, "a") + Context().run(clone_twice, "b")
        assert [c.get(var) for c in clones] == ["a", "a", "b", "b"]
        assert len({trace_id_in(c) for c in clones}) == 4
        assert not any(c.run(trace.get_current_span).get_span_context().is_valid for c in clones)

    @pytest.mark.parametrize("propagation", ["child", "link", "none"])
    def test_clone_of_a_clone_inherits_the_fake_id(self, propagation: Propagation) -> None:
        """A clone of a fake-id clone (no valid span in either) keeps the same fake id."""
        noop = trace.NoOpTracerProvider()
        outer = ctxkit.clone_without_span()
        fake = trace_id_in(outer)
        inner = outer.run(ctxkit.clone, propagation=propagation, tracer_provider=noop)
        assert trace_id_in(inner) == fake
        assert trace_id_in(outer.run(ctxkit.clone_without_span)) == fake
        assert trace_id_in(ctxkit.clone_without_span(context=outer)) == fake
        grandchild = inner.run(ctxkit.clone_without_span)
        assert trace_id_in(grandchild) == fake

    def test_a_real_span_in_a_fake_id_clone_wins(
        self, tracer: trace.Tracer, span_exporter: InMemorySpanExporter
    ) -> None:
        """A span started in a fake-id clone keeps a real trace id, which current_trace_id shows."""
        result = ctxkit.clone_without_span()
        fake = trace_id_in(result)

        def run() -> tuple[str | None, SpanContext]:
            with tracer.start_as_current_span("work") as span:
                return ctxkit.current_trace_id(), span.get_span_context()

        seen, span_context = result.run(run)
        assert seen == hex_trace_id(span_context)
        assert seen != fake
        assert hex_trace_id(span_context) != fake
        assert finished(span_exporter, "work").parent is None
        assert trace_id_in(result) == fake

    def test_a_clone_with_a_valid_span_carries_no_fake_id(
        self, tracer: trace.Tracer, tracer_provider: TracerProvider
    ) -> None:
        """Under a valid span, a clone of a fake-id context carries the span's trace id and not
        the fake id (which its logs would never show), also when it reuses the cached clone:
        with that span taken away inside the clone, no trace id is left."""
        outer = ctxkit.clone_without_span()
        fake = trace_id_in(outer)

        def inside() -> tuple[SpanContext, list[Context]]:
            with tracer.start_as_current_span("work") as span:
                return span.get_span_context(), [
                    ctxkit.clone_without_span(),
                    ctxkit.clone_without_span(),  # the cached clone, reused
                    ctxkit.clone(tracer_provider=tracer_provider),
                    ctxkit.clone_without_span(context=contextvars.copy_context()),
                ]

        def without_the_span() -> str | None:
            otel_context.attach(otel_context.Context())
            return ctxkit.current_trace_id()

        span_context, clones = outer.run(inside)
        assert [trace_id_in(c) for c in clones] == [hex_trace_id(span_context)] * 4
        assert [c.run(without_the_span) for c in clones] == [None] * 4
        assert trace_id_in(outer) == fake

    def test_traceless_sources_with_one_otel_context_keep_their_own_fake_ids(self) -> None:
        """Two fake-id contexts that share one OpenTelemetry context (and no valid span): the
        cached clone of one is never handed to the other, whose fake id differs."""
        first, second = ctxkit.clone_without_span(), ctxkit.clone_without_span()
        assert first.run(otel_context.get_current) is second.run(otel_context.get_current)
        expected = [trace_id_in(first), trace_id_in(second)] * 3
        sources = [first, second] * 3
        seen = [trace_id_in(source.run(ctxkit.clone_without_span)) for source in sources]
        assert seen == expected
        assert len(set(seen)) == 2

    def test_sdk_clone_of_a_fake_id_clone_shows_the_marker_trace_id(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """clone() with a real provider inside a fake-id clone makes the marker's trace id win."""
        outer = ctxkit.clone_without_span()
        inner = outer.run(ctxkit.clone, tracer_provider=tracer_provider)
        marker = finished(span_exporter, "ctxkit.clone")
        assert marker.parent is None
        assert marker.context is not None
        assert trace_id_in(inner) == hex_trace_id(marker.context)
        assert trace_id_in(inner) != trace_id_in(outer)

    def test_no_op_child_clone_keeps_a_valid_source_trace_id(self) -> None:
        """With a no-op provider and a valid source span, a child clone keeps its trace id."""
        with trace.use_span(NonRecordingSpan(REMOTE_PARENT)):
            result = ctxkit.clone(tracer_provider=trace.NoOpTracerProvider())
        assert trace_id_in(result) == hex_trace_id(REMOTE_PARENT)
        assert span_context_in(result) == REMOTE_PARENT

    def test_no_op_child_clone_keeps_a_recording_source_trace_id(
        self, tracer: trace.Tracer
    ) -> None:
        """With a no-op provider under an SDK span, a child clone keeps the span's trace id."""
        with tracer.start_as_current_span("request") as span:
            result = ctxkit.clone(tracer_provider=trace.NoOpTracerProvider())
        assert trace_id_in(result) == hex_trace_id(span.get_span_context())

    @pytest.mark.parametrize("propagation", ["link", "none"])
    def test_no_op_new_trace_clone_gets_a_fake_id(self, propagation: Propagation) -> None:
        """With a no-op provider, a link/none clone of a valid span has a fake id, no span."""
        with trace.use_span(NonRecordingSpan(REMOTE_PARENT)):
            result = ctxkit.clone(
                propagation=propagation,
                tracer_provider=trace.NoOpTracerProvider(),
            )
        fake = trace_id_in(result)
        assert fake is not None
        assert HEX32.fullmatch(fake)
        assert fake != hex_trace_id(REMOTE_PARENT)
        assert not span_context_in(result).is_valid

    def test_caller_gets_no_fake_id(self) -> None:
        """Cloning never gives the caller a fake id."""
        ctxkit.clone_without_span()
        ctxkit.clone(tracer_provider=trace.NoOpTracerProvider())
        assert ctxkit.current_trace_id() is None


class TestCurrentTraceId:
    def test_none_without_a_span_or_a_clone(self) -> None:
        """With no valid span and no fake id, current_trace_id() is None."""
        assert ctxkit.current_trace_id() is None

    def test_current_span_trace_id_as_32_lowercase_hex(self, tracer: trace.Tracer) -> None:
        """In a span, current_trace_id() is its trace id as 32 lowercase hex chars."""
        with tracer.start_as_current_span("request") as span:
            trace_id = ctxkit.current_trace_id()
        assert trace_id == f"{span.get_span_context().trace_id:032x}"
        assert HEX32.fullmatch(trace_id)

    def test_leading_zeros_are_kept(self) -> None:
        """A small trace id is zero-padded to 32 chars."""
        small = SpanContext(trace_id=0xABC, span_id=1, is_remote=True)
        with trace.use_span(NonRecordingSpan(small)):
            assert ctxkit.current_trace_id() == "0" * 29 + "abc"

    def test_invalid_span_gives_none(self) -> None:
        """The invalid span (what no-op tracing makes current) gives None."""
        with trace.use_span(trace.INVALID_SPAN):
            assert ctxkit.current_trace_id() is None


# --- bad input -----------------------------------------------------------------------------------

VAR_TAKERS: list[Callable[..., object]] = [
    ctxkit.clone,
    ctxkit.clone_without_span,
    ctxkit.register,
    ctxkit.unregister,
]


class TestBadInput:
    @pytest.mark.parametrize("function", VAR_TAKERS, ids=lambda f: f.__name__)
    @pytest.mark.parametrize("bad", ["test.request_id", 42, None])
    def test_non_contextvar_raises_type_error(
        self, function: Callable[..., object], bad: object, request_id: ContextVar[str]
    ) -> None:
        """A non-ContextVar among the vars raises TypeError naming it and ContextVar."""
        with pytest.raises(TypeError, match=re.escape(repr(bad))) as info:
            function(request_id, bad)
        assert "ContextVar" in str(info.value)

    @pytest.mark.parametrize("function", VAR_TAKERS, ids=lambda f: f.__name__)
    def test_non_contextvar_changes_nothing(
        self, function: Callable[..., object], cloner: Cloner, tenant: ContextVar[str]
    ) -> None:
        """A call rejected for a bad var registers, unregisters and records nothing."""
        if function is ctxkit.unregister:
            ctxkit.register(tenant)
        with pytest.raises(TypeError):
            function(tenant, "tenant")
        tenant.set("acme")
        assert (tenant in cloner()) is (function is ctxkit.unregister)

    @pytest.mark.parametrize("bad", ["parent", "CHILD", "", None, 1])
    def test_unknown_propagation_raises_value_error(
        self,
        bad: object,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """An unknown propagation raises ValueError naming it and the accepted ones, no span."""
        with pytest.raises(ValueError, match=re.escape(repr(bad))) as info:
            ctxkit.clone(propagation=bad, tracer_provider=tracer_provider)  # type: ignore[arg-type]
        assert "'child', 'link', 'none'" in str(info.value)
        assert span_exporter.get_finished_spans() == ()

    @pytest.mark.parametrize("bad", [{}, "context", object()])
    def test_non_context_source_raises_type_error(
        self, cloner: Cloner, bad: object, span_exporter: InMemorySpanExporter
    ) -> None:
        """A context= that is not a contextvars.Context raises TypeError naming it, no span."""
        with pytest.raises(TypeError, match=re.escape(repr(bad))):
            cloner(context=bad)
        assert span_exporter.get_finished_spans() == ()


# --- detached ------------------------------------------------------------------------------------


class Observed:
    """What a detached task saw, recorded for the test body to check after it finished."""

    def __init__(self) -> None:
        self.spawned = anyio.Event()
        self.release = anyio.Event()
        self.done = anyio.Event()
        self.request_id: str | None = None
        self.trace_id: str | None = None

    async def background(self, request_id: ContextVar[str]) -> None:
        """Wait, across a checkpoint, until released; then record the var and trace id."""
        self.spawned.set()
        await self.release.wait()
        await anyio.lowlevel.checkpoint()
        self.request_id = request_id.get(None)
        self.trace_id = ctxkit.current_trace_id()
        self.done.set()


@pytest.mark.anyio
class TestDetached:
    async def test_task_in_app_group_outlives_a_cancelled_request(
        self, tracer: trace.Tracer, tracer_provider: TracerProvider, request_id: ContextVar[str]
    ) -> None:
        """A task put in the app's group with a clone finishes after the request is cancelled."""
        observed = Observed()
        request_trace_id: list[str] = []

        async def handle_request(app: TaskGroup) -> None:
            request_id.set("r-1")
            with tracer.start_as_current_span("request") as span:
                request_trace_id.append(hex_trace_id(span.get_span_context()))
                detached = ctxkit.clone(request_id, tracer_provider=tracer_provider)
                app.create_task(observed.background(request_id), context=detached)
                request_id.set("changed after the clone")
                await anyio.sleep_forever()

        async with anyio.create_task_group() as app:
            async with anyio.create_task_group() as request:
                request.start_soon(handle_request, app)
                await observed.spawned.wait()
                request.cancel_scope.cancel()
            observed.release.set()
            await observed.done.wait()
        assert observed.request_id == "r-1"
        assert observed.trace_id == request_trace_id[0]

    async def test_task_outlives_the_request_cancel_scope(
        self, tracer: trace.Tracer, request_id: ContextVar[str]
    ) -> None:
        """Cancelling the scope the clone was made in does not cancel the detached task."""
        observed = Observed()
        async with anyio.create_task_group() as app:
            request_id.set("r-1")
            with tracer.start_as_current_span("request") as span:
                with anyio.CancelScope() as request_scope:
                    detached = ctxkit.clone_without_span(request_id)
                    app.create_task(observed.background(request_id), context=detached)
                    await observed.spawned.wait()
                    request_scope.cancel()
                    await anyio.sleep_forever()
                assert request_scope.cancelled_caught
                expected = hex_trace_id(span.get_span_context())
            observed.release.set()
        assert observed.request_id == "r-1"
        assert observed.trace_id == expected

    async def test_task_keeps_its_fake_trace_id(self, request_id: ContextVar[str]) -> None:
        """A detached task with no span sees its clone's fake id after the request is gone."""
        observed = Observed()
        fakes: list[str | None] = []
        async with anyio.create_task_group() as app:
            async with anyio.create_task_group() as request:

                async def handle_request() -> None:
                    request_id.set("r-1")
                    detached = ctxkit.clone(request_id, tracer_provider=trace.NoOpTracerProvider())
                    fakes.append(trace_id_in(detached))
                    app.create_task(observed.background(request_id), context=detached)
                    await anyio.sleep_forever()

                request.start_soon(handle_request)
                await observed.spawned.wait()
                request.cancel_scope.cancel()
            observed.release.set()
        assert observed.request_id == "r-1"
        assert observed.trace_id is not None
        assert observed.trace_id == fakes[0]
        assert ctxkit.current_trace_id() is None

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_asyncio_task_outlives_a_cancelled_request_task(
        self,
        anyio_backend: str,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        request_id: ContextVar[str],
    ) -> None:
        """asyncio.create_task(coro, context=clone(...)) finishes after its request is cancelled."""
        observed = Observed()
        background: list[asyncio.Task[None]] = []
        request_trace_id: list[str] = []

        async def handle_request() -> None:
            request_id.set("r-1")
            with tracer.start_as_current_span("request") as span:
                request_trace_id.append(hex_trace_id(span.get_span_context()))
                detached = ctxkit.clone(request_id, tracer_provider=tracer_provider)
                background.append(
                    asyncio.create_task(observed.background(request_id), context=detached)
                )
                await anyio.sleep_forever()

        request_task = asyncio.create_task(handle_request())
        await observed.spawned.wait()
        request_task.cancel()
        await asyncio.wait([request_task])
        assert request_task.cancelled()
        observed.release.set()
        await background[0]
        assert observed.request_id == "r-1"
        assert observed.trace_id == request_trace_id[0]

    @pytest.mark.parametrize("anyio_backend", ["trio"])
    async def test_trio_system_task_outlives_a_cancelled_request(
        self,
        anyio_backend: str,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        request_id: ContextVar[str],
    ) -> None:
        """spawn_system_task(fn, context=clone(...)) finishes after its request is cancelled."""
        observed = Observed()
        request_trace_id: list[str] = []

        async def handle_request() -> None:
            request_id.set("r-1")
            with tracer.start_as_current_span("request") as span:
                request_trace_id.append(hex_trace_id(span.get_span_context()))
                detached = ctxkit.clone(request_id, tracer_provider=tracer_provider)
                trio.lowlevel.spawn_system_task(observed.background, request_id, context=detached)
                await trio.sleep_forever()

        async with trio.open_nursery() as request:
            request.start_soon(handle_request)
            await observed.spawned.wait()
            request.cancel_scope.cancel()
        assert request.cancel_scope.cancelled_caught
        observed.release.set()
        await observed.done.wait()
        assert observed.request_id == "r-1"
        assert observed.trace_id == request_trace_id[0]

    async def test_spans_in_the_detached_task_join_the_request_trace(
        self,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """A span the detached task starts after the request ended is a child of the marker."""
        finished_work = anyio.Event()

        async def work() -> None:
            with tracer.start_as_current_span("work"):
                await anyio.lowlevel.checkpoint()
            finished_work.set()

        async with anyio.create_task_group() as app:
            with tracer.start_as_current_span("request"):
                detached = ctxkit.clone(tracer_provider=tracer_provider)
            app.create_task(work(), context=detached)
            await finished_work.wait()
        request = finished(span_exporter, "request")
        marker = finished(span_exporter, "ctxkit.clone")
        work_span = finished(span_exporter, "work")
        assert request.context is not None
        assert marker.context is not None
        assert parent_span_id(marker) == request.context.span_id
        assert parent_span_id(work_span) == marker.context.span_id
        assert span_trace_id(work_span) == request.context.trace_id


class TestEnteredSourceContext:
    def test_clone_of_the_context_being_run(self) -> None:
        """A source context that is entered already (the caller's own) can still be cloned."""
        var: contextvars.ContextVar[str] = contextvars.ContextVar("entered_source")
        ctx = contextvars.copy_context()
        ctx.run(var.set, "inside")

        def clone_self() -> contextvars.Context:
            return ctxkit.clone_without_span(var, context=ctx)

        result = ctx.run(clone_self)
        assert result.run(var.get) == "inside"

    def test_clone_with_span_of_the_context_being_run(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """clone(context=...) of an entered context keeps that context's current span."""
        ctx = contextvars.copy_context()
        tracer = tracer_provider.get_tracer("test")

        def inside() -> tuple[int, int]:
            with tracer.start_as_current_span("request") as request:
                result = ctxkit.clone(context=ctx, tracer_provider=tracer_provider)
                return request.get_span_context().span_id, result.run(
                    lambda: trace.get_current_span().get_span_context().trace_id
                )

        # the span is current in `ctx` only while `inside` runs, so compare against it there
        request_span_id, clone_trace_id = ctx.run(inside)
        (marker,) = [s for s in span_exporter.get_finished_spans() if s.name == "ctxkit.clone"]
        assert marker.parent is not None
        assert marker.parent.span_id == request_span_id
        assert clone_trace_id == marker.context.trace_id
