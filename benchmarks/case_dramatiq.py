"""Case 11: per-job overhead of the dramatiq integration vs dramatiq without it.

One job is what a producer and a worker do for one message: ``actor.send()`` in a request (a
valid current span and 4 vars set) onto dramatiq's ``StubBroker`` (in memory, no network), then,
as a worker thread does, the message is taken off the queue, decoded, and processed between the
broker's ``before_process_message`` and ``after_process_message`` hooks, in the worker's own
context. The actor's body is empty. Two ways, same jobs, same process:

- dramatiq with its default middleware (the baseline);
- the same plus ``ctxkit.contrib.dramatiq.CtxkitMiddleware(vars=4 vars)`` (send span, inject
  into ``options["ctxkit"]``, consume, reset).

Spans go to an SDK ``TracerProvider`` with no processor, as in case 4.
"""

from __future__ import annotations

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

TITLE = "dramatiq: one job (send + the worker's processing of it), trace + 4 vars"

PLAIN = "dramatiq, not instrumented"
CTXKIT = "ctxkit.contrib.dramatiq (trace + 4 vars)"
QUEUE = "bench"


def _job_of(instrumented: bool, provider: TracerProvider) -> Callable[[], None]:
    import dramatiq
    from dramatiq import Message
    from dramatiq.broker import MessageProxy
    from dramatiq.brokers.stub import StubBroker

    from ctxkit.contrib.dramatiq import CtxkitMiddleware

    broker = StubBroker()
    if instrumented:
        broker.add_middleware(CtxkitMiddleware(vars=VARS, tracer_provider=provider))

    def job() -> None:
        pass

    actor: Any = dramatiq.actor(broker=broker, actor_name="bench_job", queue_name=QUEUE)(job)
    queue = broker.queues[QUEUE]
    worker = Context()

    def process(data: bytes) -> None:
        message = MessageProxy(Message.decode(data))
        broker.emit_before("process_message", message)
        result = actor(*message.args, **message.kwargs)
        broker.emit_after("process_message", message, result=result)

    def one() -> None:
        actor.send()
        # The worker thread runs the message in its own context, not the producer's.
        worker.run(process, queue.get_nowait())

    return one


def variants(n: int) -> list[Variant]:
    provider = TracerProvider()

    def prepare() -> None:
        set_vars()
        otel_context.attach(trace.set_span_in_context(request_span()))

    handler = copy_context()
    handler.run(prepare)

    def timed(name: str, op: Callable[[], None]) -> Variant:
        def chunk(start: int, stop: int) -> int:
            t0 = now()
            for _ in range(stop - start):
                op()
            return now() - t0

        def run() -> float:
            return handler.run(best_of, chunk, n)

        return Variant(name, run, n, ref=PLAIN if name != PLAIN else None)

    return [
        timed(PLAIN, _job_of(False, provider)),
        timed(CTXKIT, _job_of(True, provider)),
    ]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 10 (skipped, with a note, without dramatiq)."""
    try:
        import dramatiq  # noqa: F401
    except ImportError as exc:
        print(f"Case 11: dramatiq missing ({exc})")
        return [skipped("11", TITLE, f"missing ({exc})")]
    n = 500 if settings.quick else 2_500
    rounds = settings.pick_rounds(full=7, quick=3)
    return [
        measure_sync(
            "11",
            f"{TITLE}, {n:,} jobs/batch",
            variants(n),
            baseline=PLAIN,
            rounds=rounds,
            notes=[
                "the issue sets no target for this case: ratios only",
                "ctxkit starts a send and a process span per job and carries and restores 4 vars",
                f"each round's figure is the fastest of {CHUNKS} equal sub-batches",
            ],
        )
    ]
