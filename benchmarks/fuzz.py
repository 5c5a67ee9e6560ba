"""Fuzz: hostile carriers never make ``extract``, ``consume`` or the taskiq middleware raise.

``python -m benchmarks.fuzz`` (``make fuzz``; ``--carriers`` for another size). It generates
carriers from a seed -- mostly mappings whose ``traceparent``, ``tracestate``, ``ctxkit-vars``,
``ctxkit-trace-id`` and ``baggage`` entries are valid, mutated, oversized, of the wrong type
or repeated, plus non-mappings, mappings whose ``get`` raises, bytes values, case variants of
the keys and ``str`` subclasses -- and feeds each one to ``ctxkit.propagation.extract``, to
``ctxkit.propagation.consume`` (entered and left, half of the blocks raising) and, when it is a
dict of labels, to ``ctxkit.contrib.taskiq.CtxkitMiddleware`` (``pre_execute`` then
``post_execute``). It checks, and exits non-zero with the first carrier that breaks one:

- nothing raises (a block's own exception comes out of ``consume`` unchanged);
- no ContextVar but the two allowed ones is restored (a third var, ``secret``, is named in
  most carriers and never selected), and leaving ``consume`` or the middleware puts the
  worker's own values and OpenTelemetry context back;
- nothing over the limits comes through: restored vars only from a ``ctxkit-vars`` value of at
  most ``MAX_VARS_SIZE`` bytes and ``MAX_VARS`` names, at most ``MAX_BAGGAGE_MEMBERS`` baggage
  members from at most ``MAX_BAGGAGE_SIZE`` bytes, at most 32 ``tracestate`` members, a remote
  span context only when both ids are non-zero, otherwise a valid fake trace id;
- a well-formed carrier is restored (trace id and vars), so the run is not vacuous;
- every consumer span started is ended, and each rejection reason is logged at most once.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import random
import string
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from taskiq import TaskiqMessage, TaskiqResult

import ctxkit
from ctxkit.contrib.taskiq import CtxkitMiddleware
from ctxkit.propagation import (
    MAX_BAGGAGE_MEMBERS,
    MAX_BAGGAGE_SIZE,
    MAX_VARS,
    MAX_VARS_SIZE,
    consume,
    extract,
)

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import ReadableSpan, Span

user: contextvars.ContextVar[object] = contextvars.ContextVar("user")
tenant: contextvars.ContextVar[object] = contextvars.ContextVar("tenant")
#: Named in the carriers, never selected: restoring it would be a breach.
secret: contextvars.ContextVar[object] = contextvars.ContextVar("secret")
ALLOWED: Final = (user, tenant)
NAMES: Final = ("user", "tenant", "secret", "__class__", "", "USER", "user ", "ü")
OUTER: Final = "the worker's own value"
MAX_TRACESTATE_MEMBERS: Final = 32
JUNK: Final = string.printable + "\x00\u00e9\u2028\U0001f600\udc80"


class FuzzFailure(AssertionError):
    """An invariant does not hold for one carrier."""


class BlockError(Exception):
    """Raised inside half of the ``consume`` blocks; must come out unchanged."""


class CountingProcessor(SpanProcessor):
    def __init__(self) -> None:
        self.started = 0
        self.ended = 0

    def on_start(self, span: Span, parent_context: OtelContext | None = None) -> None:
        self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        self.ended += 1


class CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: Counter[tuple[int, str]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages[record.levelno, record.getMessage()] += 1


class Label(str):
    """A plain ``str`` subclass, as in-process code may put into labels (enums, wrappers)."""

    __slots__ = ()


class RaisingMapping(Mapping[str, object]):
    """A mapping that fails when read: at ``get``, at ``[]``, or when iterated."""

    def __init__(self, data: dict[str, object], fail: str) -> None:
        self.data = data
        self._fail = fail

    def __getitem__(self, key: str) -> object:
        if self._fail == "getitem":
            raise KeyError(key) if key in self.data else RuntimeError("broken mapping")
        return self.data[key]

    def get(self, key: str, default: object = None) -> object:
        if self._fail == "get":
            raise RuntimeError("broken mapping")
        return self.data.get(key, default)

    def __iter__(self) -> Iterator[str]:
        if self._fail == "iter":
            raise RuntimeError("broken mapping")
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


# --- generators ----------------------------------------------------------------------------------


class Generator:
    """Seeded hostile values; ``well_formed`` marks carriers that must be restored."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.pool = ["".join(self.r.choices(JUNK, k=100)) for _ in range(4096)]
        # Long lists are costly to make: draw them from pools (entry() still mutates them).
        self.tracestates = [self._tracestate() for _ in range(1024)]
        self.baggages = [self._baggage() for _ in range(1024)]

    def tracestate(self) -> str:
        return self.r.choice(self.tracestates)

    def baggage(self) -> str:
        return self.r.choice(self.baggages)

    def hexs(self, n: int) -> str:
        return f"{self.r.getrandbits(4 * n):0{n}x}" if n else ""

    def junk(self, max_len: int = 40) -> str:
        """Return random printable, control, non-ASCII and lone-surrogate characters."""
        return self.pool[self.r.randrange(len(self.pool))][: self.r.randint(0, max_len)]

    def mutate(self, text: str) -> str:
        r = self.r
        choice = r.randrange(9)
        if choice == 0 or not text:
            return text + self.junk(5)
        i = r.randrange(len(text))
        if choice == 1:
            return text[:i] + text[i + 1 :]
        if choice == 2:
            return text[:i] + r.choice(string.printable + "\x00\u00e9") + text[i + 1 :]
        if choice == 3:
            return text.upper()
        if choice == 4:
            return text * r.randint(2, 300)
        if choice == 5:
            return " " + text + "\t"
        if choice == 6:
            return text[:i]
        if choice == 7:
            return text.replace("-", r.choice(["", "--", "_", " "]))
        return text + "," + text

    def traceparent(self) -> str:
        r = self.r
        version = r.choice(["00", "00", "00", "01", "ff", "cc"])
        trace_id = r.choice([self.hexs(32), "0" * 32])
        span_id = r.choice([self.hexs(16), self.hexs(16), "0" * 16])
        flags = r.choice(["00", "01", "03", "ff"])
        extra = "-" + self.hexs(r.randint(0, 8)) if version != "00" and r.random() < 0.5 else ""
        return f"{version}-{trace_id}-{span_id}-{flags}{extra}"

    def _tracestate(self) -> str:
        r = self.r
        members = []
        for _ in range(r.choice([0, 1, 3, 31, 32, 33, 100])):
            key = r.choice(
                [
                    "v" + self.hexs(r.randint(0, 6)),
                    "t@vendor",
                    "BAD",
                    "a" * 257,
                    self.junk(6),
                    "dup",
                ]
            )
            members.append(f"{key}={r.choice(['x', self.junk(10), '', 'a' * 300])}")
        return ",".join(members)

    def json_value(self, depth: int = 0) -> object:
        r = self.r
        kind = r.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return r.randint(-(2**70), 2**70)
        if kind == 1:
            return self.junk(30)
        if kind == 2:
            return r.choice([None, True, False, 1.5, -0.0])
        if kind == 3:
            return r.random() * 10 ** r.randint(-300, 300)
        if kind == 4:
            return "x" * r.choice([10, 1000, 5000])
        if kind == 5:
            return [self.json_value(depth + 1) for _ in range(r.randint(0, 5))]
        if kind == 6:
            return {self.junk(5): self.json_value(depth + 1) for _ in range(r.randint(0, 5))}
        return {"nested": [self.json_value(depth + 1)]}

    def vars_text(self) -> str:
        r = self.r
        choice = r.randrange(12)
        if choice == 0:
            return "[" * r.choice([100, 10_000, 100_000]) + "]" * r.randint(0, 10)
        if choice == 1:
            return '{"user": ' + "9" * r.choice([100, 4300, 5000]) + "}"
        if choice == 2:
            return '{"user": NaN, "tenant": Infinity}'
        if choice == 3:
            return '{"user": 1, "user": 2}'
        if choice == 4:
            return json.dumps({f"v{i}": i for i in range(r.choice([64, 65, 200]))})
        if choice == 5:
            return json.dumps(r.choice([[], "user", 1, None, [{"user": 1}]]))
        if choice == 6:
            return self.mutate(json.dumps({"user": self.json_value()}))
        if choice == 7:
            return json.dumps({"user": "ü" * r.choice([100, 2000, 2100])}, ensure_ascii=False)
        if choice == 8:
            return '{"user": "\\ud800"}'
        names = r.sample(NAMES, r.randint(1, len(NAMES)))
        return json.dumps(
            {name: self.json_value() for name in names}, ensure_ascii=r.random() < 0.5
        )

    def _baggage(self) -> str:
        r = self.r
        members = []
        for _ in range(r.choice([0, 1, 5, 64, 65, 200])):
            key = r.choice(["k" + self.hexs(3), "bad key", "", self.junk(4)])
            value = r.choice(["v", "%ZZ", "%FF%FE", "a" * r.choice([10, 200, 9000]), self.junk(8)])
            props = r.choice(["", ";p", ";p=1", ";;"])
            members.append(f"{key}={value}{props}")
        return ",".join(members)

    def entry(self, well_formed: str) -> object:
        """Return a hostile variant of one carrier value."""
        r = self.r
        choice = r.randrange(20)
        if choice < 8:
            return well_formed
        if choice < 12:
            return self.mutate(well_formed)
        if choice == 12:
            return well_formed.encode("utf-8", "surrogateescape")
        if choice == 13:
            return Label(well_formed)
        if choice == 14:
            return [well_formed, self.mutate(well_formed)]
        if choice == 15:
            return r.choice([None, 0, 1.5, True, {}, [], object(), b"\xff\xfe"])
        if choice == 16:
            return "x" * r.choice([513, 8193, 100_000])
        if choice == 17:
            return self.junk(100)
        if choice == 18:
            return well_formed + "\x00"
        return ""

    def carrier(self) -> tuple[object, dict[str, object] | None]:
        """Return a carrier and, when it is well formed, what must be restored from it."""
        r = self.r
        if r.random() < 0.03:
            return r.choice([None, 42, "traceparent", b"x", ["traceparent"], object()]), None
        if r.random() < 0.12:  # a well-formed carrier: the positive control
            trace_id, span_id = self.hexs(31) + "1", self.hexs(15) + "1"
            values = {"user": self.junk(20), "tenant": r.randint(0, 10**9)}
            carrier: dict[str, object] = {
                "traceparent": f"00-{trace_id}-{span_id}-01",
                "tracestate": "v=1,t@vendor=x",
                "ctxkit-vars": json.dumps({**values, "secret": "stolen"}),
                "baggage": "k=v,tenant=acme%20corp",
            }
            return carrier, {"trace_id": trace_id, **values}
        carrier = {}
        if r.random() < 0.8:
            carrier["traceparent"] = self.entry(self.traceparent())
        if r.random() < 0.5:
            carrier["tracestate"] = self.entry(self.tracestate())
        if r.random() < 0.3:
            carrier["ctxkit-trace-id"] = self.entry(r.choice([self.hexs(32), "0" * 32]))
        if r.random() < 0.8:
            carrier["ctxkit-vars"] = self.entry(self.vars_text())
        if r.random() < 0.5:
            carrier["baggage"] = self.entry(self.baggage())
        if r.random() < 0.1:
            for key in list(carrier):
                carrier[r.choice([key.upper(), key.title(), key])] = carrier.pop(key)
        if r.random() < 0.05:
            carrier[self.junk(5)] = self.junk(5)
        if r.random() < 0.04:
            return RaisingMapping(carrier, r.choice(["get", "getitem", "iter"])), None
        return carrier, None


