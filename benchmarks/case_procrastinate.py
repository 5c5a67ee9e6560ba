"""Case 10: per-job overhead of the procrastinate integration vs procrastinate without it.

One job is what a producer and a worker do for one task: ``defer_async`` in a request (a valid
current span and 4 vars set) into procrastinate's ``InMemoryConnector`` (its own test connector:
no PostgreSQL, no network, so the figure is ctxkit's cost and procrastinate's, not the
database's), then, as the worker does, the job row is read back and run through the app's
worker middleware (``procrastinate.middleware.compose``, as ``Worker`` composes it) in the
worker's own context. The task body is empty. Two ways, same jobs:

- plain procrastinate, nothing instrumented (the baseline);
- ``ctxkit.contrib.procrastinate.instrument(app, vars=4 vars)`` (send span, inject into the
  ``_ctxkit`` kwarg, strip it, consume).

Spans go to an SDK ``TracerProvider`` with no processor, as in cases 4 and 8. Run it with
``python -m benchmarks --cases 10`` (``--quick`` for a short run).
"""

from __future__ import annotations

import asyncio
import time
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from ._common import VARS, request_span, set_vars
from ._harness import CHUNKS, Variant, measure, skipped

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._harness import CaseResult, Settings

TITLE = "procrastinate: one job (defer_async + the worker's run of it), trace + 4 vars"

PLAIN = "procrastinate, not instrumented"
CTXKIT = "ctxkit.contrib.procrastinate (trace + 4 vars)"


def _app() -> tuple[Any, Any]:
    import procrastinate
    from procrastinate.testing import InMemoryConnector

    connector = InMemoryConnector()
    app = procrastinate.App(connector=connector)

    @app.task(name="bench.job")
    async def job() -> None:
        pass

    return app, connector


def variants(n: int) -> list[Variant]:
    from procrastinate import JobContext, middleware
    from procrastinate.jobs import Job

    from ctxkit.contrib.procrastinate import instrument

    provider = TracerProvider()
    plain = _app()
    ours = _app()
    instrument(ours[0], vars=VARS, tracer_provider=provider)

    def prepare() -> None:
        set_vars()
        otel_context.attach(trace.set_span_in_context(request_span()))

    handler = copy_context()
    handler.run(prepare)

    def job_of(pair: tuple[Any, Any]) -> Callable[[], Awaitable[None]]:
        app, connector = pair
        task = app.tasks["bench.job"]
        middlewares = app.worker_defaults.get("worker_middleware", [])

        async def job() -> None:
            job_id = await task.defer_async()
            row = connector.jobs.pop(job_id)  # taken off the queue, as a worker fetches it
            job = Job.from_row(row)
            context = JobContext(app=app, job=job, start_timestamp=0.0, abort_reason=lambda: None)

            async def run_job() -> Any:
                return await task(**job.task_kwargs)

            # The worker runs each job in its own asyncio task, not in the producer's context.
            await Context().run(
                asyncio.ensure_future, middleware.compose(middlewares, run_job, context, None)()
            )

        return job

    def timed(name: str, op: Callable[[], Awaitable[None]]) -> Variant:
        async def chunk(size: int) -> int:
            t0 = time.perf_counter_ns()
            for _ in range(size):
                await op()
            return time.perf_counter_ns() - t0

        async def run() -> float:
            size = n // CHUNKS

            async def best() -> float:
                return min([await chunk(size) for _ in range(CHUNKS)]) * CHUNKS

            return await handler.run(asyncio.ensure_future, best())

        return Variant(name, run, n)

    return [timed(PLAIN, job_of(plain)), timed(CTXKIT, job_of(ours))]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 10 (skipped, with a note, without procrastinate)."""
    try:
        import procrastinate  # noqa: F401
    except ImportError as exc:
        print(f"Case 10: procrastinate missing ({exc})")
        return [skipped("10", TITLE, f"missing ({exc})")]
    n = 500 if settings.quick else 2_500
    rounds = settings.pick_rounds(full=7, quick=3)

    async def main() -> CaseResult:
        return await measure(
            "10",
            f"{TITLE}, {n:,} jobs/batch",
            variants(n),
            baseline=PLAIN,
            rounds=rounds,
            notes=[
                "the issue sets no target for this case: ratios only",
                "ctxkit starts a send and a process span per job and carries and restores "
                "4 vars; the baseline does neither",
                f"each round's figure is the fastest of {CHUNKS} equal sub-batches",
            ],
        )

    return [asyncio.run(main())]
