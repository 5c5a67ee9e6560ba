"""The wire format of a ctxkit carrier: its keys, limits and encoding, and the reading of it.

This module owns what ``inject`` writes into a carrier (the ``ctxkit-vars`` JSON object, the
fake trace id, W3C Baggage, alongside the trace propagator's keys) and the reading of a carrier
as untrusted input for ``extract`` and ``consume``: every value is bounded before it is parsed,
nothing is evaluated, nothing raises, and whatever is ignored is returned as a reason, counted in
the ``ctxkit.propagation.rejected`` counter and logged once per process and reason. The public
constants are re-exported, with the API that uses them, by ``ctxkit.propagation``.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple
from urllib.parse import quote, unquote

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from ._logging import logger
from ._trace import EMPTY_OTEL_CONTEXT
from ._version import __version__
from ._w3c import W3CTraceContextPropagator, format_traceparent, parse_traceparent

if TYPE_CHECKING:
    from contextvars import ContextVar

    from opentelemetry.propagators.textmap import TextMapPropagator

#: Carrier key of the JSON object holding the carried ContextVars.
VARS: Final = "ctxkit-vars"
#: Carrier key of the fake trace id, written only when no valid span is current.
TRACE_ID: Final = "ctxkit-trace-id"
#: Carrier key of W3C Baggage, read and written only with ``baggage=True``.
BAGGAGE: Final = "baggage"
#: Carrier key of a retried job's first producer span (a ``traceparent`` value), written only
#: when a job being consumed publishes its own next attempt.
PRODUCER: Final = "ctxkit-producer"
#: Carrier key of the previous attempt's span (a ``traceparent`` value), written with PRODUCER.
PREVIOUS: Final = "ctxkit-previous"
#: Default limit, in bytes, of the ``ctxkit-vars`` value (``max_vars_size=``).
MAX_VARS_SIZE: Final = 4096
#: Most ContextVars one ``ctxkit-vars`` object may hold.
MAX_VARS: Final = 64
#: Most W3C Baggage list-members written or read.
MAX_BAGGAGE_MEMBERS: Final = 64
#: Most bytes of the ``baggage`` value written or read.
MAX_BAGGAGE_SIZE: Final = 8192


_W3C: Final = W3CTraceContextPropagator()
_MISSING: Final = object()
_FAKE_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_ZERO_ID: Final = "0" * 32
# RFC 7230 token, and W3C Baggage's baggage-octet (printable ASCII but space, '"', ',', ';', '\').
_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_OCTETS: Final = r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_TOKEN_RE: Final = re.compile(_TOKEN)
_MEMBER_RE: Final = re.compile(
    rf"({_TOKEN})[ \t]*=[ \t]*({_OCTETS})"
    rf"(?:[ \t]*;[ \t]*{_TOKEN}(?:[ \t]*=[ \t]*{_OCTETS})?)*"
)
_OWS: Final = " \t"


# --- rejected input: metric and log-once -------------------------------------------------------

# Our reasons; the W3C parser adds ``carrier.unreadable``, ``traceparent.*``, ``tracestate.*``.
_NOT_MAPPING: Final = "carrier.not_mapping"
_UNREADABLE: Final = "carrier.unreadable"
_PROPAGATOR_FAILED: Final = "propagator.failed"
_VARS_NOT_STRING: Final = "vars.not_string"
_VARS_TOO_LARGE: Final = "vars.too_large"
_VARS_INVALID_JSON: Final = "vars.invalid_json"
_VARS_NOT_OBJECT: Final = "vars.not_object"
_VARS_TOO_MANY: Final = "vars.too_many"
_VARS_DUPLICATE: Final = "vars.duplicate_name"
_TRACE_ID_INVALID: Final = "trace_id.invalid"
_PRODUCER_INVALID: Final = "producer.invalid"
_PREVIOUS_INVALID: Final = "previous.invalid"
_BAGGAGE_NOT_STRING: Final = "baggage.not_string"
_BAGGAGE_TOO_LARGE: Final = "baggage.too_large"
_BAGGAGE_TOO_MANY: Final = "baggage.too_many_members"
_BAGGAGE_INVALID: Final = "baggage.invalid"
_BAGGAGE_DROPPED: Final = "baggage.dropped"  # inject: members that did not fit or were invalid

_logged: set[str] = set()
_logged_lock: Final = threading.Lock()
_global_counter: metrics.Counter | None = None
_counters: weakref.WeakKeyDictionary[metrics.MeterProvider, metrics.Counter] = (
    weakref.WeakKeyDictionary()
)


def _counter(provider: metrics.MeterProvider | None) -> metrics.Counter:
    global _global_counter
    if provider is None:
        if _global_counter is None:
            _global_counter = _make_counter(metrics.get_meter("ctxkit", __version__))
        return _global_counter
    try:
        return _counters[provider]
    except KeyError:
        counter = _make_counter(provider.get_meter("ctxkit", __version__))
        _counters[provider] = counter
        return counter


def _make_counter(meter: metrics.Meter) -> metrics.Counter:
    return meter.create_counter(
        "ctxkit.propagation.rejected",
        unit="{entry}",
        description="Carrier entries ignored because they were malformed, oversized or unusable",
    )


def _report(reasons: list[str], provider: metrics.MeterProvider | None) -> None:
    """Count each reason and log the first occurrence of each kind in this process."""
    counter = _counter(provider)
    for reason in reasons:
        counter.add(1, {"ctxkit.reason": reason})
        if reason in _logged:  # the common case, without the lock
            continue
        with _logged_lock:
            first = reason not in _logged
            _logged.add(reason)
        if first:  # logged outside the lock: a handler may be slow, or report again
            # Never log the carrier's content: it is untrusted and may hold user data.
            logger.warning(
                "ignored untrusted propagation input (%s); the work runs without it. Each kind "
                "is logged once per process and counted in ctxkit.propagation.rejected",
                reason,
            )


# --- writing a carrier ---------------------------------------------------------------------------


def _owned_keys(propagator: TextMapPropagator | None, baggage: bool) -> frozenset[str]:
    """Return the carrier keys that ``inject`` owns with these options (for integrations)."""
    trace_keys = _W3C.fields if propagator is None else propagator.fields
    extra = (
        (VARS, TRACE_ID, PRODUCER, PREVIOUS, BAGGAGE)
        if baggage
        else (VARS, TRACE_ID, PRODUCER, PREVIOUS)
    )
    return frozenset((*trace_keys, *extra))


def _encode(
    selected: tuple[ContextVar[Any], ...],
    values: list[object],
    otel: otel_context.Context,
    fake: str | None,
    baggage: bool,
    propagator: TextMapPropagator | None,
    max_vars_size: int,
    meter_provider: metrics.MeterProvider | None,
    retry: tuple[trace.SpanContext | None, trace.SpanContext] | None = None,
) -> dict[str, str]:
    """Return what ``inject`` writes for these values and this context; count dropped baggage.

    ``retry`` is ``(first producer span, this attempt's span)`` when the carrier is the next
    attempt of the job being consumed.
    """
    written: dict[str, str] = {}
    span = trace.get_current_span(otel)
    # The propagator sees the span alone: baggage travels only through baggage=True.
    (_W3C if propagator is None else propagator).inject(
        written, context=trace.set_span_in_context(span, EMPTY_OTEL_CONTEXT)
    )
    if not span.get_span_context().is_valid and fake is not None:
        written[TRACE_ID] = fake
    if retry is not None:
        producer, previous = retry
        if producer is not None:
            written[PRODUCER] = format_traceparent(producer)
        written[PREVIOUS] = format_traceparent(previous)
    encoded = _encode_vars(selected, values, max_vars_size)
    if encoded is not None:
        written[VARS] = encoded
    if baggage:
        text, dropped = _encode_baggage(otel)
        if text:
            written[BAGGAGE] = text
        if dropped:
            _report([_BAGGAGE_DROPPED] * dropped, meter_provider)
    return written


def _encode_vars(
    selected: tuple[ContextVar[Any], ...], values: list[object], limit: int
) -> str | None:
    parts: list[str] = []
    for var, value in zip(selected, values, strict=True):
        if value is _MISSING:
            continue
        try:
            text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(
                f"cannot carry the ContextVar {var.name!r}: its value {value!r:.200} is not "
                f"JSON-representable ({exc}); carry an id or a plain dict/list/str/number instead"
            ) from exc
        parts.append(f"{json.dumps(var.name)}:{text}")
    if not parts:
        return None
    if len(parts) > MAX_VARS:
        raise ValueError(f"cannot carry {len(parts)} ContextVars: at most {MAX_VARS} fit")
    result = "{" + ",".join(parts) + "}"
    if len(result) > limit:  # ASCII: one character is one byte
        raise ValueError(
            f"the carried ContextVars take {len(result)} bytes as JSON, over the "
            f"max_vars_size limit of {limit}; carry ids instead of large values, or raise "
            "max_vars_size on both sides"
        )
    return result


def _encode_baggage(otel: otel_context.Context) -> tuple[str, int]:
    """Return the W3C baggage string of ``otel`` and how many members were dropped."""
    members: list[str] = []
    size = -1
    dropped = 0
    for key, value in otel_baggage.get_all(otel).items():
        if not _TOKEN_RE.fullmatch(key):
            dropped += 1
            continue
        try:
            member = f"{key}={quote(str(value), safe='')}"
        except UnicodeEncodeError:  # a lone surrogate
            dropped += 1
            continue
        if len(members) >= MAX_BAGGAGE_MEMBERS or size + 1 + len(member) > MAX_BAGGAGE_SIZE:
            dropped += 1
            continue
        members.append(member)
        size += 1 + len(member)
    return ",".join(members), dropped


# --- reading an untrusted carrier ---------------------------------------------------------------


class _Parsed(NamedTuple):
    values: list[tuple[ContextVar[Any], object]]
    remote: trace.SpanContext | None  # the valid remote span context, if any
    baggage: dict[str, str] | None
    fake: str | None  # the carrier's valid fake trace id
    producer: trace.SpanContext | None = None  # a retry's first producer span
    previous: trace.SpanContext | None = None  # a retry's previous attempt


_NOTHING: Final = _Parsed([], None, None, None)


class _Unreadable(Exception):
    """The carrier's ``get`` raised: nothing more is read from it."""


def _get(carrier: Mapping[str, object], key: str) -> object:
    try:
        value = carrier.get(key)
    except Exception as exc:  # a mapping's get must not break the worker
        raise _Unreadable from exc
    return plain_str(value)


def plain_str(value: object) -> object:
    """Return a ``str`` subclass instance as a plain ``str``; any other value unchanged.

    A subclass can override every method the parsers call (``strip``, ``__len__``, ``__eq__``);
    ``str.__str__`` copies the characters without calling any of them.
    """
    if isinstance(value, str) and type(value) is not str:
        return str.__str__(value)
    return value


def _span_context(raw: object, reason: str, reasons: list[str]) -> trace.SpanContext | None:
    if raw is None:
        return None
    span_context, _ = parse_traceparent(raw)
    if span_context is None:
        reasons.append(reason)
    return span_context


def _read(
    carrier: object,
    selected: tuple[ContextVar[Any], ...],
    baggage: bool,
    propagator: TextMapPropagator | None,
    max_vars_size: int,
    meter_provider: metrics.MeterProvider | None,
) -> _Parsed:
    """Read ``carrier`` with ``_parse`` and report whatever it ignored."""
    reasons: list[str] = []
    parsed = _parse(carrier, selected, baggage, propagator, max_vars_size, reasons)
    if reasons:
        _report(reasons, meter_provider)
    return parsed


def _parse(
    carrier: object,
    selected: tuple[ContextVar[Any], ...],
    baggage: bool,
    propagator: TextMapPropagator | None,
    max_vars_size: int,
    reasons: list[str],
) -> _Parsed:
    """Read ``carrier``; append why anything was ignored to ``reasons``. Never raises."""
    if not isinstance(carrier, Mapping):
        reasons.append(_NOT_MAPPING)
        return _NOTHING
    remote = _parse_trace(carrier, propagator, reasons)
    if _UNREADABLE in reasons:
        return _NOTHING
    try:
        fake = None
        if remote is None:
            raw = _get(carrier, TRACE_ID)
            if raw is not None:
                if isinstance(raw, str) and _FAKE_ID_RE.fullmatch(raw) and raw != _ZERO_ID:
                    fake = raw
                else:
                    reasons.append(_TRACE_ID_INVALID)
        values: list[tuple[ContextVar[Any], object]] = []
        raw = _get(carrier, VARS)
        if raw is not None:
            decoded = _decode_vars(raw, max_vars_size, reasons)
            if decoded:
                for var in selected:
                    value = decoded.get(var.name, _MISSING)
                    if value is not _MISSING:
                        values.append((var, value))
        entries = None
        if baggage:
            raw = _get(carrier, BAGGAGE)
            if raw is not None:
                entries = _decode_baggage(raw, reasons)
        producer = _span_context(_get(carrier, PRODUCER), _PRODUCER_INVALID, reasons)
        previous = _span_context(_get(carrier, PREVIOUS), _PREVIOUS_INVALID, reasons)
    except _Unreadable:
        reasons.append(_UNREADABLE)
        return _NOTHING
    return _Parsed(values, remote, entries, fake, producer, previous)


def _parse_trace(
    carrier: Mapping[str, object], propagator: TextMapPropagator | None, reasons: list[str]
) -> trace.SpanContext | None:
    if propagator is None:
        otel, found = _W3C.extract_with_reasons(carrier, EMPTY_OTEL_CONTEXT)
        reasons.extend(found)
    else:
        try:
            otel = propagator.extract(carrier, context=EMPTY_OTEL_CONTEXT)
            span_context = trace.get_current_span(otel).get_span_context()
        except Exception:  # a third-party propagator must not break the worker
            reasons.append(_PROPAGATOR_FAILED)
            return None
        return span_context if span_context.is_valid else None
    span_context = trace.get_current_span(otel).get_span_context()
    return span_context if span_context.is_valid else None


class _PairsHook:
    """``object_pairs_hook`` noting whether the last object parsed (the outermost) repeats a key."""

    __slots__ = ("duplicated",)

    def __init__(self) -> None:
        self.duplicated = False

    def __call__(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        result = dict(pairs)
        self.duplicated = len(result) != len(pairs)
        return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _decode_vars(raw: object, limit: int, reasons: list[str]) -> dict[str, object] | None:
    if not isinstance(raw, str):
        reasons.append(_VARS_NOT_STRING)
        return None
    # Bound the work before parsing: characters first, then UTF-8 bytes when not ASCII.
    if len(raw) > limit or (
        not raw.isascii() and len(raw.encode("utf-8", "surrogatepass")) > limit
    ):
        reasons.append(_VARS_TOO_LARGE)
        return None
    hook = _PairsHook()
    try:
        decoded = json.loads(raw, object_pairs_hook=hook, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # JSONDecodeError, int digit limit, nesting
        reasons.append(_VARS_INVALID_JSON)
        return None
    if not isinstance(decoded, dict):
        reasons.append(_VARS_NOT_OBJECT)
        return None
    if hook.duplicated:
        reasons.append(_VARS_DUPLICATE)
        return None
    if len(decoded) > MAX_VARS:
        reasons.append(_VARS_TOO_MANY)
        return None
    return decoded


def _decode_baggage(raw: object, reasons: list[str]) -> dict[str, str] | None:
    if not isinstance(raw, str):
        reasons.append(_BAGGAGE_NOT_STRING)
        return None
    if len(raw) > MAX_BAGGAGE_SIZE or (
        not raw.isascii() and len(raw.encode("utf-8", "surrogatepass")) > MAX_BAGGAGE_SIZE
    ):
        reasons.append(_BAGGAGE_TOO_LARGE)
        return None
    if not raw.strip(_OWS):
        return None
    members = raw.split(",")
    if len(members) > MAX_BAGGAGE_MEMBERS:
        reasons.append(_BAGGAGE_TOO_MANY)
        return None
    entries: dict[str, str] = {}
    for member in members:
        match = _MEMBER_RE.fullmatch(member.strip(_OWS))
        if match is None:
            reasons.append(_BAGGAGE_INVALID)
            return None
        try:
            entries[match[1]] = unquote(match[2], errors="strict")
        except UnicodeDecodeError:
            reasons.append(_BAGGAGE_INVALID)
            return None
    return entries


def _otel_for(parsed: _Parsed, base: otel_context.Context) -> otel_context.Context:
    """Return ``base`` with the remote span (or none) current and the carrier's baggage."""
    span = trace.INVALID_SPAN if parsed.remote is None else trace.NonRecordingSpan(parsed.remote)
    result = trace.set_span_in_context(span, base)
    if parsed.baggage is not None:
        for key, value in parsed.baggage.items():
            result = otel_baggage.set_baggage(key, value, result)
    return result