# --- checks ---------------------------------------------------------------------------------


def fail(message: str, carrier: object) -> FuzzFailure:
    return FuzzFailure(f"{message}; carrier: {carrier!r:.600}")


def vars_value(carrier: object) -> object:
    if isinstance(carrier, RaisingMapping):
        carrier = carrier.data
    if isinstance(carrier, dict):
        return carrier.get("ctxkit-vars")
    return None


def check_view(
    view: dict[str, object], carrier: object, expected: dict[str, object] | None
) -> None:
    """Check what one restored context shows (``view`` from ``observe``)."""
    restored = view["restored"]
    assert isinstance(restored, dict)
    if view["secret"] is not None:
        raise fail("the unselected var 'secret' was restored", carrier)
    if restored:
        raw = vars_value(carrier)
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        if not isinstance(raw, str) or len(raw.encode("utf-8", "surrogatepass")) > MAX_VARS_SIZE:
            raise fail(
                f"vars restored from an oversized or non-string value: {restored!r}", carrier
            )
        if len(json.loads(raw)) > MAX_VARS:
            raise fail("vars restored from an object with too many names", carrier)
    members = view["baggage"]
    assert isinstance(members, dict)
    if len(members) > MAX_BAGGAGE_MEMBERS:
        raise fail(f"{len(members)} baggage members restored", carrier)
    if len(",".join(f"{k}={v}" for k, v in members.items()).encode("utf-8", "replace")) > (
        MAX_BAGGAGE_SIZE
    ):
        raise fail("baggage over MAX_BAGGAGE_SIZE restored", carrier)
    span_context = view["span_context"]
    assert isinstance(span_context, trace.SpanContext)
    if span_context.is_valid:
        if span_context.trace_id == 0 or span_context.span_id == 0:
            raise fail("a remote span context with a zero id", carrier)
        if len(span_context.trace_state) > MAX_TRACESTATE_MEMBERS:
            raise fail("more than 32 tracestate members restored", carrier)
    trace_id = view["trace_id"]
    if not (isinstance(trace_id, str) and len(trace_id) == 32 and trace_id != "0" * 32):
        raise fail(f"no valid trace id in the restored context: {trace_id!r}", carrier)
    if expected is not None:
        if expected["trace_id"] is not None and trace_id != expected["trace_id"]:
            raise fail("a well-formed carrier's trace was not restored", carrier)
        if restored != {"user": expected["user"], "tenant": expected["tenant"]}:
            raise fail(f"a well-formed carrier's vars were not restored: {restored!r}", carrier)


