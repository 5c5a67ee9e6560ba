"""Case 12: per-job overhead of the arq integration vs arq without it.

One job is what a producer and a worker do for one job, Redis left out: ``enqueue_job`` in a
request (a valid current span and 4 vars set) on a pool whose Redis write is replaced by arq's
own ``serialize_job`` into a list, then, as arq's worker does, the job is read back with
``deserialize_job_raw`` and its function coroutine run with the worker's ``ctx``, in the
worker's own context. The function's body is empty; nothing in it suspends, so the coroutines
are driven to completion directly, without an event loop. Two ways, same jobs:

- arq's functions and pool as they are (the baseline);
- ``CtxkitArq(vars=4 vars)``: ``instrument(pool)`` and ``functions(...)`` (send span, inject
  into the ``_ctxkit`` kwarg, consume, reset).

With a real Redis each job also pays two round trips (write, then read), which dwarf both rows.
arq caps redis-py below 6, so this case runs where arq is installed: ``make test-arq`` builds
``.venv-arq``, then ``.venv-arq/bin/python -m benchmarks --cases 12``.
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
    from collections.abc import Callable, Coroutine

    from ._harness import CaseResult, Settings

TITLE = "arq: one job (enqueue_job + the worker's run of it, Redis left out), trace + 4 vars"

PLAIN = "arq, not instrumented"
CTXKIT = "ctxkit.contrib.arq (trace + 4 vars)"


def _drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends to its end."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the benchmark's coroutine suspended")


class _Pool:
    """The part of ``ArqRedis.enqueue_job`` that is not Redis: the job serialised by arq."""

    def __init__(self) -> None:
        self.jobs: list[bytes] = []

    async def enqueue_job(
        self, function: str, *args: Any, _job_id: str | None = None, **kwargs: Any
    ) -> str:
        from arq.jobs import serialize_job

        self.jobs.append(serialize_job(function, args, kwargs, None, 0))
        return _job_id or ""


def _job_of(instrumented: bool, provider: TracerProvider) -> Callable[[], None]:
    from arq.jobs import deserialize_job_raw
    from arq.worker import func

    from ctxkit.contrib.arq import CtxkitArq

    async def job(ctx: dict[str, Any]) -> None:
        pass

    pool = _Pool()
    functions = [func(job, name="bench_job")]
    if instrumented:
        ctxkit_arq = CtxkitArq(vars=VARS, tracer_provider=provider)
        ctxkit_arq.instrument(pool)
        functions = ctxkit_arq.functions(*functions)
    coroutine = functions[0].coroutine
    worker = Context()
    ctx: dict[str, Any] = {"job_id": "bench", "job_try": 1, "redis": None}

    def process(data: bytes) -> None:
        _, args, kwargs, _, _ = deserialize_job_raw(data)
        _drive(coroutine(ctx, *args, **kwargs))

    def one() -> None:
        _drive(pool.enqueue_job("bench_job"))
        # arq's worker runs the job in a task of its own, not in the producer's context.
        worker.run(process, pool.jobs.pop())

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

    return [timed(PLAIN, _job_of(False, provider)), timed(CTXKIT, _job_of(True, provider))]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 12 (skipped, with a note, without arq)."""
    try:
        import arq  # noqa: F401
    except ImportError as exc:
        print(f"Case 12: arq missing ({exc}); it runs in .venv-arq (make test-arq)")
        return [skipped("12", TITLE, f"missing ({exc}); run it in .venv-arq")]
    n = 500 if settings.quick else 2_500
    rounds = settings.pick_rounds(full=7, quick=3)
    return [
        measure_sync(
            "12",
            f"{TITLE}, {n:,} jobs/batch",
            variants(n),
            baseline=PLAIN,
            rounds=rounds,
            notes=[
                "the issue sets no target for this case: ratios only",
                "ctxkit starts a send and a process span per job and carries and restores 4 vars",
                "Redis is left out: with it, each job also pays a write and a read round trip",
                f"each round's figure is the fastest of {CHUNKS} equal sub-batches",
            ],
        )
    ]
