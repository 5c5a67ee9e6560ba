"""Tests for ctxkit.propagation: inject, extract and consume through carriers."""

from __future__ import annotations

import contextvars
import json
import logging
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import Context, ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

import ctxkit
from ctxkit import propagation
from ctxkit.propagation import consume, extract, inject

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

Propagation = Literal["child", "link", "none"]

REPO = Path(__file__).resolve().parent.parent
TRACE_HEX = "0123456789abcdef0123456789abcdef"
SPAN_HEX = "0123456789abcdef"
TRACEPARENT = f"00-{TRACE_HEX}-{SPAN_HEX}-01"
REMOTE = SpanContext(
    trace_id=int(TRACE_HEX, 16),
    span_id=int(SPAN_HEX, 16),
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
)
MISSING: Any = object()
Carrier = dict[str, Any]

request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[object] = ContextVar("tenant")
user: ContextVar[str] = ContextVar("user")  # never allowed in the tests that check allowlists


@pytest.fixture(autouse=True)
def _fresh_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give every test new vars with the same names: sync tests share one context, so a value
    one test sets would otherwise reach the next. Names, not objects, are what travels."""
    module = sys.modules[__name__]
    for var in (request_id, tenant, user):
        monkeypatch.setattr(module, var.name, ContextVar(var.name))


@pytest.fixture(autouse=True)
def _fresh_log_once() -> Iterator[None]:
    """Each test sees the first rejection of each kind logged."""
    saved = set(propagation._logged)
    propagation._logged.clear()
    yield
    propagation._logged.clear()
    propagation._logged.update(saved)


@contextmanager
def attached(ctx: otel_context.Context) -> Iterator[None]:
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def remote_parent() -> otel_context.Context:
    return trace.set_span_in_context(NonRecordingSpan(REMOTE))


def rejected(reader: InMemoryMetricReader) -> dict[str, int]:
    """Return the ctxkit.propagation.rejected counts by reason."""
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    if data is None:
        return counts
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "ctxkit"
            for metric in scope.metrics:
                if metric.name != "ctxkit.propagation.rejected":
                    continue
                for point in metric.data.data_points:
                    reason = str((point.attributes or {})["ctxkit.reason"])
                    counts[reason] = int(getattr(point, "value", 0))
    return counts


def in_context(ctx: Context) -> dict[str, object]:
    """Return what code running in ``ctx`` sees."""

    def read() -> dict[str, object]:
        span = trace.get_current_span()
        return {
            "request_id": request_id.get(MISSING),
            "tenant": tenant.get(MISSING),
            "user": user.get(MISSING),
            "span_context": span.get_span_context(),
            "trace_id": ctxkit.current_trace_id(),
            "baggage": dict(baggage.get_all()),
        }

    return ctx.run(read)


class B3Single(TextMapPropagator):
    """A minimal B3 single-header propagator (``b3: {trace}-{span}-{sampled}``) for the tests."""

    def extract(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> otel_context.Context:
        context = otel_context.Context() if context is None else context
        values = getter.get(carrier, "b3")
        if not values:
            return context
        trace_id, span_id, sampled = values[0].split("-")
        span_context = SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(sampled)),
        )
        return trace.set_span_in_context(NonRecordingSpan(span_context), context)

    def inject(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            value = f"{span_context.trace_id:032x}-{span_context.span_id:016x}-1"
            setter.set(carrier, "b3", value)

    @property
    def fields(self) -> set[str]:
        return {"b3"}


class Exploding(B3Single):
    def extract(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> otel_context.Context:
        raise RuntimeError("broken propagator")


# --- inject --------------------------------------------------------------------------------------


class TestInject:
    def test_writes_trace_and_vars_and_keeps_other_keys(
        self, tracer_provider: TracerProvider
    ) -> None:
        """The current span goes out as traceparent, the selected vars as one JSON object keyed
        by var name; other keys are untouched and the carrier itself is returned."""
        carrier: dict[str, Any] = {"queue": "emails", "priority": 3}
        with tracer_provider.get_tracer("t").start_as_current_span("request") as span:
            request_id.set("r-1")
            tenant.set({"id": 7, "tags": ["a", "é"]})
            result = inject(carrier, vars=(request_id, tenant))
        context = span.get_span_context()
        assert result is carrier
        assert carrier == {
            "queue": "emails",
            "priority": 3,
            "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-03",  # Level 2
            "ctxkit-vars": '{"request_id":"r-1","tenant":{"id":7,"tags":["a","\\u00e9"]}}',
        }
        assert carrier["ctxkit-vars"].isascii()

    def test_writes_tracestate(self) -> None:
        """A span context with a tracestate also writes the tracestate key."""
        state = trace.TraceState([("vendor", "x1")])
        span_context = SpanContext(REMOTE.trace_id, REMOTE.span_id, True, REMOTE.trace_flags, state)
        with attached(trace.set_span_in_context(NonRecordingSpan(span_context))):
            carrier = inject(Carrier())
        assert carrier == {"traceparent": TRACEPARENT, "tracestate": "vendor=x1"}

    def test_unset_vars_and_no_span_write_nothing(self) -> None:
        """Unset vars are left out; with no span and no fake trace id nothing is written."""
        assert contextvars.Context().run(inject, {"a": "b"}, vars=(request_id,)) == {"a": "b"}

    def test_registered_vars_are_carried(self) -> None:
        """Registered vars travel without being passed."""
        ctxkit.register(tenant)

        def run() -> dict[str, Any]:
            tenant.set("t-1")
            return inject({})

        assert contextvars.Context().run(run) == {"ctxkit-vars": '{"tenant":"t-1"}'}

    def test_reads_the_given_context(self) -> None:
        """context= is read instead of the calling context."""
        source = contextvars.Context()
        source.run(request_id.set, "from-source")
        source.run(otel_context.attach, remote_parent())
        request_id.set("from-caller")
        carrier = inject(Carrier(), vars=(request_id,), context=source)
        assert carrier == {
            "traceparent": TRACEPARENT,
            "ctxkit-vars": '{"request_id":"from-source"}',
        }

    def test_reads_a_context_that_is_entered_already(self) -> None:
        """context= may be the context being run (it cannot be entered twice, yet is read)."""
        source = contextvars.Context()
        source.run(request_id.set, "entered")
        source.run(otel_context.attach, remote_parent())
        carrier = source.run(lambda: inject(Carrier(), vars=(request_id,), context=source))
        assert carrier == {
            "traceparent": TRACEPARENT,
            "ctxkit-vars": '{"request_id":"entered"}',
        }

    def test_fake_trace_id_when_that_is_all_there_is(self) -> None:
        """In a clone without a valid span, the fake trace id travels as ctxkit-trace-id."""
        clone = ctxkit.clone_without_span(context=contextvars.Context())
        fake = clone.run(ctxkit.current_trace_id)
        assert clone.run(inject, {}) == {"ctxkit-trace-id": fake}

    def test_owned_keys_are_replaced_as_a_set(self) -> None:
        """Stale keys ctxkit owns are removed when not written again; others stay."""
        carrier = {
            "traceparent": "stale",
            "tracestate": "stale=1",
            "ctxkit-vars": "stale",
            "baggage": "kept=1",
            "other": "kept",
        }
        clone = ctxkit.clone_without_span(context=contextvars.Context())
        clone.run(inject, carrier)
        assert carrier == {
            "baggage": "kept=1",  # not owned without baggage=True
            "other": "kept",
            "ctxkit-trace-id": clone.run(ctxkit.current_trace_id),
        }

    @pytest.mark.parametrize(
        "value",
        [object(), {1, 2}, math.nan, math.inf, b"bytes"],
        ids=["object", "set", "nan", "inf", "bytes"],
    )
    def test_value_not_json_raises_type_error_naming_the_var(self, value: object) -> None:
        """A value JSON cannot represent raises TypeError naming the var; the carrier is
        left unchanged."""
        carrier = {"x": "y"}

        def run() -> None:
            tenant.set(value)
            inject(carrier, vars=(tenant,))

        with pytest.raises(TypeError, match="'tenant'"):
            contextvars.Context().run(run)
        assert carrier == {"x": "y"}

    def test_circular_value_raises_type_error(self) -> None:
        """A value that contains itself is not JSON-representable."""
        loop: list[object] = []
        loop.append(loop)
        tenant.set(loop)
        with pytest.raises(TypeError, match="'tenant'"):
            inject({}, vars=(tenant,))

    def test_size_limit(self) -> None:
        """ctxkit-vars over max_vars_size (4 KiB by default) raises ValueError; the limit is
        configurable."""
        tenant.set("x" * 4096)
        carrier: dict[str, Any] = {}
        with pytest.raises(ValueError, match="max_vars_size"):
            inject(carrier, vars=(tenant,))
        assert carrier == {}
        assert propagation.MAX_VARS_SIZE == 4096
        inject(carrier, vars=(tenant,), max_vars_size=5000)
        assert len(carrier["ctxkit-vars"]) == len('{"tenant":""}') + 4096
        tenant.set("x" * 10)
        with pytest.raises(ValueError, match="max_vars_size"):
            inject({}, vars=(tenant,), max_vars_size=10)

    def test_too_many_vars(self) -> None:
        """More than MAX_VARS carried vars raise ValueError."""
        many = [ContextVar[int](f"v{index}") for index in range(propagation.MAX_VARS + 1)]

        def run() -> None:
            for var in many:
                var.set(1)
            inject({}, vars=many)

        with pytest.raises(ValueError, match="at most 64"):
            contextvars.Context().run(run)

    def test_two_vars_with_one_name_raise(self) -> None:
        """Two selected vars with the same name are rejected, passed or registered."""
        twin: ContextVar[str] = ContextVar("request_id")
        with pytest.raises(ValueError, match="'request_id'"):
            inject({}, vars=(request_id, twin))
        ctxkit.register(request_id)
        with pytest.raises(ValueError, match="'request_id'"):
            inject({}, vars=(twin,))
        with pytest.raises(ValueError, match="'request_id'"):
            extract({}, vars=(twin,))

    def test_caller_errors_raise_eagerly(self) -> None:
        """Programming errors of the caller raise TypeError/ValueError."""
        with pytest.raises(TypeError, match="ContextVar"):
            inject({}, vars=("request_id",))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"vars=\(var,\)"):
            inject({}, vars=request_id)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="iterable"):
            inject({}, vars=3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="mutable mapping"):
            inject(("a", "b"))  # type: ignore[type-var]
        with pytest.raises(TypeError, match=r"contextvars\.Context"):
            inject({}, context={})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="max_vars_size"):
            inject({}, max_vars_size="4096")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_vars_size"):
            inject({}, max_vars_size=0)
        with pytest.raises(TypeError, match="TextMapPropagator"):
            inject({}, propagator=object())  # type: ignore[arg-type]

    def test_baggage_only_when_asked(self) -> None:
        """Baggage is not carried by default; with baggage=True it is, percent-encoded."""
        ctx = baggage.set_baggage("user", "a b,c;d", remote_parent())
        ctx = baggage.set_baggage("plan", "pro", ctx)
        with attached(ctx):
            assert inject({}) == {"traceparent": TRACEPARENT}
            carrier = inject(Carrier(), baggage=True)
        assert carrier == {
            "traceparent": TRACEPARENT,
            "baggage": "user=a%20b%2Cc%3Bd,plan=pro",
        }
        restored = extract(carrier, baggage=True)
        assert in_context(restored)["baggage"] == {"user": "a b,c;d", "plan": "pro"}

    def test_baggage_within_w3c_limits(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """At most 64 members and 8192 bytes are written; the rest, and members whose key is
        not a token, are dropped and counted."""
        ctx = otel_context.Context()
        for index in range(70):
            ctx = baggage.set_baggage(f"k{index}", "v", ctx)
        ctx = baggage.set_baggage("bad key", "v", ctx)
        with attached(ctx):
            carrier = inject(Carrier(), baggage=True, meter_provider=meter_provider)
        assert carrier["baggage"].split(",") == [f"k{index}=v" for index in range(64)]
        assert rejected(metric_reader) == {"baggage.dropped": 7}

        ctx = baggage.set_baggage("big", "x" * 5000, otel_context.Context())
        ctx = baggage.set_baggage("huge", "y" * 5000, ctx)
        ctx = baggage.set_baggage("small", "z", ctx)
        with attached(ctx):
            carrier = inject({}, baggage=True, meter_provider=meter_provider)
        assert carrier["baggage"] == "big=" + "x" * 5000 + ",small=z"
        assert len(carrier["baggage"]) <= propagation.MAX_BAGGAGE_SIZE

    def test_baggage_that_cannot_be_encoded_is_dropped(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """A value with a lone surrogate cannot be UTF-8: dropped, and no empty key written."""
        carrier: Carrier = {"baggage": "stale=1"}
        with attached(baggage.set_baggage("k", "\ud800")):
            inject(carrier, baggage=True, meter_provider=meter_provider)
        assert carrier == {}
        assert rejected(metric_reader) == {"baggage.dropped": 1}

    def test_custom_propagator(self) -> None:
        """propagator= writes the trace in its own format instead of traceparent, and reads
        it back."""
        with attached(remote_parent()):
            carrier = inject({"traceparent": "foreign"}, propagator=B3Single())
        assert carrier == {"traceparent": "foreign", "b3": f"{TRACE_HEX}-{SPAN_HEX}-1"}
        restored = in_context(extract({"b3": carrier["b3"]}, propagator=B3Single()))
        assert restored["span_context"] == REMOTE


# --- extract -------------------------------------------------------------------------------------


#: Whether ``json.loads`` raises ``RecursionError`` on arrays nested this deep: it nests as deep
#: as the recursion limit on 3.11 (about 1,000 levels), a C recursion limit on 3.12 (1,500) and
#: 3.13 (10,000), and as the C stack allows from 3.14 (about 65,000 with an 8 MiB stack).
JSON_RAISES_AT = {2030: sys.version_info < (3, 13), 50_000: sys.version_info < (3, 14)}


def nested_vars(depth: int) -> str:
    """Return a ``ctxkit-vars`` value whose ``request_id`` is a list nested ``depth`` deep."""
    return '{"request_id":' + "[" * depth + "]" * depth + "}"


def nesting_depth(value: object) -> int:
    """Count the levels of ``[[...]]`` without recursing (the value may be very deep)."""
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


class TestExtract:
    def test_round_trip(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """Vars and the remote span come back in a detached Context; spans started there are
        children of the producer's span."""
        with tracer_provider.get_tracer("t").start_as_current_span("request") as span:
            request_id.set("r-1")
            tenant.set([1, 2.5, None, True, {"k": "v"}])
            carrier = json.loads(json.dumps(inject({}, vars=(request_id, tenant))))
        request_id.set("consumer's own")
        ctx = extract(carrier, vars=(request_id, tenant))
        seen = in_context(ctx)
        assert seen["request_id"] == "r-1"
        assert seen["tenant"] == [1, 2.5, None, True, {"k": "v"}]
        assert seen["span_context"].trace_id == span.get_span_context().trace_id  # type: ignore[attr-defined]
        assert seen["span_context"].is_remote  # type: ignore[attr-defined]
        assert request_id.get() == "consumer's own"

        def child() -> None:
            tracer_provider.get_tracer("t").start_span("job").end()

        ctx.run(child)
        job = next(s for s in span_exporter.get_finished_spans() if s.name == "job")
        assert job.parent is not None
        assert job.parent.span_id == span.get_span_context().span_id

    def test_result_is_detached(self) -> None:
        """The result holds only restored vars: the caller's other vars and OTel context are
        not in it, and each call returns a new Context."""
        tenant.set("caller's")
        with attached(otel_context.set_value("other", 1, remote_parent())):
            first = extract({}, vars=(request_id,))
            second = extract({}, vars=(request_id,))
        assert first is not second
        assert isinstance(first, Context)
        assert tenant not in first
        assert request_id not in first
        assert first.run(otel_context.get_value, "other") is None
        assert not in_context(first)["span_context"].is_valid  # type: ignore[attr-defined]

    def test_only_allowed_vars_are_restored(self) -> None:
        """Only vars passed in vars= or registered are restored; other names are ignored."""
        carrier = {"ctxkit-vars": json.dumps({"request_id": "r", "tenant": "t", "user": "u"})}
        seen = in_context(extract(carrier, vars=(request_id,)))
        assert (seen["request_id"], seen["tenant"], seen["user"]) == ("r", MISSING, MISSING)
        ctxkit.register(tenant)
        seen = in_context(extract(carrier))
        assert (seen["request_id"], seen["tenant"], seen["user"]) == (MISSING, "t", MISSING)

    def test_fake_trace_id_carries_over(self) -> None:
        """Without a valid traceparent the carrier's fake trace id is kept; without one a new
        one is made."""
        fake = "abcdef0123456789abcdef0123456789"
        assert in_context(extract({"ctxkit-trace-id": fake}))["trace_id"] == fake
        first = in_context(extract({}))["trace_id"]
        second = in_context(extract({}))["trace_id"]
        assert isinstance(first, str)
        assert len(first) == 32
        assert first != second

    def test_valid_traceparent_wins_over_the_fake_id(self) -> None:
        """A valid remote span makes the fake id irrelevant."""
        carrier = {"traceparent": TRACEPARENT, "ctxkit-trace-id": "a" * 32}
        assert in_context(extract(carrier))["trace_id"] == TRACE_HEX

    def test_baggage_not_restored_by_default(self) -> None:
        """The carrier's baggage is ignored unless baggage=True."""
        carrier = {"baggage": "user=alice"}
        assert in_context(extract(carrier))["baggage"] == {}
        assert in_context(extract(carrier, baggage=True))["baggage"] == {"user": "alice"}

    def test_baggage_properties_and_whitespace(self) -> None:
        """W3C members with properties and optional whitespace are read (properties dropped)."""
        carrier = {"baggage": " a = 1 ; prop ; p2=x , b=%E2%82%AC"}
        assert in_context(extract(carrier, baggage=True))["baggage"] == {"a": "1", "b": "€"}


