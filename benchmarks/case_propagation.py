"""Case 4: carrying the trace and 4 vars through a carrier (a dict of job metadata).

Every op runs in a context with a valid current span and the 4 vars set, as a handler's
would. "inject + extract" is one round trip through a fresh dict. OpenTelemetry's
``propagate.inject/extract`` (the global propagator: W3C trace context + baggage) carries the
trace only; the hand-written equivalent adds the 4 vars as one JSON object under one key (as
ctxkit's wire format does) and, on extract, builds a fresh Context holding them and the
extracted OpenTelemetry context. ``consume`` enters and leaves ctxkit's consumer context
manager around an empty body, on an SDK TracerProvider with no processor; the hand-written
equivalent extracts with ``propagate.extract``, sets the vars from the JSON key (and resets
them after) and runs the body in a CONSUMER span ``process {name}`` with the same messaging
attributes, made current with ``start_as_current_span``.
"""

from __future__ import annotations

import json
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider

from ._common import VARS, now, request_span, set_vars
from ._harness import CHUNKS, Variant, best_of, measure_sync, skipped

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._harness import CaseResult, Settings

TITLE = "propagation through a carrier: trace + 4 vars (sync)"

OTEL_RT = "otel propagate.inject + extract (trace only)"
HAND_RT = "hand-written inject + extract (trace + 4 vars)"
CTX_RT = "ctxkit inject + extract (trace + 4 vars)"
OTEL_INJECT = "otel propagate.inject"
HAND_INJECT = "hand-written inject"
CTX_INJECT = "ctxkit inject"
OTEL_EXTRACT = "otel propagate.extract"
HAND_EXTRACT = "hand-written extract"
CTX_EXTRACT = "ctxkit extract"
HAND_CONSUME_OTEL = "hand-written extract + CONSUMER span (trace only)"
HAND_CONSUME = "hand-written consume (trace + 4 vars)"
CTX_CONSUME = "ctxkit consume (child)"
CTX_CONSUME_LINK = "ctxkit consume (link)"

_VARS_KEY = "x-vars"
_BY_NAME = {var.name: var for var in VARS}
_QUEUE = "emails"


def _hand_inject(carrier: dict[str, str]) -> dict[str, str]:
    propagate.inject(carrier)
    values = {}
    for var in VARS:
        value = var.get(None)
        if value is not None:
            values[var.name] = value
    carrier[_VARS_KEY] = json.dumps(values)
    return carrier


def _hand_install(values: dict[str, Any], otel: otel_context.Context) -> None:
    for name, value in values.items():
        var = _BY_NAME.get(name)
        if var is not None:
            var.set(value)
    otel_context.attach(otel)


def _hand_extract(carrier: dict[str, str]) -> Context:
    otel = propagate.extract(carrier)
    values = json.loads(carrier.get(_VARS_KEY, "{}"))
    ctx = Context()
    ctx.run(_hand_install, values, otel)
    return ctx


def variants(n: int, n_span: int, prop: Any) -> list[Variant]:
    """Return the variants; ``n`` ops per batch (``n_span`` for the ones starting a span)."""
    provider = TracerProvider()
    tracer = provider.get_tracer("bench")

    def prepare() -> None:
        set_vars()
        otel_context.attach(trace.set_span_in_context(request_span()))

    handler = copy_context()
    handler.run(prepare)
    carrier = handler.run(lambda: prop.inject({}, vars=VARS))
    hand_carrier = handler.run(lambda: _hand_inject({}))
    otel_carrier = {k: v for k, v in hand_carrier.items() if k != _VARS_KEY}
    attributes = {"messaging.operation.type": "process", "messaging.destination.name": _QUEUE}

    def otel_rt() -> None:
        c: dict[str, str] = {}
        propagate.inject(c)
        propagate.extract(c)

    def hand_rt() -> None:
        _hand_extract(_hand_inject({}))

    def ctx_rt() -> None:
        prop.extract(prop.inject({}, vars=VARS), vars=VARS)

    def hand_consume_otel() -> None:
        parent = propagate.extract(otel_carrier)
        with tracer.start_as_current_span(
            f"process {_QUEUE}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
        ):
            pass

    def hand_consume() -> None:
        parent = propagate.extract(hand_carrier)
        values = json.loads(hand_carrier[_VARS_KEY])
        tokens = [(var, var.set(values[var.name])) for var in VARS if var.name in values]
        try:
            with tracer.start_as_current_span(
                f"process {_QUEUE}",
                context=parent,
                kind=trace.SpanKind.CONSUMER,
                attributes=attributes,
            ):
                pass
        finally:
            for var, token in reversed(tokens):
                var.reset(token)

    def consume(propagation: str) -> Callable[[], None]:
        def op() -> None:
            with prop.consume(
                carrier, _QUEUE, vars=VARS, propagation=propagation, tracer_provider=provider
            ):
                pass

        return op

    def timed(name: str, op: Callable[[], object], ops: int, ref: str | None = None) -> Variant:
        def chunk(start: int, stop: int) -> int:
            t0 = now()
            for _ in range(stop - start):
                op()
            return now() - t0

        return Variant(name, lambda: handler.run(best_of, chunk, ops), ops, ref=ref)

    return [
        timed(OTEL_RT, otel_rt, n),
        timed(HAND_RT, hand_rt, n),
        timed(CTX_RT, ctx_rt, n, ref=HAND_RT),
        timed(OTEL_INJECT, lambda: propagate.inject({}), n),
        timed(HAND_INJECT, lambda: _hand_inject({}), n),
        timed(CTX_INJECT, lambda: prop.inject({}, vars=VARS), n, ref=HAND_INJECT),
        timed(OTEL_EXTRACT, lambda: propagate.extract(otel_carrier), n),
        timed(HAND_EXTRACT, lambda: _hand_extract(hand_carrier), n),
        timed(CTX_EXTRACT, lambda: prop.extract(carrier, vars=VARS), n, ref=HAND_EXTRACT),
        timed(HAND_CONSUME_OTEL, hand_consume_otel, n_span),
        timed(HAND_CONSUME, hand_consume, n_span),
        timed(CTX_CONSUME, consume("child"), n_span, ref=HAND_CONSUME),
        timed(CTX_CONSUME_LINK, consume("link"), n_span, ref=HAND_CONSUME),
    ]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 4 (skipped, with a note, while ``ctxkit.propagation`` does not exist)."""
    try:
        import ctxkit.propagation as prop
    except ImportError as exc:
        print(f"Case 4: propagation not available yet ({exc})")
        return [skipped("4", TITLE, f"propagation not available yet ({exc})")]
    n = 2_000 if settings.quick else 10_000
    n_span = 1_000 if settings.quick else 5_000
    rounds = settings.pick_rounds(full=9, quick=3)
    return [
        measure_sync(
            "4",
            f"{TITLE}, {n:,} ops/batch ({n_span:,} for consume)",
            variants(n, n_span, prop),
            baseline=OTEL_RT,
            rounds=rounds,
            notes=[
                "the issue sets no target for this case: ratios only",
                "'vs ref' compares ctxkit with the hand-written equivalent",
                f"each round's figure is the fastest of {CHUNKS} equal sub-batches",
            ],
        )
    ]
