"""Strict W3C Trace Context Level 2 ``traceparent``/``tracestate`` handling.

This module owns ctxkit's parsing and formatting of both headers: the pure
parsers, which say *why* a value was rejected with a short ``Reason`` string, the
formatters, and ``W3CTraceContextPropagator``, the OpenTelemetry
``TextMapPropagator`` that ctxkit uses by default for job-queue carriers. It
passes the W3C conformance suite (``w3c/trace-context`` at ``acab820``,
``test/test.py``) where OpenTelemetry's own propagator does not: repeated
``traceparent`` values restart the trace, the Level 2 ``tracestate`` key grammar
(``@`` anywhere after the first character, 256 characters in all) is accepted,
and a duplicated ``tracestate`` key keeps its first entry instead of dropping
the whole header. Nothing here logs or raises on malformed input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    DefaultGetter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from opentelemetry.propagators.textmap import CarrierT, Getter, Setter

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
#: A ``traceparent`` value longer than this is not parsed (the 00 form is 55).
MAX_TRACEPARENT_LENGTH: Final = 512
#: Combined ``tracestate`` length (values joined with ``,``) accepted at most.
MAX_TRACESTATE_LENGTH: Final = 8192
#: The spec's limit on ``tracestate`` list-members.
MAX_TRACESTATE_MEMBERS: Final = 32


class Reason(StrEnum):
    """Name why a header was rejected; each value is a plain ``str``.

    ``traceparent.*`` and ``carrier.unreadable`` restart the trace (the context
    comes back unchanged). ``tracestate.*`` drop the tracestate and keep the
    traceparent, except ``tracestate.duplicate_key``: later entries of a repeated
    key were dropped and the rest kept.
    """

    CARRIER_UNREADABLE = "carrier.unreadable"
    TRACEPARENT_MULTIPLE = "traceparent.multiple"
    TRACEPARENT_TOO_LONG = "traceparent.too_long"
    TRACEPARENT_INVALID_FORMAT = "traceparent.invalid_format"
    TRACEPARENT_VERSION_FF = "traceparent.version_ff"
    TRACEPARENT_ZERO_TRACE_ID = "traceparent.zero_trace_id"
    TRACEPARENT_ZERO_PARENT_ID = "traceparent.zero_parent_id"
    TRACESTATE_TOO_LONG = "tracestate.too_long"
    TRACESTATE_TOO_MANY_MEMBERS = "tracestate.too_many_members"
    TRACESTATE_INVALID_MEMBER = "tracestate.invalid_member"
    TRACESTATE_DUPLICATE_KEY = "tracestate.duplicate_key"


# version-trace_id-parent_id-flags; a version above 00 may add "-..." fields.
_TRACEPARENT_RE: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?"
)
# Level 2: key = (lcalpha / DIGIT) 0*255(keychar), keychar adds _ - * / @.
_KEY_RE: Final = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}")
# value = 0*255(chr) nblk-chr: printable ASCII but "," and "=", no final space.
_VALUE_RE: Final = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_OWS: Final = " \t"
# Level 2 defines sampled (bit 0) and random-trace-id (bit 1); the other bits
# are reserved and MUST be sent as zero.
_KNOWN_FLAGS: Final = TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID


def parse_traceparent(value: object) -> tuple[SpanContext | None, Reason | None]:
    """Parse one ``traceparent`` value into a remote span context.

    Leading and trailing spaces and tabs (OWS) are ignored. Version ``00`` must
    have exactly four fields; a higher version (never ``ff``) may carry more
    fields after a ``-``, which are ignored. Flag bits other than sampled and
    random-trace-id are cleared.

    Args:
        value: The header value; anything but a ``str`` is invalid.

    Returns:
        ``(span_context, None)`` when valid, else ``(None, reason)``.
    """
    if not isinstance(value, str):
        return None, Reason.TRACEPARENT_INVALID_FORMAT
    if len(value) > MAX_TRACEPARENT_LENGTH:
        return None, Reason.TRACEPARENT_TOO_LONG
    match = _TRACEPARENT_RE.fullmatch(value.strip(_OWS))
    if match is None:
        return None, Reason.TRACEPARENT_INVALID_FORMAT
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff":
        return None, Reason.TRACEPARENT_VERSION_FF
    if version == "00" and rest is not None:
        return None, Reason.TRACEPARENT_INVALID_FORMAT
    if trace_id == "0" * 32:
        return None, Reason.TRACEPARENT_ZERO_TRACE_ID
    if parent_id == "0" * 16:
        return None, Reason.TRACEPARENT_ZERO_PARENT_ID
    span_context = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(parent_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16) & _KNOWN_FLAGS),
    )
    return span_context, None


def parse_tracestate(
    values: Sequence[object],
) -> tuple[TraceState | None, Reason | None]:
    """Parse the ``tracestate`` values of one carrier, in order.

    The values are joined with ``,``; empty and whitespace-only members are
    skipped. The whole tracestate is discarded (``None``) when it is too long,
    has more than 32 members or has any invalid member. A repeated key keeps its
    first (leftmost) entry and reports ``tracestate.duplicate_key``.

    Args:
        values: The header values; a lone ``str`` is taken as one value.

    Returns:
        ``(trace_state, reason)``: ``trace_state`` is ``None`` when discarded,
        and ``reason`` is ``None`` when nothing was dropped.
    """
    if isinstance(values, str):
        values = [values]
    texts: list[str] = []
    length = -1
    for value in values:
        if not isinstance(value, str):
            return None, Reason.TRACESTATE_INVALID_MEMBER
        length += len(value) + 1
        if length > MAX_TRACESTATE_LENGTH:
            return None, Reason.TRACESTATE_TOO_LONG
        texts.append(value)
    pairs: dict[str, str] = {}
    members = 0
    reason = None
    for raw in ",".join(texts).split(","):
        member = raw.strip(_OWS)
        if not member:
            continue
        members += 1
        if members > MAX_TRACESTATE_MEMBERS:
            return None, Reason.TRACESTATE_TOO_MANY_MEMBERS
        key, equals, value = member.partition("=")
        if not (equals and _KEY_RE.fullmatch(key) and _VALUE_RE.fullmatch(value)):
            return None, Reason.TRACESTATE_INVALID_MEMBER
        if key in pairs:
            reason = Reason.TRACESTATE_DUPLICATE_KEY
        else:
            pairs[key] = value
    return _trace_state(pairs), reason


def _trace_state(pairs: dict[str, str]) -> TraceState:
    # TraceState(entries) re-validates with OpenTelemetry's Level 1 key regex,
    # drops keys such as "foo@" or "t@vvvvvvvvvvvvvvv" and logs a warning: fill
    # a fresh instance's store with the members validated above instead.
    state = TraceState()
    store = getattr(state, "_dict", None)
    if isinstance(store, dict):
        store.update(pairs)
        return state
    return TraceState(list(pairs.items()))  # pragma: no cover - other OTel layout


def format_traceparent(span_context: SpanContext) -> str:
    """Format ``00-{trace_id:032x}-{span_id:016x}-{flags:02x}``, reserved flags 0."""
    flags = span_context.trace_flags & _KNOWN_FLAGS
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{flags:02x}"


def format_tracestate(trace_state: TraceState) -> str:
    """Join the ``key=value`` entries with ``,``, leftmost first ("" if none)."""
    return ",".join(f"{key}={value}" for key, value in trace_state.items())


def _read(carrier: CarrierT, key: str, getter: Getter[CarrierT]) -> list[object]:
    if type(getter) is DefaultGetter:
        # Read mappings directly: the default getter turns bytes into int lists.
        if not isinstance(carrier, Mapping):
            raise TypeError(type(carrier).__name__)
        raw: object = carrier.get(key)
    else:
        raw = getter.get(carrier, key)
    if raw is None:
        return []
    if isinstance(raw, list | tuple):
        return [_plain(item) for item in raw]
    return [_plain(raw)]


def _plain(value: object) -> object:
    # A str subclass may override the methods the parsers call: copy it into a plain str.
    if isinstance(value, str) and type(value) is not str:
        return str.__str__(value)
    return value


def _values(carrier: CarrierT, name: str, getter: Getter[CarrierT]) -> list[object]:
    """Return the carrier's values for ``name``, matched case-insensitively."""
    values = _read(carrier, name, getter)
    if not values:
        keys: Iterable[object] = (
            list(carrier.keys())
            if isinstance(carrier, Mapping) and type(getter) is DefaultGetter
            else getter.keys(carrier)
        )
        for key in keys:
            plain = _plain(key)
            if isinstance(key, str) and isinstance(plain, str) and plain.lower() == name != plain:
                values.extend(_read(carrier, key, getter))
    return values


