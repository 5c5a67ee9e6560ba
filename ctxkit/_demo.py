"""The showcase behind ``python -m ctxkit demo``: a simulated web app using ctxkit.

It serves three simulated requests on asyncio with OpenTelemetry's SDK, spawns background work
in each of ctxkit's modes, shuts down, and prints what a newcomer needs to see: the log lines
with their trace ids, the span tree of every trace with durations and links, and the runner's
statistics.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections import defaultdict
from typing import TYPE_CHECKING

from opentelemetry import trace

from ._clone import register, unregister
from ._logging import TraceIdFilter
from ._runner import BackgroundRunner
from ._spawn import fire_and_forget, spawn

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["run_demo"]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")
db_session: contextvars.ContextVar[str] = contextvars.ContextVar("db_session")

log = logging.getLogger("demo.app")
#: The app's tracer; ``run_demo`` points it at the demo's own provider (never the global one).
tracer: trace.Tracer = trace.NoOpTracer()


def _rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)))


# -- the background work ------------------------------------------------------------------


async def send_welcome_email(address: str) -> None:
    await asyncio.sleep(0.02)
    with tracer.start_as_current_span("smtp.send"):
        log.info(
            "email sent to %s (request_id=%s, tenant=%s, db_session=%s)",
            address,
            request_id.get("-"),
            tenant.get("-"),
            db_session.get("<not carried>"),
        )


async def rebuild_search_index() -> None:
    await asyncio.sleep(0.05)
    log.info("search index rebuilt in its own trace, linked to the request")


async def write_audit_record(action: str) -> None:
    await asyncio.sleep(0.01)
    log.info("audit: %s (no span of its own, same trace id as the request)", action)


async def charge_card(amount: int) -> None:
    await asyncio.sleep(0.01)
    raise ConnectionError(f"payment gateway refused {amount} EUR")


@fire_and_forget(name="generate_report")
async def generate_report(report: str) -> str:
    log.info("report %s started; the request that asked for it is about to be cancelled", report)
    await asyncio.sleep(0.15)
    log.info("report %s finished although its request was cancelled", report)
    return report


async def refresh_exchange_rates() -> None:
    await asyncio.sleep(0.01)
    log.info("exchange rates refreshed (no trace was active: a fake trace id correlates logs)")


async def warm_cache() -> None:
    log.info("cache warm-up started; it will outlive the shutdown's drain_timeout")
    await asyncio.sleep(60)


# -- the simulated requests -----------------------------------------------------------------


async def handle_signup() -> None:
    """POST /signup: spawns work in each of ctxkit's modes, then returns at once."""
    with tracer.start_as_current_span("POST /signup", kind=trace.SpanKind.SERVER):
        request_id.set("req-1")
        tenant.set("acme")
        db_session.set("<Session #1, closed when the request ends>")
        log.info("handling signup")
        spawn(send_welcome_email, "ada@example.com")  # child span, same trace
        spawn(rebuild_search_index(), propagation="link")  # new trace, linked
        spawn(write_audit_record("signup"), span=False)  # no span, same trace id
        spawn(charge_card(42))  # fails: logged with its trace id, span ERROR
        log.info("signup response sent")


async def handle_report(started: asyncio.Event) -> None:
    """GET /report: fires a report, then the client disconnects and the request is cancelled."""
    with tracer.start_as_current_span("GET /report", kind=trace.SpanKind.SERVER):
        request_id.set("req-2")
        tenant.set("globex")
        generate_report("q3")
        started.set()
        await asyncio.sleep(10)  # cancelled long before this ends


async def cron_tick() -> None:
    """A timer with no trace active: background work gets a fake trace id for its logs."""
    log.info("cron tick (no span active here)")
    spawn(refresh_exchange_rates(), span=False)


async def serve(provider: trace.TracerProvider) -> BackgroundRunner:
    runner = BackgroundRunner(tracer_provider=provider, drain_timeout=0.3)
    async with runner:  # the app's lifespan: opened at startup, drained at shutdown
        await handle_signup()
        started = asyncio.Event()
        request = asyncio.create_task(handle_report(started))
        await started.wait()
        request.cancel()  # the client went away
        await asyncio.gather(request, return_exceptions=True)
        log.info("GET /report was cancelled (client disconnected)")
        await cron_tick()
        spawn(warm_cache())
        await asyncio.sleep(0.2)
        log.info("shutting down: draining background work (drain_timeout=0.3s)")
    return runner


# -- printing -------------------------------------------------------------------------------


def _print_trees(spans: Sequence[ReadableSpan]) -> None:
    by_trace: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        by_trace[span.context.trace_id].append(span)
    traces = sorted(by_trace.values(), key=lambda group: min(s.start_time or 0 for s in group))
    for group in traces:
        print(f"\ntrace {group[0].context.trace_id:032x}")
        ids = {span.context.span_id for span in group}
        children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
        for span in group:
            parent = span.parent.span_id if span.parent else None
            children[parent if parent in ids else None].append(span)
        for root in sorted(children[None], key=lambda s: s.start_time or 0):
            _print_span(root, children, "")


def _print_span(
    span: ReadableSpan, children: dict[int | None, list[ReadableSpan]], indent: str
) -> None:
    duration = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    attributes = span.attributes or {}
    notes = [span.kind.name]
    if "ctxkit.task.outcome" in attributes:
        notes.append("outcome=" + str(attributes["ctxkit.task.outcome"]))
    if not span.status.is_ok:
        notes.append(f"status=ERROR({span.status.description})")
    print(f"  {indent}{span.name}  [{', '.join(notes)}]  span {span.context.span_id:016x}", end="")
    print(f"  {duration:.1f} ms")
    for link in span.links:
        print(
            f"  {indent}   link -> trace {link.context.trace_id:032x} "
            f"span {link.context.span_id:016x}"
        )
    for child in sorted(children[span.context.span_id], key=lambda s: s.start_time or 0):
        _print_span(child, children, indent + "  ")


def run_demo() -> None:
    """Run the demo and print its story to stdout.

    It uses a TracerProvider of its own, passed explicitly, and leaves the global OpenTelemetry
    state, the registered vars and the logging configuration as it found them.
    """
    global tracer
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
    except ImportError:  # pragma: no cover - the demo's extra is missing
        sys.exit("the demo needs the OpenTelemetry SDK: pip install 'ctxkit[sdk]'")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("demo.app")
    register(request_id, tenant)  # carried into every background task; db_session is not

    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(logging.Formatter("trace=%(trace_id)-32s %(name)-8s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)

    print("ctxkit demo: a web app spawns background work from its requests.")
    print("Every log line carries the trace id of the code that wrote it (TraceIdFilter).")
    print("Background tasks carry request_id and tenant (registered), not db_session.")
    _rule("Log lines, as your log aggregator would see them")
    try:
        runner = asyncio.run(serve(provider))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        unregister(request_id, tenant)
    provider.force_flush()

    _rule("Traces: the exported spans of each trace, as a tree")
    print("Task spans are children of the request (same trace id), or start their own")
    print("trace with a link to the request (propagation='link'). Each shows its outcome.")
    _print_trees(exporter.get_finished_spans())

    _rule("Runner statistics")
    stats = runner.statistics()
    for field in ("spawned", "ok", "error", "timeout", "cancelled", "rejected"):
        print(f"  {field:<10} {getattr(stats, field)}")
    print(
        "\nNothing was lost: the failure was logged with its trace id and marked on its span,"
        "\nthe report outlived its cancelled request, and the task still running at shutdown"
        "\nwas cancelled and reported in the runner's summary line."
    )
