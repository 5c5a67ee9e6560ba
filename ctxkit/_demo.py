"""The showcase behind ``python -m ctxkit demo``: a simulated web app using ctxkit.

It serves four simulated requests on asyncio with OpenTelemetry's SDK (one of them untraced,
through ``TraceIdMiddleware``), spawns background work in each of ctxkit's modes, shuts down,
and prints what a newcomer needs to see: the log lines with their trace ids, span ids and task
names, the span tree of every trace with durations and links (the ``span=False`` tasks listed
in the trace whose id they log under), and the runner's statistics.
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
from ._runner import BackgroundRunner, current_task
from ._spawn import fire_and_forget, spawn
from .contrib.asgi import TraceIdMiddleware

if TYPE_CHECKING:
    from collections.abc import MutableMapping, Sequence

    from opentelemetry.sdk.trace import ReadableSpan

    from ._handle import BackgroundTask
    from .contrib.asgi import Receive, Scope, Send

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
    log.info("exchange rates refreshed (the webhook's fake trace id)")


async def notify_accounting(invoice: str) -> None:
    await asyncio.sleep(0.02)
    log.info("accounting notified of %s (the webhook's fake trace id)", invoice)


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


async def payment_webhook(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /webhooks/payment, an ASGI app whose route has no server span (not instrumented).

    ``TraceIdMiddleware`` gives the request a fake trace id: its own log lines and the lines of
    the tasks it spawns share it, so they can be found together without any tracing.
    """
    await receive()  # the request body: the payment event
    log.info("payment webhook received (untraced route: a fake trace id, from the middleware)")
    spawn(refresh_exchange_rates(), span=False)
    spawn(notify_accounting("INV-7"), span=False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
    log.info("payment webhook answered 204")


async def serve_untraced_request() -> None:
    """What an ASGI server does for one request: call the app with its scope and channels."""

    async def receive() -> MutableMapping[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, object]) -> None:
        pass

    scope: Scope = {"type": "http", "method": "POST", "path": "/webhooks/payment"}
    await TraceIdMiddleware(payment_webhook)(scope, receive, send)


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
        await serve_untraced_request()
        spawn(warm_cache())
        await asyncio.sleep(0.2)
        log.info("shutting down: draining background work (drain_timeout=0.3s)")
    return runner


# -- printing -------------------------------------------------------------------------------


class _LogColumns(logging.Filter):
    """Add the demo's log columns to each record (after ``TraceIdFilter`` added the ids).

    The columns are the ids with ``-`` for an empty one, and the name of the background task
    that logs (``ctxkit.current_task()``), or ``-``.

    It also remembers each task with no span of its own that logged (the ``span=False``
    tasks), by trace id: no exported span shows them.
    """

    def __init__(self) -> None:
        super().__init__()
        # trace id -> {id(task): (task, the span id current in it, "" for none)}
        self.spanless: dict[str, dict[int, tuple[BackgroundTask[object], str]]] = defaultdict(dict)

    def filter(self, record: logging.LogRecord) -> bool:
        task = current_task()
        fields = record.__dict__
        fields["trace"] = fields.get("trace_id") or "-"
        fields["span"] = fields.get("span_id") or "-"
        fields["task"] = task.name if task is not None else "-"
        if task is not None and not task.span_context.is_valid and fields.get("trace_id"):
            self.spanless[fields["trace_id"]].setdefault(id(task), (task, fields["span_id"]))
        return True


Spanless = dict[str, dict[int, tuple["BackgroundTask[object]", str]]]


def _print_trees(spans: Sequence[ReadableSpan], spanless: Spanless) -> None:
    by_trace: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        by_trace[span.context.trace_id].append(span)
    traces = sorted(by_trace.values(), key=lambda group: min(s.start_time or 0 for s in group))
    for group in traces:
        trace_id = f"{group[0].context.trace_id:032x}"
        print(f"\ntrace {trace_id}")
        ids = {span.context.span_id for span in group}
        children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
        for span in group:
            parent = span.parent.span_id if span.parent else None
            children[parent if parent in ids else None].append(span)
        under: dict[str, list[BackgroundTask[object]]] = defaultdict(list)
        for task, span_id in spanless.pop(trace_id, {}).values():
            under[span_id].append(task)
        for root in sorted(children[None], key=lambda s: s.start_time or 0):
            _print_span(root, children, "", under)
    for trace_id, tasks in spanless.items():  # fake trace ids: no span at all
        print(f"\ntrace {trace_id}  (a fake trace id: no spans, it only joins log lines)")
        _print_spanless([task for task, _ in tasks.values()], "")


def _print_spanless(tasks: list[BackgroundTask[object]], indent: str) -> None:
    for task in tasks:
        print(f"  {indent}{task.name}  [span=False: no span of its own, outcome={task.outcome}]")


def _print_span(
    span: ReadableSpan,
    children: dict[int | None, list[ReadableSpan]],
    indent: str,
    under: dict[str, list[BackgroundTask[object]]],
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
        _print_span(child, children, indent + "  ", under)
    _print_spanless(under.pop(f"{span.context.span_id:016x}", []), indent + "  ")


_FORMAT = "%(trace)-32s %(span)-16s %(task)-22s %(name)-8s %(message)s"
_HEADER = {
    "trace": "trace id",
    "span": "span id",
    "task": "task",
    "name": "logger",
    "message": "message",
}


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
        sys.exit("the demo needs the OpenTelemetry SDK: pip install 'ctxkit-async[sdk]'")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("demo.app")
    register(request_id, tenant)  # carried into every background task; db_session is not

    columns = _LogColumns()
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(TraceIdFilter())
    handler.addFilter(columns)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)

    print("ctxkit demo: a web app spawns background work from its requests.")
    print("Every log line carries the trace id and span id of the code that wrote it")
    print("(TraceIdFilter), and the name of the background task that wrote it, if any.")
    print("Background tasks carry request_id and tenant (registered), not db_session.")
    _rule("Log lines, as your log aggregator would see them")
    print(_FORMAT % _HEADER)
    try:
        runner = asyncio.run(serve(provider))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        unregister(request_id, tenant)
    provider.force_flush()

    _rule("Traces: the exported spans of each trace, as a tree")
    print("Task spans are children of the request (same trace id), or start their own")
    print("trace with a link to the request (propagation='link'). Each shows its outcome;")
    print("span=False tasks have no span: they are listed under the span current in them.")
    _print_trees(exporter.get_finished_spans(), columns.spanless)

    _rule("Runner statistics")
    stats = runner.statistics()
    for field in ("spawned", "ok", "error", "timeout", "cancelled", "rejected"):
        print(f"  {field:<10} {getattr(stats, field)}")
    print(
        "\nNothing was lost: the failure was logged with its trace id and marked on its span,"
        "\nthe report outlived its cancelled request, and the task still running at shutdown"
        "\nwas cancelled and reported in the runner's summary line."
    )