class W3CTraceContextPropagator(TextMapPropagator):
    """Propagate ``traceparent`` and ``tracestate`` per W3C Trace Context Level 2.

    ``extract`` never raises and never logs: an invalid ``traceparent`` restarts
    the trace (the given context comes back unchanged), an invalid
    ``tracestate`` is dropped while the ``traceparent`` is kept. Use
    ``extract_with_reasons`` to learn why, for logs or metrics.
    """

    def extract_with_reasons(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> tuple[Context, list[Reason]]:
        """Extract the remote span context and say what was rejected.

        Args:
            carrier: The mapping (or other carrier ``getter`` reads) to read.
            context: The context to extend; a new empty one when ``None``.
            getter: How to read ``carrier``; repeated fields are list values.

        Returns:
            The context, holding a non-recording span for the remote parent when
            the ``traceparent`` is valid, and the ``Reason`` of everything rejected,
            empty when nothing was.
        """
        if context is None:
            context = Context()
        try:
            traceparents = _values(carrier, TRACEPARENT, getter)
        except Exception:  # a carrier must never break the caller
            return context, [Reason.CARRIER_UNREADABLE]
        if not traceparents:
            return context, []
        if len(traceparents) > 1:
            return context, [Reason.TRACEPARENT_MULTIPLE]
        span_context, reason = parse_traceparent(traceparents[0])
        if span_context is None:
            return context, [reason or Reason.TRACEPARENT_INVALID_FORMAT]
        reasons: list[Reason] = []
        try:
            tracestates = _values(carrier, TRACESTATE, getter)
        except Exception:  # keep the valid traceparent
            tracestates, reasons = [], [Reason.CARRIER_UNREADABLE]
        if tracestates:
            trace_state, reason = parse_tracestate(tracestates)
            if reason is not None:
                reasons.append(reason)
            if trace_state:
                span_context = SpanContext(
                    trace_id=span_context.trace_id,
                    span_id=span_context.span_id,
                    is_remote=True,
                    trace_flags=span_context.trace_flags,
                    trace_state=trace_state,
                )
        span = trace.NonRecordingSpan(span_context)
        return trace.set_span_in_context(span, context), reasons

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        """Extract as ``extract_with_reasons`` does, dropping the reasons."""
        return self.extract_with_reasons(carrier, context, getter)[0]

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        """Write the current span context as ``traceparent`` and ``tracestate``.

        Nothing is written without a valid span context, and no ``tracestate``
        when it has no entries.

        Args:
            carrier: The carrier to write into.
            context: The context holding the span; the current one when ``None``.
            setter: How to write into ``carrier``.
        """
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return
        setter.set(carrier, TRACEPARENT, format_traceparent(span_context))
        tracestate = format_tracestate(span_context.trace_state)
        if tracestate:
            setter.set(carrier, TRACESTATE, tracestate)

    @property
    def fields(self) -> set[str]:
        """Return the carrier keys that ``inject`` writes."""
        return {TRACEPARENT, TRACESTATE}