def observe() -> dict[str, object]:
    """What the current context shows: restored vars, baggage, span context, trace id."""
    return {
        "restored": {var.name: var.get() for var in ALLOWED if var.get(OUTER) is not OUTER},
        "secret": secret.get(None),
        "baggage": dict(otel_baggage.get_all()),
        "span_context": trace.get_current_span().get_span_context(),
        "trace_id": ctxkit.current_trace_id(),
    }


def observe_in(context: contextvars.Context) -> dict[str, object]:
    view = context.run(observe)
    if any(var not in BASELINE and var not in ALLOWED for var in context):
        raise FuzzFailure(f"extract() set an unexpected var: {list(context)!r}")
    return view


BASELINE: frozenset[contextvars.ContextVar[Any]] = frozenset()


def run_extract(carrier: object, expected: dict[str, object] | None, stats: Counter[str]) -> None:
    try:
        context = extract(carrier, vars=ALLOWED, baggage=True)
    except Exception as exc:
        raise fail(f"extract() raised {exc!r}", carrier) from exc
    view = observe_in(context)
    check_view(view, carrier, expected)
    stats["extract"] += 1
    stats["extract.vars_restored"] += bool(view["restored"])
    span_context = view["span_context"]
    assert isinstance(span_context, trace.SpanContext)
    stats["extract.trace_restored"] += span_context.is_valid