# --- malformed input -----------------------------------------------------------------------------


class RaisingMapping(Mapping[str, object]):
    def __getitem__(self, key: str) -> object:
        raise RuntimeError("unreadable")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("unreadable")

    def __len__(self) -> int:
        return 1


class RaisingOnVars(dict[str, object]):
    """A mapping whose trace keys read fine but whose ctxkit-vars key raises."""

    def get(self, key: str, default: object = None) -> object:
        if key == "ctxkit-vars":
            raise RuntimeError("unreadable")
        return super().get(key, default)


MALFORMED: list[tuple[str, object, str]] = [
    ("none", None, "carrier.not_mapping"),
    ("string", "traceparent=x", "carrier.not_mapping"),
    ("pairs", [("traceparent", TRACEPARENT)], "carrier.not_mapping"),
    ("raising-mapping", RaisingMapping(), "carrier.unreadable"),
    ("raising-vars", RaisingOnVars(traceparent=TRACEPARENT), "carrier.unreadable"),
    ("tp-int", {"traceparent": 1}, "traceparent.invalid_format"),
    ("tp-bytes", {"traceparent": TRACEPARENT.encode()}, "traceparent.invalid_format"),
    ("tp-empty", {"traceparent": ""}, "traceparent.invalid_format"),
    ("tp-upper", {"traceparent": TRACEPARENT.upper()}, "traceparent.invalid_format"),
    ("tp-extra-00", {"traceparent": TRACEPARENT + "-00"}, "traceparent.invalid_format"),
    (
        "tp-short",
        {"traceparent": f"00-{TRACE_HEX}-{SPAN_HEX[:-1]}-01"},
        "traceparent.invalid_format",
    ),
    ("tp-ff", {"traceparent": "ff" + TRACEPARENT[2:]}, "traceparent.version_ff"),
    ("tp-zero-trace", {"traceparent": f"00-{'0' * 32}-{SPAN_HEX}-01"}, "traceparent.zero_trace_id"),
    (
        "tp-zero-span",
        {"traceparent": f"00-{TRACE_HEX}-{'0' * 16}-01"},
        "traceparent.zero_parent_id",
    ),
    ("tp-long", {"traceparent": "01" + TRACEPARENT[2:] + "-" + "x" * 600}, "traceparent.too_long"),
    ("tp-twice", {"traceparent": [TRACEPARENT, TRACEPARENT]}, "traceparent.multiple"),
    ("vars-dict", {"ctxkit-vars": {"request_id": "evil"}}, "vars.not_string"),
    ("vars-bytes", {"ctxkit-vars": b'{"request_id":"evil"}'}, "vars.not_string"),
    ("vars-json", {"ctxkit-vars": '{"request_id": "evil"'}, "vars.invalid_json"),
    ("vars-empty", {"ctxkit-vars": ""}, "vars.invalid_json"),
    ("vars-nan", {"ctxkit-vars": '{"request_id": NaN}'}, "vars.invalid_json"),
    ("vars-deep", {"ctxkit-vars": "[" * 4000 + "]" * 90}, "vars.invalid_json"),
    ("vars-array", {"ctxkit-vars": '["request_id", "evil"]'}, "vars.not_object"),
    ("vars-string", {"ctxkit-vars": '"evil"'}, "vars.not_object"),
    (
        "vars-dup",
        {"ctxkit-vars": '{"request_id": "evil", "request_id": "x"}'},
        "vars.duplicate_name",
    ),
    ("vars-big", {"ctxkit-vars": json.dumps({"request_id": "x" * 5000})}, "vars.too_large"),
    (
        "vars-big-utf8",
        {"ctxkit-vars": json.dumps({"request_id": "é" * 2100}, ensure_ascii=False)},
        "vars.too_large",
    ),
    ("vars-many", {"ctxkit-vars": json.dumps({f"v{i}": 0 for i in range(65)})}, "vars.too_many"),
    ("id-int", {"ctxkit-trace-id": 123}, "trace_id.invalid"),
    ("id-upper", {"ctxkit-trace-id": "A" * 32}, "trace_id.invalid"),
    ("id-zero", {"ctxkit-trace-id": "0" * 32}, "trace_id.invalid"),
    ("id-short", {"ctxkit-trace-id": "a" * 31}, "trace_id.invalid"),
    ("bag-int", {"baggage": 5}, "baggage.not_string"),
    ("bag-big", {"baggage": "a=" + "x" * 8200}, "baggage.too_large"),
    ("bag-many", {"baggage": ",".join(f"k{i}=v" for i in range(65))}, "baggage.too_many_members"),
    ("bag-member", {"baggage": "a=1,no-equals"}, "baggage.invalid"),
    ("bag-space", {"baggage": "a=b c"}, "baggage.invalid"),
    ("bag-empty-member", {"baggage": "a=1,,b=2"}, "baggage.invalid"),
    ("bag-utf8", {"baggage": "a=%FF"}, "baggage.invalid"),
]


