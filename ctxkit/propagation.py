"""Carry ContextVars and the trace across process boundaries, through job metadata or headers.

``inject`` writes the current context's trace and selected ContextVars into a *carrier* (a
mutable mapping such as a job's labels or headers); ``extract`` reads one back into a detached
``contextvars.Context``; ``consume`` restores one in the current context for the duration of a
``with`` block, inside a CONSUMER span. The wire format (see ``docs/propagation.md``):

- ``traceparent``, ``tracestate``: W3C Trace Context (Level 2), when a valid span is current;
- ``ctxkit-vars``: one JSON object, ``ContextVar.name`` to JSON value, ASCII, at most 4 KiB;
- ``ctxkit-trace-id``: the fake trace id (32 lowercase hex) when no valid span is current;
- ``baggage``: W3C Baggage, only with ``baggage=True``, at most 64 members and 8192 bytes;
- ``ctxkit-producer``, ``ctxkit-previous``: ``traceparent`` values of a retried job's first
  producer span and of its previous attempt, written when a consumed job publishes its own next
  attempt (``inject(message_id=)``).

A carrier comes from outside the process: reading one never raises and never evaluates
anything. Whatever is wrong with it is ignored, counted in the ``ctxkit.propagation.rejected``
counter (attribute ``ctxkit.reason``) and logged once per process and reason on the ``ctxkit``
logger, and the job runs as a new root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from contextvars import Context, ContextVar, Token
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Status, StatusCode

from ._carrier import (
    _MISSING,
    BAGGAGE,
    MAX_BAGGAGE_MEMBERS,
    MAX_BAGGAGE_SIZE,
    MAX_VARS,
    MAX_VARS_SIZE,
    PREVIOUS,
    PRODUCER,
    TRACE_ID,
    VARS,
    _encode,
    _otel_for,
    _read,
)
from ._carrier import _logged as _logged  # tests reset the log-once set through this module
from ._carrier import _owned_keys as _owned_keys  # contrib.taskiq imports it from here
from ._clone import as_var_tuple, check_propagation, otel_of, selection
from ._trace import (
    EMPTY_OTEL_CONTEXT,
    RETRIES,
    fake_trace_id_var,
    get_tracer,
    hex_trace_id,
    inherited_trace_id_var,
    mark_error,
    new_fake_trace_id,
    start_span,
)
from ._w3c import TRACEPARENT, TRACESTATE

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.util.types import AttributeValue

    from ._trace import Propagation, Retries

__all__ = [
    "BAGGAGE",
    "MAX_BAGGAGE_MEMBERS",
    "MAX_BAGGAGE_SIZE",
    "MAX_VARS",
    "MAX_VARS_SIZE",
    "PREVIOUS",
    "PRODUCER",
    "TRACEPARENT",
    "TRACESTATE",
    "TRACE_ID",
    "VARS",
    "ConsumeScope",
    "consume",
    "extract",
    "inject",
]

_CarrierT = TypeVar("_CarrierT", bound=MutableMapping[str, Any])


class _Job(NamedTuple):
    """The job a ``consume`` block is processing, for ``inject(message_id=)`` of its retry."""

    message_id: str
    producer: trace.SpanContext | None  # the first attempt's producer span
    span: trace.SpanContext  # this attempt's span


#: The job being consumed in the current context, when ``consume`` was given a message id.
_job_var: ContextVar[_Job] = ContextVar("ctxkit.propagation.job")


# --- argument checks (programming errors raise) ------------------------------------------------


def _selected(vars: Iterable[ContextVar[Any]], caller: str) -> tuple[ContextVar[Any], ...]:
    """Return ``vars`` plus the registered vars; raise on a non-var or a repeated name."""
    items = as_var_tuple(vars, caller)
    selected = selection(items, caller)
    if len(selected) > 1:
        names: dict[str, ContextVar[Any]] = {}
        for var in selected:
            other = names.setdefault(var.name, var)
            if other is not var:
                raise ValueError(
                    f"{caller}() got two ContextVars named {var.name!r} ({other!r} and {var!r}); "
                    "names identify vars in carriers, give each carried var a unique name"
                )
    return selected


def _check_retries(retries: object) -> None:
    if retries not in RETRIES:
        raise ValueError(f"retries must be one of {', '.join(map(repr, RETRIES))}, got {retries!r}")


def _check_options(max_vars_size: object, propagator: object) -> None:
    if not isinstance(max_vars_size, int) or isinstance(max_vars_size, bool):
        raise TypeError(f"max_vars_size must be an int, got {max_vars_size!r}")
    if max_vars_size < 2:
        raise ValueError(f"max_vars_size must be at least 2 (bytes), got {max_vars_size!r}")
    if propagator is not None and not isinstance(propagator, TextMapPropagator):
        raise TypeError(
            f"propagator must be an opentelemetry TextMapPropagator or None, got {propagator!r}"
        )


# --- inject --------------------------------------------------------------------------------------


def inject(
    carrier: _CarrierT,
    *,
    vars: Iterable[ContextVar[Any]] = (),
    context: Context | None = None,
    baggage: bool = False,
    propagator: TextMapPropagator | None = None,
    max_vars_size: int = MAX_VARS_SIZE,
    meter_provider: metrics.MeterProvider | None = None,
    message_id: str | None = None,
) -> _CarrierT:
    """Write the trace and the selected ContextVars of a context into ``carrier``.

    Semantics:
        Reads ``context`` (None: the calling context): its current span, its fake trace id,
        its baggage, and the value of each ContextVar in ``vars`` plus the registered ones.
        Writes, as strings:

        - the span context as ``traceparent``/``tracestate`` (W3C Trace Context), or in the
          format of ``propagator``, when the current span is valid;
        - the fake trace id as ``ctxkit-trace-id`` when there is no valid span but a fake id;
        - the vars that are set, as one JSON object under ``ctxkit-vars`` keyed by
          ``ContextVar.name`` (ASCII, compact); unset vars are left out;
        - with ``baggage=True``, the baggage as W3C ``baggage``: at most 64 members and 8192
          bytes; members that do not fit, or whose key is not a token, are dropped (counted);
        - with ``message_id``, when the context is inside ``consume(..., message_id=)`` of the
          same id (the job is publishing its own next attempt, as Celery's ``retry()`` and
          taskiq's retry middleware do), the first attempt's producer span as
          ``ctxkit-producer`` and the current attempt's span as ``ctxkit-previous``, so that
          the next attempt can link to both.

        The keys ctxkit owns (those above) are replaced as a set: an owned key not written
        this time is removed, so a carrier reused for a retry never mixes two contexts. Every
        other key is left as it is. Everything is validated before the carrier is touched, so
        an exception leaves it unchanged.

    Args:
        carrier: The mutable mapping to write into (a job's labels, headers).
        vars: ContextVars to carry, besides the registered ones.
        context: The context to read; None means the calling one.
        baggage: Also carry OpenTelemetry baggage. Off by default: baggage can hold user data,
            and carriers are often stored durably.
        propagator: Writes the trace instead of W3C Trace Context (B3, a vendor format).
        max_vars_size: Limit of the ``ctxkit-vars`` value, in bytes.
        meter_provider: Where to count dropped baggage; None means the global provider.
        message_id: The id of the message the carrier travels with (a task id), if known.

    Returns:
        ``carrier`` itself.

    Raises:
        TypeError: ``carrier`` is not a mutable mapping, an element of ``vars`` is not a
            ContextVar, ``context`` is not a Context, or a carried var's value is not
            JSON-representable (the message names the var).
        ValueError: Two selected vars share a name, or ``ctxkit-vars`` would exceed
            ``max_vars_size`` bytes or hold more than ``MAX_VARS`` vars.
    """
    if not isinstance(carrier, MutableMapping):
        raise TypeError(f"inject() writes into a mutable mapping such as a dict, got {carrier!r}")
    selected = _selected(vars, "inject")
    _check_options(max_vars_size, propagator)
    if message_id is not None and not isinstance(message_id, str):
        raise TypeError(f"message_id must be a str or None, got {message_id!r}")
    if context is None:
        values = [var.get(_MISSING) for var in selected]
        otel = otel_context.get_current()
        fake = fake_trace_id_var.get(None)
        job = _job_var.get(None)
    else:
        otel = otel_of(context)  # checks the type, and reads an entered context too
        values = [context.get(var, _MISSING) for var in selected]
        fake = context.get(fake_trace_id_var)
        job = context.get(_job_var)
    retry = None
    if job is not None and message_id is not None and job.message_id == message_id:
        retry = (job.producer, job.span)

    written = _encode(
        selected, values, otel, fake, baggage, propagator, max_vars_size, meter_provider, retry
    )

    for key in _owned_keys(propagator, baggage):
        if key not in written:
            carrier.pop(key, None)
    carrier.update(written)
    return carrier


# --- extract -------------------------------------------------------------------------------------


def extract(
    carrier: object,
    *,
    vars: Iterable[ContextVar[Any]] = (),
    baggage: bool = False,
    propagator: TextMapPropagator | None = None,
    max_vars_size: int = MAX_VARS_SIZE,
    meter_provider: metrics.MeterProvider | None = None,
) -> Context:
    """Return a detached Context holding what ``carrier`` carries, like ``clone_without_span``.

    Semantics:
        The carrier is untrusted input. Nothing in it is evaluated or unpickled, and nothing
        in it makes this function raise: a missing key, a non-string value, invalid JSON, a
        value of the wrong shape or over its size limit, a ``traceparent`` that W3C Trace
        Context Level 2 calls invalid, a carrier that is not a mapping at all -- each is
        ignored, counted in ``ctxkit.propagation.rejected`` with its ``ctxkit.reason``, and
        logged once per process and reason on the ``ctxkit`` logger.

        The result is a new ``contextvars.Context``. It holds, for each ContextVar in
        ``vars`` plus the registered ones whose ``name`` is in ``ctxkit-vars``, the carried
        JSON value; every other ContextVar is unset in it, and other names in the carrier are
        ignored. Its current OpenTelemetry span is the carrier's remote span context, so spans
        started in it are children of the producer's span; without a valid one it carries the
        carrier's fake trace id, or a new one, for log correlation. With ``baggage=True`` it
        also holds the carrier's baggage. Restored values are plain JSON values (a tuple was
        sent as a list); validate them where a var's type matters.

    Args:
        carrier: The mapping to read (a job's labels, headers); anything else is ignored.
        vars: ContextVars that may be restored, besides the registered ones.
        baggage: Also restore W3C baggage.
        propagator: Reads the trace instead of W3C Trace Context (B3, a vendor format); if
            it raises, the trace is ignored.
        max_vars_size: Limit of the ``ctxkit-vars`` value, in bytes; a larger one is ignored.
        meter_provider: Where to count rejected input; None means the global provider.

    Returns:
        A new ``contextvars.Context``.

    Raises:
        TypeError: An element of ``vars`` is not a ContextVar, or an option has a wrong type.
        ValueError: Two selected vars share a name, or ``max_vars_size`` is too small.
    """
    selected = _selected(vars, "extract")
    _check_options(max_vars_size, propagator)
    parsed = _read(carrier, selected, baggage, propagator, max_vars_size, meter_provider)
    fake = None
    if parsed.remote is None:
        fake = parsed.fake if parsed.fake is not None else new_fake_trace_id()
    result = Context()
    result.run(_install, parsed.values, _otel_for(parsed, EMPTY_OTEL_CONTEXT), fake)
    return result


def _install(
    values: list[tuple[ContextVar[Any], object]], otel: otel_context.Context, fake: str | None
) -> None:
    for var, value in values:
        var.set(value)
    otel_context.attach(otel)  # the context is new and private: its token is never needed
    if fake is not None:
        fake_trace_id_var.set(fake)


# --- consume -------------------------------------------------------------------------------------


def consume(
    carrier: object,
    name: str,
    *,
    vars: Iterable[ContextVar[Any]] = (),
    propagation: Propagation = "child",
    system: str | None = None,
    baggage: bool = False,
    propagator: TextMapPropagator | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    max_vars_size: int = MAX_VARS_SIZE,
    meter_provider: metrics.MeterProvider | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    message_id: str | None = None,
    attempt: int = 1,
    retries: Retries = "link",
) -> ConsumeScope:
    """Return a context manager that runs its block as the processing of one carried job.

    Use it as ``with consume(carrier, "emails") as span:`` or ``async with``.

    Semantics:
        On entry it reads ``carrier`` exactly as ``extract`` does (untrusted input: never
        raises, bad entries ignored, counted and logged once) and, in the *current* context,
        sets the carried ContextVars that ``vars`` or the registry allow and makes a new span
        current: ``process {name}``, kind CONSUMER, with the messaging attributes
        ``messaging.operation.name = "process"``, ``messaging.operation.type = "process"``,
        ``messaging.destination.name = name``, ``messaging.system = system`` (when given),
        ``messaging.message.id = message_id`` (when given), and ``ctxkit.attempt = attempt``,
        ``ctxkit.async = True`` and ``attributes``, all set at creation (samplers see them).
        The span's relation to the producer's span follows ``propagation``:

        - ``"child"`` (default): its parent is the producer's span (same trace id);
        - ``"link"``: it starts a new trace with one link to the producer's span -- for work
          that runs long after the request, or fans out; the linked trace id is also the
          attribute ``ctxkit.linked_trace_id``, for backends that do not show links;
        - ``"none"``: it starts a new trace, unrelated.

        An attempt after the first (``attempt > 1``) with ``retries="link"`` (default) and
        ``propagation`` ``"child"`` or ``"link"`` starts a new trace instead, linked to the
        first attempt's producer span (``ctxkit-producer``, else the carrier's span) and to the
        previous attempt's span (``ctxkit-previous``); attributes ``ctxkit.linked_trace_id``
        and ``ctxkit.previous_trace_id`` name their traces. With ``retries="child"`` every
        attempt relates to the first producer span as ``propagation`` says.

        Without a valid remote span the span is a new root. When tracing is a no-op, a
        ``"child"`` block keeps the producer's span context current (its trace id reaches
        logs and further injects); when no valid span is current at all, the block gets the
        carrier's fake trace id (``"child"``) or a new one. When the producer had no valid span
        but sent a fake trace id and the block has a valid span of its own (``"child"``),
        ``current_trace_id()`` in the block still returns the producer's fake id, so that log
        lines join, and the span records it as ``ctxkit.fake_trace_id``.

        An exception escaping the block sets the span's status to ERROR, records it with
        ``error.type``, and propagates. With ``message_id``, ``inject(message_id=)`` of the
        same id inside the block marks the carrier as this job's next attempt. On exit the
        span ends and everything entry set is put back: the ContextVar tokens are reset and
        the OpenTelemetry context detached.
        Those resets only work in the context they were made in: enter and leave the block
        in the same task (a plain ``with``/``async with`` does). A scope is single-use.

    Args:
        carrier: The mapping to read (a job's labels, headers); anything else is ignored.
        name: The destination: a queue or task name, used in the span name.
        vars: ContextVars that may be restored, besides the registered ones.
        propagation: ``"child"``, ``"link"`` or ``"none"``.
        system: The ``messaging.system`` attribute (``"taskiq"``, ``"celery"``), if any.
        baggage: Also restore W3C baggage (it replaces the current baggage in the block).
        propagator: Reads the trace instead of W3C Trace Context (B3, a vendor format).
        tracer_provider: Where to create the span; None means the global provider.
        max_vars_size: Limit of the ``ctxkit-vars`` value, in bytes; a larger one is ignored.
        meter_provider: Where to count rejected input; None means the global provider.
        attributes: More attributes for the span, set at its start.
        message_id: The message's id (a task id): ``messaging.message.id``, and what a retry
            published from the block is recognised by.
        attempt: Which attempt this is, from 1 (the engine's retry count plus one).
        retries: ``"link"`` (default) or ``"child"``: how attempts after the first relate.

    Returns:
        A ``ConsumeScope``; entering it returns the CONSUMER span.

    Raises:
        TypeError: ``name`` is not a string, an element of ``vars`` is not a ContextVar, or
            an option has a wrong type.
        ValueError: ``propagation``, ``retries`` or ``attempt`` is not accepted, two selected
            vars share a name, or ``max_vars_size`` is too small.
    """
    if not isinstance(name, str):
        raise TypeError(f"consume() takes the destination name as a str, got {name!r}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a str or None, got {system!r}")
    if message_id is not None and not isinstance(message_id, str):
        raise TypeError(f"message_id must be a str or None, got {message_id!r}")
    if not isinstance(attempt, int) or isinstance(attempt, bool):
        raise TypeError(f"attempt must be an int, got {attempt!r}")
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt!r}")
    check_propagation(propagation)
    _check_retries(retries)
    selected = _selected(vars, "consume")
    _check_options(max_vars_size, propagator)
    span_attributes: dict[str, AttributeValue] = {
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": name,
        "ctxkit.attempt": attempt,
        "ctxkit.async": True,
    }
    if system is not None:
        span_attributes["messaging.system"] = system
    if message_id is not None:
        span_attributes["messaging.message.id"] = message_id
    if attributes:
        span_attributes.update(attributes)
    return ConsumeScope(
        carrier,
        f"process {name}",
        selected,
        propagation,
        baggage,
        propagator,
        get_tracer(tracer_provider),
        max_vars_size,
        meter_provider,
        span_attributes,
        message_id,
        attempt > 1 and retries == "link",
    )


class ConsumeScope:
    """The context manager ``consume()`` returns; see ``consume`` for what it does."""

    __slots__ = (
        "_attributes",
        "_baggage",
        "_carrier",
        "_ended",
        "_entered",
        "_fake_token",
        "_inherited_token",
        "_job_token",
        "_max_vars_size",
        "_message_id",
        "_meter_provider",
        "_otel_token",
        "_propagation",
        "_propagator",
        "_relink",
        "_selected",
        "_span",
        "_span_name",
        "_tokens",
        "_tracer",
    )

    def __init__(
        self,
        carrier: object,
        span_name: str,
        selected: tuple[ContextVar[Any], ...],
        propagation: Propagation,
        baggage: bool,
        propagator: TextMapPropagator | None,
        tracer: trace.Tracer,
        max_vars_size: int,
        meter_provider: metrics.MeterProvider | None,
        attributes: dict[str, AttributeValue],
        message_id: str | None = None,
        relink: bool = False,
    ) -> None:
        self._carrier = carrier
        self._span_name = span_name
        self._selected = selected
        self._propagation: Propagation = propagation
        self._baggage = baggage
        self._propagator = propagator
        self._tracer = tracer
        self._max_vars_size = max_vars_size
        self._meter_provider = meter_provider
        self._attributes = attributes
        self._message_id = message_id
        self._relink = relink  # a later attempt that starts a new, linked trace
        self._entered = False
        self._ended = False
        self._span: trace.Span = trace.INVALID_SPAN
        self._tokens: list[tuple[ContextVar[Any], Token[Any]]] = []
        self._otel_token: Token[otel_context.Context] | None = None
        self._fake_token: Token[str] | None = None
        self._inherited_token: Token[str] | None = None
        self._job_token: Token[_Job] | None = None

    def __enter__(self) -> trace.Span:
        if self._entered:
            raise RuntimeError("a consume() scope can be entered only once; call consume() again")
        self._entered = True
        carrier, self._carrier = self._carrier, None  # do not keep the job's metadata alive
        parsed = _read(
            carrier,
            self._selected,
            self._baggage,
            self._propagator,
            self._max_vars_size,
            self._meter_provider,
        )
        propagation = self._propagation
        producer = parsed.producer or parsed.remote  # the first attempt's producer span
        attributes = self._attributes
        links: tuple[trace.SpanContext, ...] = ()
        source = _otel_for(parsed, EMPTY_OTEL_CONTEXT)
        mode = propagation
        if propagation != "none" and parsed.producer is not None:
            # A later attempt: relate to the first producer span, not to the retry's sender.
            source = trace.set_span_in_context(trace.NonRecordingSpan(parsed.producer), source)
        if propagation != "none" and self._relink:
            mode = "none"
            links = tuple(ctx for ctx in (producer, parsed.previous) if ctx is not None)
            attributes = dict(attributes)
            if producer is not None:
                attributes["ctxkit.linked_trace_id"] = hex_trace_id(producer)
            if parsed.previous is not None:
                attributes["ctxkit.previous_trace_id"] = hex_trace_id(parsed.previous)
        elif propagation == "link" and producer is not None:
            attributes = {**attributes, "ctxkit.linked_trace_id": hex_trace_id(producer)}
        inherit = propagation == "child" and parsed.remote is None and parsed.fake is not None
        if inherit:
            assert parsed.fake is not None
            attributes = {**attributes, "ctxkit.fake_trace_id": parsed.fake}
        span = start_span(
            self._tracer,
            self._span_name,
            source,
            mode,
            attributes=attributes,
            kind=trace.SpanKind.CONSUMER,
            links=links,
        )
        self._span = span
        current: trace.Span = span
        if not span.get_span_context().is_valid and mode == "child":
            # No-op tracing: keep the producer's span context for logs and further injects.
            current = trace.INVALID_SPAN if producer is None else trace.NonRecordingSpan(producer)
        self._tokens = [(var, var.set(value)) for var, value in parsed.values]
        otel = trace.set_span_in_context(current, otel_context.get_current())
        if self._baggage:
            otel = otel_baggage.clear(otel)
            for key, value in (parsed.baggage or {}).items():
                otel = otel_baggage.set_baggage(key, value, otel)
        self._otel_token = otel_context.attach(otel)
        if not current.get_span_context().is_valid:
            fake = parsed.fake if propagation == "child" else None
            self._fake_token = fake_trace_id_var.set(fake or new_fake_trace_id())
        elif inherit:
            assert parsed.fake is not None
            self._inherited_token = inherited_trace_id_var.set(parsed.fake)
        if self._message_id is not None:
            own = current.get_span_context()
            if own.is_valid:
                self._job_token = _job_var.set(_Job(self._message_id, producer, own))
        return span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ended or not self._entered:
            return
        try:
            self._end_span(exc)
        finally:  # whatever failed while marking the span, the next job must not see this one
            self._restore()

    def _restore(self) -> None:
        """Put back everything ``__enter__`` set, in reverse order."""
        job_token = self._job_token
        if job_token is not None:
            self._job_token = None
            _job_var.reset(job_token)
        inherited_token = self._inherited_token
        if inherited_token is not None:
            self._inherited_token = None
            inherited_trace_id_var.reset(inherited_token)
        token = self._otel_token
        if token is not None:
            self._otel_token = None
            otel_context.detach(token)
        fake_token = self._fake_token
        if fake_token is not None:
            self._fake_token = None
            fake_trace_id_var.reset(fake_token)
        tokens = self._tokens
        self._tokens = []
        for var, var_token in reversed(tokens):
            var.reset(var_token)

    def _end_span(self, exc: BaseException | None) -> None:
        """End the span once, ERROR for ``exc``; it ends whatever fails while marking it."""
        if self._ended or not self._entered:
            return
        self._ended = True
        span = self._span
        try:
            if exc is not None and not isinstance(exc, GeneratorExit):
                mark_error(span, exc)
        finally:
            span.end()

    def abandon(self, exc: BaseException | None = None, *, reason: str | None = None) -> None:
        """End the span of a scope that can no longer be left, without restoring anything.

        For integrations whose engine skipped the hook that leaves the scope (a failing
        neighbour): the span ends with ERROR -- recording ``exc`` when given, else with
        ``reason`` as the status description and ``error.type = "_OTHER"`` -- and what the
        entry set stays set in the context it was entered in (which the engine has
        abandoned). Leaving or abandoning a scope whose span has ended does nothing.
        """
        if exc is None and not self._ended and self._entered:
            self._span.set_status(Status(StatusCode.ERROR, reason or "abandoned"))
            self._span.set_attribute("error.type", "_OTHER")
        self._end_span(exc)

    @property
    def finished(self) -> bool:
        """Tell whether the span has ended (the scope was left or abandoned)."""
        return self._ended

    async def __aenter__(self) -> trace.Span:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
