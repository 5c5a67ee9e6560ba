"""The only module that talks to the OpenTelemetry API: tracers, span contexts, ids and links.

It also owns ctxkit's *fake trace id*: a correlation id kept in a private ContextVar for code
that runs where no valid span is current, so that log lines of one piece of detached work still
share an id. The fake id is never written into OpenTelemetry spans; a valid current span always
wins over it.
"""

from __future__ import annotations

import itertools
import os
import traceback
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final, Literal

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ._errors import exception_text
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.util.types import Attributes

__all__ = [
    "EMPTY_OTEL_CONTEXT",
    "PROPAGATIONS",
    "RETRIES",
    "Propagation",
    "Retries",
    "current_trace_id",
    "detached_otel_context",
    "dropped_like",
    "get_tracer",
    "hex_trace_id",
    "inherited_trace_id_var",
    "mark_error",
    "new_fake_trace_id",
    "start_span",
]

Propagation = Literal["child", "link", "none"]
PROPAGATIONS: Final = ("child", "link", "none")
#: How the attempts after the first of a retried job relate to its producer (see ``consume``).
Retries = Literal["link", "child"]
RETRIES: Final = ("link", "child")

_INSTRUMENTATION_NAME: Final = "ctxkit"
_ALL_ZERO_HEX: Final = "0" * 32

#: An empty OpenTelemetry context, shared: OpenTelemetry's ``Context`` refuses item assignment
#: and ``set_value`` copies, so one instance serves every "new, empty" context (making one costs
#: more than the copy that follows).
EMPTY_OTEL_CONTEXT: Final = otel_context.Context()

#: The keys under which OpenTelemetry keeps the current span and the baggage in a context, as its
#: public ``set_span_in_context`` and ``set_baggage`` write them.
_SPAN_AND_BAGGAGE_KEYS: Final = frozenset(
    (
        *trace.set_span_in_context(trace.INVALID_SPAN, EMPTY_OTEL_CONTEXT),
        *otel_baggage.set_baggage("k", "v", EMPTY_OTEL_CONTEXT),
    )
)

#: The fake trace id of the current context, when ctxkit gave it one (see module docstring).
fake_trace_id_var: ContextVar[str] = ContextVar("ctxkit.fake_trace_id")

#: A producer's fake trace id that log lines of a consumed job keep although the job has a valid
#: span of its own: ``consume`` sets it when the producer had no valid span, so that producer and
#: worker log lines join on one id. It wins over the current span in ``current_trace_id``.
inherited_trace_id_var: ContextVar[str] = ContextVar("ctxkit.inherited_trace_id")

_global_tracer: Final = trace.get_tracer(_INSTRUMENTATION_NAME, __version__)
_tracers: weakref.WeakKeyDictionary[trace.TracerProvider, trace.Tracer] = (
    weakref.WeakKeyDictionary()
)


def get_tracer(provider: trace.TracerProvider | None) -> trace.Tracer:
    """Return ctxkit's tracer from ``provider``, or from the global provider when None.

    The global one is a proxy that follows ``trace.set_tracer_provider`` made later on.
    """
    if provider is None:
        return _global_tracer
    try:
        return _tracers[provider]
    except KeyError:
        tracer = provider.get_tracer(_INSTRUMENTATION_NAME, __version__)
        _tracers[provider] = tracer
        return tracer
    except TypeError:  # a provider that cannot be weakly referenced: no caching
        return provider.get_tracer(_INSTRUMENTATION_NAME, __version__)


_ID_BYTES: Final = 16
_POOL_IDS: Final = 256  # ids drawn from one os.urandom call
_id_counter = itertools.count()
_id_pool: tuple[int, bytes] = (-1, b"")


def new_fake_trace_id() -> str:
    """Return a fresh fake trace id: 32 lowercase hex characters from ``os.urandom``, never zero.

    One ``os.urandom`` call fills a pool of 256 ids (a system call per id would dominate the
    cost of a clone). Each id takes its own slot, numbered by an ``itertools.count`` (whose
    ``next`` is atomic), and a pool serves only the block of numbers it was drawn for, so two
    calls never share a slot, from any thread.
    """
    global _id_pool
    while True:
        block, slot = divmod(next(_id_counter), _POOL_IDS)
        pool_block, pool = _id_pool
        if pool_block != block:
            pool = os.urandom(_ID_BYTES * _POOL_IDS)
            _id_pool = (block, pool)
        value = pool[slot * _ID_BYTES : (slot + 1) * _ID_BYTES].hex()
        if value != _ALL_ZERO_HEX:
            return value


def current_trace_id() -> str | None:
    """Return the trace id that log lines of the current context should carry.

    Returns:
        The fake trace id of the producer of the job being consumed, when that producer had no
        valid span (see ``ctxkit.propagation.consume``); else the current valid span's trace id
        as 32 lowercase hex characters; else the fake trace id that a ctxkit clone gave this
        context; else None.
    """
    inherited = inherited_trace_id_var.get(None)
    if inherited is not None:
        return inherited
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        return f"{span_context.trace_id:032x}"
    return fake_trace_id_var.get(None)