class TestMalformed:
    @pytest.mark.parametrize(
        ("carrier", "reason"),
        [pytest.param(carrier, reason, id=name) for name, carrier, reason in MALFORMED],
    )
    def test_extract_ignores_counts_and_logs_once(
        self,
        carrier: object,
        reason: str,
        meter_provider: MeterProvider,
        metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Bad input never raises: it is ignored (no vars, a new root with a fake id),
        counted with its reason, and logged once per process per kind without its content."""
        with caplog.at_level(logging.WARNING, logger="ctxkit"):
            for _ in range(2):
                ctx = extract(
                    carrier, vars=(request_id,), baggage=True, meter_provider=meter_provider
                )
                seen = in_context(ctx)
                assert seen["request_id"] is MISSING
                assert not seen["span_context"].is_valid  # type: ignore[attr-defined]
                assert seen["baggage"] == {}
                assert isinstance(seen["trace_id"], str)
        assert rejected(metric_reader) == {reason: 2}
        records = [r for r in caplog.records if r.name == "ctxkit"]
        assert len(records) == 1
        assert records[0].levelno == logging.WARNING
        assert reason in records[0].getMessage()
        assert "evil" not in records[0].getMessage()

    @pytest.mark.parametrize(
        ("carrier", "reason"),
        [pytest.param(carrier, reason, id=name) for name, carrier, reason in MALFORMED],
    )
    def test_consume_ignores_and_runs_as_new_root(
        self,
        carrier: object,
        reason: str,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        metric_reader: InMemoryMetricReader,
    ) -> None:
        """consume() on bad input runs its block as a new root, without the vars."""
        scope = consume(
            carrier,
            "jobs",
            vars=(request_id,),
            baggage=True,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        with scope as span:
            assert request_id.get(MISSING) is MISSING
            assert span.parent is None  # type: ignore[attr-defined]
            assert trace.get_current_span() is span
        assert rejected(metric_reader) == {reason: 1}

    def test_tracestate_problems_keep_the_traceparent(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """An invalid tracestate is dropped and counted; the valid traceparent is kept."""
        carrier = {"traceparent": TRACEPARENT, "tracestate": "BAD KEY=1"}
        seen = in_context(extract(carrier, meter_provider=meter_provider))
        assert seen["span_context"] == REMOTE
        assert rejected(metric_reader) == {"tracestate.invalid_member": 1}

    def test_failing_propagator_is_ignored(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """A propagator that raises on extract leaves the trace out, counted."""
        seen = in_context(
            extract({"b3": "x"}, propagator=Exploding(), meter_provider=meter_provider)
        )
        assert not seen["span_context"].is_valid  # type: ignore[attr-defined]
        assert rejected(metric_reader) == {"propagator.failed": 1}

    def test_json_digit_limit_with_a_raised_limit(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """With a raised size limit, a number of 5,000 digits is still rejected."""
        ctx = extract(
            {"ctxkit-vars": '{"request_id": ' + "1" * 5000 + "}"},
            vars=(request_id,),
            max_vars_size=200_000,
            meter_provider=meter_provider,
        )
        assert request_id not in ctx
        assert rejected(metric_reader) == {"vars.invalid_json": 1}

    def test_nesting_is_bounded_by_the_size_limit(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """The size limit bounds nesting on every version: 2,100 levels do not fit in 4096 bytes;
        the 2,030 that fit are restored where ``json`` parses them (3.13+), and rejected as
        invalid JSON where it raises ``RecursionError`` first (3.11 and 3.12)."""
        too_deep = nested_vars(2100)
        assert len(too_deep) > propagation.MAX_VARS_SIZE
        assert request_id not in extract(
            {"ctxkit-vars": too_deep}, vars=(request_id,), meter_provider=meter_provider
        )
        deepest = nested_vars(2030)
        assert len(deepest) <= propagation.MAX_VARS_SIZE
        ctx = extract({"ctxkit-vars": deepest}, vars=(request_id,), meter_provider=meter_provider)
        if JSON_RAISES_AT[2030]:
            assert request_id not in ctx
            assert rejected(metric_reader) == {"vars.too_large": 1, "vars.invalid_json": 1}
        else:
            assert nesting_depth(ctx[request_id]) == 2030
            assert rejected(metric_reader) == {"vars.too_large": 1}

    def test_deep_nesting_with_a_raised_limit(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """With a raised size limit, 50,000 levels are rejected as invalid JSON where ``json``
        raises ``RecursionError`` (up to 3.13), and restored from 3.14, whose ``json`` nests as
        deep as the C stack allows: then only the size limit bounds the nesting."""
        ctx = extract(
            {"ctxkit-vars": nested_vars(50_000)},
            vars=(request_id,),
            max_vars_size=200_000,
            meter_provider=meter_provider,
        )
        if JSON_RAISES_AT[50_000]:
            assert request_id not in ctx
            assert rejected(metric_reader) == {"vars.invalid_json": 1}
        else:
            assert nesting_depth(ctx[request_id]) == 50_000
            assert rejected(metric_reader) == {}

    def test_unknown_names_are_not_an_error(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """Names the consumer does not allow are ignored silently (producers may carry more)."""
        extract({"ctxkit-vars": '{"user": "u"}'}, meter_provider=meter_provider)
        assert rejected(metric_reader) == {}


# --- consume -------------------------------------------------------------------------------------


class Unprintable(Exception):
    """An exception whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("this exception has no text")


def carrier_from_request(tracer_provider: TracerProvider) -> tuple[dict[str, Any], trace.Span]:
    """Return the carrier a request would send, and the request's span."""
    ctx = contextvars.Context()

    def produce() -> tuple[dict[str, Any], trace.Span]:
        with tracer_provider.get_tracer("t").start_as_current_span("send") as span:
            request_id.set("r-1")
            tenant.set({"id": 1})
            return inject({}, vars=(request_id, tenant)), span

    return ctx.run(produce)


class TestConsume:
    @pytest.mark.parametrize("propagation_mode", ["child", "link", "none"])
    def test_with_restores_and_spans(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        propagation_mode: Propagation,
    ) -> None:
        """The block sees the vars and runs in process <name>, related to the producer's span
        as propagation says; everything is put back afterwards."""
        carrier, send = carrier_from_request(tracer_provider)
        before = otel_context.get_current()
        request_id.set("worker's own")
        scope = consume(
            carrier,
            "emails",
            vars=(request_id, tenant),
            propagation=propagation_mode,
            system="taskiq",
            tracer_provider=tracer_provider,
        )
        with scope as span:
            assert request_id.get() == "r-1"
            assert tenant.get() == {"id": 1}
            assert trace.get_current_span() is span
            inner_trace_id = ctxkit.current_trace_id()
        assert request_id.get() == "worker's own"
        assert tenant.get(MISSING) is MISSING
        assert otel_context.get_current() is before
        [process] = [s for s in span_exporter.get_finished_spans() if s.name == "process emails"]
        assert process.kind is SpanKind.CONSUMER
        attributes = dict(process.attributes or {})
        linked = attributes.pop("ctxkit.linked_trace_id", None)
        send_trace = f"{send.get_span_context().trace_id:032x}"
        assert linked == (send_trace if propagation_mode == "link" else None)
        assert attributes == {
            "messaging.operation.name": "process",
            "ctxkit.attempt": 1,
            "messaging.operation.type": "process",
            "messaging.destination.name": "emails",
            "messaging.system": "taskiq",
            "ctxkit.async": True,
        }
        send_context = send.get_span_context()
        assert process.context is not None
        assert inner_trace_id == f"{process.context.trace_id:032x}"
        if propagation_mode == "child":
            assert process.parent is not None
            assert process.parent.span_id == send_context.span_id
            assert process.context.trace_id == send_context.trace_id
            assert list(process.links) == []
        else:
            assert process.parent is None
            assert process.context.trace_id != send_context.trace_id
            links = [(link.context.trace_id, link.context.span_id) for link in process.links]
            expected = [(send_context.trace_id, send_context.span_id)]
            assert links == (expected if propagation_mode == "link" else [])

    @pytest.mark.anyio
    async def test_async_with_on_both_backends(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """async with works the same way on asyncio and trio."""
        carrier, send = carrier_from_request(tracer_provider)
        async with consume(
            carrier, "emails", vars=(request_id,), tracer_provider=tracer_provider
        ) as span:
            assert request_id.get() == "r-1"
            assert trace.get_current_span() is span
        assert request_id.get(MISSING) is MISSING
        [process] = [s for s in span_exporter.get_finished_spans() if s.name == "process emails"]
        assert process.parent is not None
        assert process.parent.span_id == send.get_span_context().span_id

    @pytest.mark.anyio
    async def test_exception_marks_span_and_propagates(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """An exception in the block sets ERROR, records it with error.type, propagates, and
        the context is still restored."""
        carrier, _ = carrier_from_request(tracer_provider)
        with pytest.raises(KeyError):
            async with consume(
                carrier, "emails", vars=(request_id,), tracer_provider=tracer_provider
            ):
                raise KeyError("missing")
        assert request_id.get(MISSING) is MISSING
        assert not trace.get_current_span().get_span_context().is_valid
        [process] = [s for s in span_exporter.get_finished_spans() if s.name == "process emails"]
        assert process.status.status_code is StatusCode.ERROR
        assert (process.attributes or {})["error.type"] == "KeyError"
        assert [event.name for event in process.events] == ["exception"]

    def test_sync_exception(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """The same holds for a plain with."""
        with (
            pytest.raises(ValueError, match="bad"),
            consume({}, "emails", tracer_provider=tracer_provider),
        ):
            raise ValueError("bad")
        [process] = span_exporter.get_finished_spans()
        assert process.status.status_code is StatusCode.ERROR
        assert (process.attributes or {})["error.type"] == "ValueError"

    @pytest.mark.parametrize("propagation_mode", ["child", "link"])
    def test_exception_without_text(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        propagation_mode: Propagation,
    ) -> None:
        """An exception whose __str__ raises still propagates as itself, the span is exported
        as ERROR with a stand-in text and the exception event, and the vars, the span and the
        inherited fake trace id are all put back."""
        carrier, _ = carrier_from_request(tracer_provider)
        fake = "ab" * 16
        before = otel_context.get_current()
        seen: list[object] = []

        def job() -> None:
            with consume(
                {**carrier, "traceparent": "garbage", "ctxkit-trace-id": fake},
                "emails",
                vars=(request_id,),
                propagation=propagation_mode,
                tracer_provider=tracer_provider,
            ):
                seen.append(request_id.get())
                raise Unprintable

        with pytest.raises(Unprintable):
            job()
        assert seen == ["r-1"]
        assert request_id.get(MISSING) is MISSING
        assert otel_context.get_current() is before
        assert ctxkit.current_trace_id() is None
        [process] = [s for s in span_exporter.get_finished_spans() if s.name == "process emails"]
        assert process.status.status_code is StatusCode.ERROR
        assert process.status.description == "Unprintable: <str() of the Unprintable raised>"
        assert (process.attributes or {})["error.type"] == "Unprintable"
        [event] = process.events
        assert event.name == "exception"
        attributes = dict(event.attributes or {})
        assert attributes["exception.type"] == f"{__name__}.Unprintable"
        assert attributes["exception.message"] == "<str() of the Unprintable raised>"
        assert "raise Unprintable" in str(attributes["exception.stacktrace"])

    @pytest.mark.parametrize("propagation_mode", ["child", "link", "none"])
    def test_no_op_tracing(self, propagation_mode: Propagation) -> None:
        """With no-op tracing a child block keeps the producer's trace id; otherwise, and
        without a remote trace, the block gets a fake id (the carrier's for a child)."""
        noop = trace.NoOpTracerProvider()
        fake = "fedcba9876543210fedcba9876543210"
        with consume(
            {"traceparent": TRACEPARENT}, "jobs", propagation=propagation_mode, tracer_provider=noop
        ):
            inside = ctxkit.current_trace_id()
        if propagation_mode == "child":
            assert inside == TRACE_HEX
        else:
            assert inside not in (TRACE_HEX, None)
        with consume(
            {"ctxkit-trace-id": fake}, "jobs", propagation=propagation_mode, tracer_provider=noop
        ):
            inside = ctxkit.current_trace_id()
            carried = inject(Carrier())
        assert (inside == fake) is (propagation_mode == "child")
        assert carried == {"ctxkit-trace-id": inside}
        assert ctxkit.current_trace_id() is None

    def test_baggage_replaces_the_current_one_for_the_block(
        self, tracer_provider: TracerProvider
    ) -> None:
        """With baggage=True the block sees the carrier's baggage only; without, its own."""
        with attached(baggage.set_baggage("local", "1")):
            with consume({"baggage": "remote=2"}, "jobs", baggage=True):
                assert dict(baggage.get_all()) == {"remote": "2"}
            with consume({"baggage": "remote=2"}, "jobs"):
                assert dict(baggage.get_all()) == {"local": "1"}
            assert dict(baggage.get_all()) == {"local": "1"}

    def test_attributes_and_no_system(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """messaging.system is set only when given; attributes= are added at the start."""
        with consume(
            {}, "q", tracer_provider=tracer_provider, attributes={"messaging.message.id": "m1"}
        ):
            pass
        [process] = span_exporter.get_finished_spans()
        assert dict(process.attributes or {}) == {
            "messaging.operation.name": "process",
            "ctxkit.attempt": 1,
            "messaging.operation.type": "process",
            "messaging.destination.name": "q",
            "ctxkit.async": True,
            "messaging.message.id": "m1",
        }

    def test_nested_scopes_restore_in_order(self, tracer_provider: TracerProvider) -> None:
        """Nested consume blocks each put back what they set."""
        with consume({"ctxkit-vars": '{"request_id":"outer"}'}, "a", vars=(request_id,)):
            with consume({"ctxkit-vars": '{"request_id":"inner"}'}, "b", vars=(request_id,)):
                assert request_id.get() == "inner"
            assert request_id.get() == "outer"
        assert request_id.get(MISSING) is MISSING

    def test_single_use(self) -> None:
        """A scope can be entered once."""
        scope = consume({}, "jobs")
        with scope:
            pass
        with pytest.raises(RuntimeError, match="only once"), scope:
            pass

    def test_caller_errors_raise_eagerly(self) -> None:
        """Bad arguments raise at the call, before anything is read."""
        with pytest.raises(ValueError, match="propagation"):
            consume({}, "jobs", propagation="sideways")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="str"):
            consume({}, 42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="system"):
            consume({}, "jobs", system=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ContextVar"):
            consume({}, "jobs", vars=(1,))  # type: ignore[arg-type]


# --- across a real process boundary --------------------------------------------------------------


CHILD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from contextvars import ContextVar
    import ctxkit
    from ctxkit.propagation import consume

    request_id = ContextVar("request_id")
    carrier = json.loads(sys.stdin.read())
    with consume(carrier, "jobs", vars=(request_id,)):
        seen = {"request_id": request_id.get(None), "trace_id": ctxkit.current_trace_id()}
    print(json.dumps(seen))
    """
)


def test_round_trip_across_a_process_boundary(tracer_provider: TracerProvider) -> None:
    """A carrier serialised to JSON and read by another Python process restores the var and
    the trace id there (no SDK in the child: a no-op child keeps the producer's trace)."""
    carrier, send = carrier_from_request(tracer_provider)
    completed = subprocess.run(
        [sys.executable, "-c", CHILD_SCRIPT],
        input=json.dumps(carrier),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    seen = json.loads(completed.stdout)
    assert seen == {
        "request_id": "r-1",
        "trace_id": f"{send.get_span_context().trace_id:032x}",
    }


# --- properties ----------------------------------------------------------------------------------


# The properties' own vars (hypothesis runs many examples in one test, outside _fresh_vars).
P_USER: ContextVar[str] = ContextVar("user")
ALLOWED: tuple[ContextVar[Any], ...] = (ContextVar("request_id"), ContextVar("tenant"))
NOT_ALLOWED = (P_USER,)
NAMES = ["request_id", "tenant", "user", "other", ""]
KEYS = ["traceparent", "tracestate", "ctxkit-vars", "ctxkit-trace-id", "baggage"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


class Hostile(str):
    """A str subclass from in-process code whose every method the parsers might call raises."""

    __slots__ = ()

    def _boom(self, *args: object, **kwargs: object) -> Any:
        raise RuntimeError("hostile str")

    strip = lstrip = rstrip = lower = upper = split = partition = encode = _boom
    isascii = startswith = endswith = find = replace = join = _boom
    __len__ = __iter__ = __getitem__ = __contains__ = _boom
    __eq__ = __ne__ = __lt__ = __add__ = __radd__ = __mod__ = __str__ = __format__ = _boom

    def __hash__(self) -> int:
        return str.__hash__(self)


def mostly(likely: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Draw from ``likely`` about three times in four, else from ``other``."""
    return st.integers(0, 3).flatmap(lambda n: likely if n else other)


hexes = st.text("0123456789abcdefABCDEF", min_size=0, max_size=34)
valid_traceparents = st.builds(
    lambda t, s, f: f"00-{t:032x}-{s:016x}-{f:02x}",
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 255),
)
traceparents = valid_traceparents | st.builds(
    lambda v, t, s, f, rest: f"{v}-{t}-{s}-{f}{rest}",
    st.sampled_from(["00", "01", "ff", "0", "zz"]),
    hexes,
    hexes,
    st.sampled_from(["00", "01", "03", "x"]),
    st.sampled_from(["", "-", "-extra"]),
)
vars_json = st.dictionaries(
    mostly(st.sampled_from(NAMES), st.text(max_size=6)), json_values, max_size=6
).map(json.dumps)
strings = (
    st.text(max_size=60)
    | traceparents
    | vars_json
    | vars_json.map(lambda text: text[: len(text) // 2])
    | hexes
    | st.text("abc=%;, \t", max_size=30)
)
values = (
    strings
    | strings.map(Hostile)
    | json_values
    | st.binary(max_size=20)
    | st.lists(strings, max_size=3)
)
# Mostly mappings with ctxkit's keys holding near-valid values, plus any other shape at all.
ctxkit_carriers = st.fixed_dictionaries(
    {},
    optional={
        "traceparent": mostly(traceparents, values),
        "tracestate": st.text("abc=,@ \t", max_size=30) | values,
        "ctxkit-vars": mostly(vars_json, values),
        "ctxkit-trace-id": hexes | values,
        "baggage": st.text("abc=%;,E2 \t", max_size=30) | values,
    },
)
carriers = mostly(
    ctxkit_carriers,
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), values, max_size=6)
    | st.none()
    | st.integers()
    | st.text(max_size=20)
    | st.lists(st.tuples(st.sampled_from(KEYS), strings), max_size=3),
)
PROPERTY_PROVIDER = TracerProvider()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(carrier=carriers, with_baggage=st.booleans())
def test_extract_never_raises_and_restores_only_allowed_vars(
    carrier: object, with_baggage: bool
) -> None:
    """Whatever the carrier, extract returns a Context in which no disallowed var is set and
    every allowed one is either unset or holds the carrier's JSON value."""
    ctx = extract(carrier, vars=ALLOWED, baggage=with_baggage)
    for var in NOT_ALLOWED:
        assert var not in ctx
    for var in ALLOWED:
        if var in ctx:
            assert isinstance(carrier, dict)
            assert ctx[var] == json.loads(str.__str__(carrier["ctxkit-vars"]))[var.name]
    assert isinstance(ctx.run(ctxkit.current_trace_id), str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    carrier=carriers,
    with_baggage=st.booleans(),
    mode=st.sampled_from(["child", "link", "none"]),
)
def test_consume_never_raises_and_restores_only_allowed_vars(
    carrier: object, with_baggage: bool, mode: Propagation
) -> None:
    """Whatever the carrier, consume's block runs with no disallowed var changed, and
    everything is back as it was afterwards."""

    def run() -> None:
        P_USER.set("worker's")
        before = otel_context.get_current()
        with consume(
            carrier,
            "jobs",
            vars=ALLOWED,
            propagation=mode,
            baggage=with_baggage,
            tracer_provider=PROPERTY_PROVIDER,
        ) as span:
            assert P_USER.get() == "worker's"
            assert trace.get_current_span() is span
            assert isinstance(ctxkit.current_trace_id(), str)
        assert P_USER.get() == "worker's"
        for var in ALLOWED:
            assert var.get(MISSING) is MISSING
        assert otel_context.get_current() is before

    contextvars.Context().run(run)


# --- retries, attempts and the producer's fake trace id -----------------------------------------


def span_hex(span_context: SpanContext) -> tuple[int, int]:
    return span_context.trace_id, span_context.span_id


class TestRetries:
    def test_inject_marks_the_next_attempt_of_the_consumed_job(
        self, tracer_provider: TracerProvider
    ) -> None:
        """Inside consume(message_id=m), inject(message_id=m) writes the first producer span
        and the current attempt's span; another id, or no id, writes neither."""
        with consume(
            {"traceparent": TRACEPARENT}, "q", message_id="m", tracer_provider=tracer_provider
        ) as span:
            retry: Carrier = inject({}, message_id="m")
            other: Carrier = inject({}, message_id="other")
            plain: Carrier = inject({})
            context = contextvars.copy_context()
        own = span.get_span_context()
        assert retry["ctxkit-producer"] == TRACEPARENT
        assert retry["ctxkit-previous"] == (
            f"00-{own.trace_id:032x}-{own.span_id:016x}-{int(own.trace_flags):02x}"
        )
        for carrier in (other, plain):
            assert "ctxkit-producer" not in carrier
            assert "ctxkit-previous" not in carrier
        assert "ctxkit-previous" in inject({}, context=context, message_id="m")
        assert "ctxkit-previous" not in inject({"ctxkit-previous": "stale"}, message_id="m")

    def test_later_attempt_links_to_producer_and_previous(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """Attempt 2 with retries="link" starts a new trace linked to the first producer span
        and the previous attempt, both named in attributes; attempt 3 keeps the producer."""
        with consume(
            {"traceparent": TRACEPARENT}, "q", message_id="m", tracer_provider=tracer_provider
        ):
            carrier: Carrier = inject({}, message_id="m")
        with consume(
            carrier, "q", message_id="m", attempt=2, tracer_provider=tracer_provider
        ) as second_span:
            carrier = inject({}, message_id="m")
        with consume(carrier, "q", message_id="m", attempt=3, tracer_provider=tracer_provider):
            pass
        first, second, third = span_exporter.get_finished_spans()
        assert first.parent is not None
        assert (first.parent.trace_id, first.parent.span_id) == span_hex(REMOTE)
        assert second.context is not None
        assert second.context == second_span.get_span_context()
        for attempt, previous in ((second, first), (third, second)):
            assert attempt.parent is None
            assert previous.context is not None
            assert [span_hex(link.context) for link in attempt.links] == [
                span_hex(REMOTE),
                span_hex(previous.context),
            ]
            attributes = attempt.attributes or {}
            assert attributes["ctxkit.linked_trace_id"] == TRACE_HEX
            assert attributes["ctxkit.previous_trace_id"] == f"{previous.context.trace_id:032x}"
        assert [(s.attributes or {})["ctxkit.attempt"] for s in (first, second, third)] == [1, 2, 3]

    @pytest.mark.parametrize("propagation_mode", ["child", "link", "none"])
    def test_retries_child_and_none(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        propagation_mode: Propagation,
    ) -> None:
        """With retries="child" a later attempt relates to the first producer span (not to the
        retry's sender) as propagation says; propagation="none" never relates."""
        other = f"00-{'f' * 32}-{'e' * 16}-01"
        carrier = {"traceparent": other, "ctxkit-producer": TRACEPARENT}
        with consume(
            carrier,
            "q",
            attempt=2,
            retries="child",
            propagation=propagation_mode,
            tracer_provider=tracer_provider,
        ):
            pass
        [span] = span_exporter.get_finished_spans()
        if propagation_mode == "child":
            assert span.parent is not None
            assert (span.parent.trace_id, span.parent.span_id) == span_hex(REMOTE)
        else:
            assert span.parent is None
        links = [span_hex(link.context) for link in span.links]
        assert links == ([span_hex(REMOTE)] if propagation_mode == "link" else [])

    def test_bad_retry_keys_are_rejected(
        self, meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
    ) -> None:
        """Malformed ctxkit-producer and ctxkit-previous values are ignored and counted."""
        carrier = {"ctxkit-producer": "nope", "ctxkit-previous": 5}
        extract(carrier, meter_provider=meter_provider)
        assert rejected(metric_reader) == {"producer.invalid": 1, "previous.invalid": 1}

    def test_arguments_are_checked(self) -> None:
        """attempt, retries and message_id are validated at once."""
        with pytest.raises(TypeError, match="attempt"):
            consume({}, "q", attempt="2")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="attempt"):
            consume({}, "q", attempt=0)
        with pytest.raises(ValueError, match="retries"):
            consume({}, "q", retries="never")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="message_id"):
            consume({}, "q", message_id=7)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="message_id"):
            inject({}, message_id=7)  # type: ignore[arg-type]


class TestAbandon:
    def test_abandon_ends_the_span_once(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """abandon() ends the span with ERROR (_OTHER without an exception); leaving or
        abandoning again does nothing more."""
        scope = consume({}, "q", tracer_provider=tracer_provider)
        finished = [scope.finished]
        scope.abandon()  # not entered: nothing to end
        context = contextvars.copy_context()
        context.run(scope.__enter__)
        context.run(scope.abandon, reason="skipped")
        finished.append(scope.finished)
        assert finished == [False, True]
        context.run(scope.abandon, ValueError("again"))
        context.run(scope.__exit__, None, None, None)
        [span] = span_exporter.get_finished_spans()
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "skipped"
        assert (span.attributes or {})["error.type"] == "_OTHER"

    def test_abandon_with_an_exception(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """abandon(exc) records the exception and its type."""
        scope = consume({}, "q", tracer_provider=tracer_provider)
        contextvars.copy_context().run(scope.__enter__)
        scope.abandon(KeyError("k"))
        [span] = span_exporter.get_finished_spans()
        assert (span.attributes or {})["error.type"] == "KeyError"


class TestInheritedFakeTraceId:
    def test_logs_keep_the_producers_fake_id(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """A producer without a valid span sent its fake trace id: in a child block with a
        real span, current_trace_id() is that id, and the span records it; not after."""
        fake = "ab" * 16
        with consume({"ctxkit-trace-id": fake}, "q", tracer_provider=tracer_provider) as span:
            assert span.get_span_context().is_valid
            assert ctxkit.current_trace_id() == fake
        assert ctxkit.current_trace_id() is None
        [process] = span_exporter.get_finished_spans()
        assert (process.attributes or {})["ctxkit.fake_trace_id"] == fake
        assert process.context is not None
        assert f"{process.context.trace_id:032x}" != fake

    def test_link_mode_does_not_inherit(self, tracer_provider: TracerProvider) -> None:
        """A link block is a new trace on purpose: its logs carry its own span's id."""
        with consume(
            {"ctxkit-trace-id": "ab" * 16}, "q", propagation="link", tracer_provider=tracer_provider
        ) as span:
            assert ctxkit.current_trace_id() == f"{span.get_span_context().trace_id:032x}"


class TestStrSubclasses:
    def test_hostile_values_are_read_as_plain_strings(self) -> None:
        """Carrier values that are str subclasses overriding every method never make extract
        raise: they are read as the plain strings they hold."""
        carrier = {
            "traceparent": Hostile(TRACEPARENT),
            "tracestate": Hostile("a=b"),
            "ctxkit-vars": Hostile('{"request_id":"r-h"}'),
            "ctxkit-trace-id": Hostile("cd" * 16),
            "baggage": Hostile("k=v"),
            "ctxkit-producer": Hostile(TRACEPARENT),
            "ctxkit-previous": Hostile("garbage"),
        }
        ctx = extract(carrier, vars=(request_id,), baggage=True)
        assert ctx[request_id] == "r-h"
        assert ctx.run(ctxkit.current_trace_id) == TRACE_HEX
        assert ctx.run(baggage.get_all) == {"k": "v"}

    def test_hostile_keys_and_list_values(self) -> None:
        """Hostile keys (matched case-insensitively) and hostile list items do not raise."""
        extract({Hostile("TraceParent"): TRACEPARENT})
        ctx = extract({"traceparent": [Hostile(TRACEPARENT)], "tracestate": (Hostile("a=b"),)})
        assert ctx.run(ctxkit.current_trace_id) == TRACE_HEX


class TestStartSpanLinks:
    def test_extra_links_in_child_and_link_modes(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """start_span adds valid extra links in every mode, each span context once, after
        the link of "link" mode; invalid ones are left out."""
        from ctxkit._trace import get_tracer, start_span

        tracer = get_tracer(tracer_provider)
        source = trace.set_span_in_context(NonRecordingSpan(REMOTE))
        other = SpanContext(trace_id=5, span_id=6, is_remote=True)
        start_span(tracer, "c", source, "child", links=(other, trace.INVALID_SPAN_CONTEXT)).end()
        start_span(tracer, "l", source, "link", links=(REMOTE, other)).end()
        child, linked = span_exporter.get_finished_spans()
        assert child.parent is not None
        assert [span_hex(link.context) for link in child.links] == [(5, 6)]
        assert [span_hex(link.context) for link in linked.links] == [span_hex(REMOTE), (5, 6)]