def run_consume(
    carrier: object,
    expected: dict[str, object] | None,
    raise_inside: bool,
    tracer_provider: TracerProvider,
    stats: Counter[str],
) -> None:
    propagation = random.choice(["child", "link", "none"])
    if expected is not None and propagation != "child":  # a new trace by design
        expected = {**expected, "trace_id": None}

    def body() -> None:
        user.set(OUTER)
        tenant.set(OUTER)
        before = otel_context.get_current()
        try:
            with consume(
                carrier,
                "fuzz",
                vars=ALLOWED,
                baggage=True,
                system="fuzz",
                tracer_provider=tracer_provider,
                propagation=propagation,
            ):
                check_view(observe(), carrier, expected)
                if raise_inside:
                    raise BlockError
        except BlockError:
            if not raise_inside:  # pragma: no cover - cannot happen
                raise
        except FuzzFailure:
            raise
        except Exception as exc:
            raise fail(f"consume() raised {exc!r}", carrier) from exc
        else:
            if raise_inside:
                raise fail("consume() swallowed the block's exception", carrier)
        if user.get() is not OUTER or tenant.get() is not OUTER:
            raise fail("leaving consume() did not restore the worker's vars", carrier)
        if otel_context.get_current() is not before:
            raise fail("leaving consume() did not restore the OpenTelemetry context", carrier)

    contextvars.copy_context().run(body)
    stats["consume"] += 1


