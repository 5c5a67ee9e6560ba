"""Case 8: per-job overhead of the Celery integration vs opentelemetry-instrumentation-celery.

One job is what a producer and a worker do for one task: ``send_task`` in a request (a valid
current span and 4 vars set) onto Celery's in-memory broker (``memory://``, kombu's transport,
no network), then, as the worker does, the message is taken off the queue and run through
Celery's own tracer (``celery.app.trace.build_tracer``) with the message headers as the
request. The task body is empty and ignores its result. Three ways, same jobs:

- plain Celery, nothing instrumented (the baseline);
- ``ctxkit.contrib.celery.instrument(app, vars=4 vars)`` (send span, inject, consume);
- ``opentelemetry-instrumentation-celery`` (``CeleryInstrumentor``, trace only, no vars),
  instrumented for its own batches only, since it hooks Celery's signals process-wide.

Spans go to an SDK ``TracerProvider`` with no processor, as in case 4.
"""

from __future__ import annotations

import uuid
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from ._common import VARS, now, request_span, set_vars
from ._harness import CHUNKS, Variant, best_of, measure_sync, skipped

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._harness import CaseResult, Settings

TITLE = "Celery: one job (send_task + the worker's run of it), trace + 4 vars"

PLAIN = "celery, not instrumented"
CTXKIT = "ctxkit.contrib.celery (trace + 4 vars)"
OTEL = "opentelemetry-instrumentation-celery (trace only)"
QUEUE = "bench"


def _app(name: str) -> Any:
    from celery import Celery

    app = Celery(name, broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue=QUEUE, task_ignore_result=True)

    @app.task(name="bench.job", shared=False, ignore_result=True)
    def job() -> None:
        pass

    return app


def variants(n: int) -> list[Variant]:
    from celery.app.trace import build_tracer
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    from ctxkit.contrib.celery import instrument

    provider = TracerProvider()
    plain = _app("plain")
    ours = _app("ctxkit")
    instrument(ours, vars=VARS, tracer_provider=provider)
    otel = CeleryInstrumentor()

    def prepare() -> None:
        set_vars()
        otel_context.attach(trace.set_span_in_context(request_span()))

    handler = copy_context()
    handler.run(prepare)

    def job_of(app: Any) -> Callable[[], None]:
        task = app.tasks["bench.job"]
        tracer = build_tracer(task.name, task, app=app, eager=False)
        connection = app.connection_for_write()
        queue = connection.SimpleQueue(QUEUE)
        worker = Context()

        def job() -> None:
            app.send_task("bench.job")
            message = queue.get_nowait()
            headers = message.headers
            args, kwargs, _ = message.decode()
            request = {**headers, "delivery_info": message.delivery_info, "hostname": "bench"}
            # The worker runs the task in its own context, not the producer's.
            worker.run(tracer, headers.get("id") or uuid.uuid4().hex, args, kwargs, request)
            message.ack()

        return job

    def timed(name: str, op: Callable[[], None], wrap: bool = False) -> Variant:
        def chunk(start: int, stop: int) -> int:
            t0 = now()
            for _ in range(stop - start):
                op()
            return now() - t0

        def run() -> float:
            if wrap:
                otel.instrument(tracer_provider=provider)
            try:
                return handler.run(best_of, chunk, n)
            finally:
                if wrap:
                    otel.uninstrument()

        return Variant(name, run, n, ref=PLAIN if name != PLAIN else None)

    return [
        timed(PLAIN, job_of(plain)),
        timed(CTXKIT, job_of(ours)),
        timed(OTEL, job_of(plain), wrap=True),
    ]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 8 (skipped, with a note, without celery or its OpenTelemetry instrumentation)."""
    try:
        import celery  # noqa: F401
        import opentelemetry.instrumentation.celery  # noqa: F401
    except ImportError as exc:
        print(f"Case 8: celery or opentelemetry-instrumentation-celery missing ({exc})")
        return [skipped("8", TITLE, f"missing ({exc})")]
    n = 500 if settings.quick else 2_500
    rounds = settings.pick_rounds(full=7, quick=3)
    return [
        measure_sync(
            "8",
            f"{TITLE}, {n:,} jobs/batch",
            variants(n),
            baseline=PLAIN,
            rounds=rounds,
            notes=[
                "the issue sets no target for this case: ratios only",
                "both instrumentations start a send and a process span per job; ctxkit also "
                "carries and restores 4 vars",
                f"each round's figure is the fastest of {CHUNKS} equal sub-batches",
            ],
        )
    ]