def hex_trace_id(span_context: trace.SpanContext) -> str:
    """Return the trace id of ``span_context`` as 32 lowercase hex characters."""
    return f"{span_context.trace_id:032x}"


def detached_otel_context(
    source: otel_context.Context, span: trace.Span | None = None
) -> otel_context.Context:
    """Return an OpenTelemetry context holding only ``source``'s baggage and a span.

    That is ``source`` itself when it holds nothing else already and the span is its own.

    Args:
        source: The OpenTelemetry context to take the baggage (and by default the span) from.
        span: The span to make current; None keeps ``source``'s current span.
    """
    if source.keys() <= _SPAN_AND_BAGGAGE_KEYS:
        # Nothing but a span and baggage already (a request's usual context): the source is
        # the answer, or with another span one copy of it. OpenTelemetry contexts are never
        # changed in place (``set_value`` copies), so sharing one is safe.
        return source if span is None else trace.set_span_in_context(span, source)
    if span is None:
        span = trace.get_current_span(source)
    result = trace.set_span_in_context(span, EMPTY_OTEL_CONTEXT)
    entries = otel_baggage.get_all(source)
    if entries:
        for key, value in entries.items():
            result = otel_baggage.set_baggage(key, value, result)
    return result


def dropped_like(
    span: trace.Span, span_context: trace.SpanContext, parent: trace.SpanContext
) -> bool:
    """Return True when ``span`` (whose context is ``span_context``) was dropped like ``parent``.

    That is, with ``span_context`` valid: ``span`` is a ``NonRecordingSpan`` (what a tracer
    returns for a span its sampler dropped; an SDK span that has merely ended is not one),
    ``parent`` is local, and the two differ in nothing but the span id -- same trace id, trace
    flags and trace state. (An invalid ``parent`` never matches: the SDK gives the child of one
    a new trace id.) Spans started under either get the same sampling decision
    (``ParentBased`` and ctxkit's ``LinkAwareSampler`` look at exactly those fields) and the
    same trace id, an outgoing ``traceparent`` the same flags, and neither span is exported:
    ``span`` need not be made current, ``parent`` stands in for it.
    """
    # The exact type: an isinstance check of an SDK span against the ABC costs more than all
    # the rest, and a subclass only keeps the general behaviour (made current).
    if type(span) is not trace.NonRecordingSpan or span_context.trace_id != parent.trace_id:
        return False
    state = span_context.trace_state
    parent_state = parent.trace_state
    return (
        span_context.trace_flags == parent.trace_flags
        and not parent.is_remote
        and (state is parent_state or state == parent_state)
    )


def start_span(
    tracer: trace.Tracer,
    name: str,
    source: otel_context.Context,
    propagation: Propagation,
    *,
    attributes: Attributes = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    links: Sequence[trace.SpanContext] = (),
) -> trace.Span:
    """Start a span related to ``source``'s current span as ``propagation`` says.

    ``"child"`` parents it on the current span of ``source``; ``"link"`` starts a new trace with
    one link to that span (when it is valid); ``"none"`` starts a new trace with no link. The
    valid span contexts in ``links`` are linked as well, in every mode, after that one (each
    span context at most once); links are given at creation, so samplers see them.
    """
    if propagation == "child" and not links:  # the runner's hot path
        return tracer.start_span(name, context=source, kind=kind, attributes=attributes)
    linked: list[trace.Link] = []
    if propagation == "link":
        parent = trace.get_current_span(source).get_span_context()
        if parent.is_valid:
            linked.append(trace.Link(parent))
    for extra in links:
        if extra.is_valid and all(link.context != extra for link in linked):
            linked.append(trace.Link(extra))
    if propagation == "child":
        return tracer.start_span(
            name, context=source, kind=kind, attributes=attributes, links=linked or None
        )
    return tracer.start_span(
        name, context=EMPTY_OTEL_CONTEXT, kind=kind, attributes=attributes, links=linked or None
    )


def mark_error(span: trace.Span, exc: BaseException) -> None:
    """Set ``span``'s status to ERROR for ``exc``, with ``error.type``, and record ``exc`` on it.

    Also for an exception whose ``__str__`` raises: the status text then holds a stand-in
    (``exception_text``), and so does the exception event, which the SDK's
    ``record_exception`` cannot make for such an exception.
    """
    text = exception_text(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {text}"))
    span.set_attribute("error.type", type(exc).__qualname__)
    try:
        span.record_exception(exc)
    except Exception:  # the SDK formats str(exc) itself
        module = type(exc).__module__
        qualname = type(exc).__qualname__
        span.add_event(
            "exception",
            {
                "exception.type": qualname if module == "builtins" else f"{module}.{qualname}",
                "exception.message": text,
                "exception.stacktrace": "".join(traceback.format_exception(exc)),
            },
        )