def run_taskiq(
    carrier: object,
    expected: dict[str, object] | None,
    middleware: CtxkitMiddleware,
    number: int,
    stats: Counter[str],
) -> None:
    if not isinstance(carrier, dict):
        return
    message = TaskiqMessage(
        task_id=f"fuzz-{number}", task_name="fuzz", labels=carrier, args=[], kwargs={}
    )
    failed = number % 2 == 0
    result: TaskiqResult[None] = TaskiqResult(
        is_err=failed,
        return_value=None,
        execution_time=0.0,
        error=BlockError("task failed") if failed else None,
    )

    def body() -> None:
        user.set(OUTER)
        tenant.set(OUTER)
        before = otel_context.get_current()
        try:
            middleware.pre_execute(message)
            check_view(observe(), message.labels, expected)
            middleware.post_execute(message, result)
        except FuzzFailure:
            raise
        except Exception as exc:
            raise fail(f"the taskiq middleware raised {exc!r}", carrier) from exc
        if user.get() is not OUTER or tenant.get() is not OUTER:
            raise fail("post_execute did not restore the worker's vars", carrier)
        if otel_context.get_current() is not before:
            raise fail("post_execute did not restore the OpenTelemetry context", carrier)

    contextvars.copy_context().run(body)
    stats["taskiq"] += 1


def rejected_by_reason(reader: InMemoryMetricReader) -> Counter[str]:
    counts: Counter[str] = Counter()
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name != "ctxkit.propagation.rejected":
                    continue
                for point in metric.data.data_points:
                    attributes = point.attributes or {}
                    counts[str(attributes.get("ctxkit.reason"))] += int(getattr(point, "value", 0))
    return counts


def main(argv: list[str] | None = None) -> int:
    global BASELINE
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__)
    parser.add_argument("--carriers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=20260101)
    args = parser.parse_args(argv)

    handler = CountingHandler()
    ctxkit_logger = logging.getLogger("ctxkit")
    ctxkit_logger.addHandler(handler)
    ctxkit_logger.propagate = False
    ctxkit_logger.setLevel(logging.DEBUG)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)  # extract() and consume() count on the global one
    processor = CountingProcessor()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(processor)
    middleware = CtxkitMiddleware(vars=ALLOWED, baggage=True, tracer_provider=tracer_provider)
    BASELINE = frozenset(extract({}))
    random.seed(args.seed)

    gen = Generator(args.seed)
    stats: Counter[str] = Counter()
    print(f"fuzz: Python {sys.version.split()[0]}, ctxkit {ctxkit.__version__}, seed {args.seed}")
    started = time.perf_counter()
    try:
        for number in range(args.carriers):
            carrier, expected = gen.carrier()
            stats["well_formed"] += expected is not None
            run_extract(carrier, expected, stats)
            run_consume(carrier, expected, number % 2 == 1, tracer_provider, stats)
            run_taskiq(carrier, expected, middleware, number, stats)
            if processor.started != processor.ended:
                raise fail(
                    f"{processor.started - processor.ended} consumer spans left open", carrier
                )
        warnings = Counter(
            message for (level, message), n in handler.messages.items() if level >= logging.WARNING
        )
        repeated = [message for message, n in warnings.items() if n > 1]
        if repeated:
            raise FuzzFailure(f"logged more than once: {repeated[:3]}")
        errors = [m for (level, m) in handler.messages if level >= logging.ERROR]
        if errors:
            raise FuzzFailure(f"ERROR records: {errors[:3]}")
    except FuzzFailure as exc:
        print(f"fuzz FAILED: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    rejected = rejected_by_reason(reader)
    print(
        f"{args.carriers:,} carriers in {seconds:.1f} s "
        f"({seconds / args.carriers * 1e6:.0f} us per carrier, all three consumers)"
    )
    print(
        f"  extract: {stats['extract']:,} calls, trace restored {stats['extract.trace_restored']:,}"
        f", vars restored {stats['extract.vars_restored']:,}; well-formed controls "
        f"{stats['well_formed']:,} (all restored)"
    )
    print(
        f"  consume: {stats['consume']:,} blocks (half raising); taskiq middleware: "
        f"{stats['taskiq']:,} messages; consumer spans started {processor.started:,}, "
        f"ended {processor.ended:,}"
    )
    print(f"  rejected entries: {sum(rejected.values()):,} by reason:")
    for reason, count in rejected.most_common():
        print(f"    {reason:<28} {count:>9,}")
    print(f"  ctxkit log records: {sum(handler.messages.values())} (each reason once)")
    print("fuzz passed: nothing raised, no disallowed var, nothing over the limits")
    meter_provider.shutdown()
    tracer_provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
