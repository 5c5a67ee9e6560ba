"""Case 2: spawn and finish a batch of trivial tasks with one span per task.

Every variant spawns from inside a recording request span of the same SDK TracerProvider,
so each task span is a child of it. Two tracer set-ups: an SDK ``TracerProvider`` with no
span processor, and one with a ``BatchSpanProcessor`` (default settings) to an exporter that
drops everything; the processor is flushed after each batch, outside the clock.

``opentelemetry-instrumentation-asyncio`` is instrumented (tracing the coroutine ``tick`` by
name through ``OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE``, read at instrument time) just
before its batch and uninstrumented just after, both outside the clock, because it wraps
``asyncio.create_task`` for the whole process. It always records its two metrics; "no-op
meter" gives it the API's no-op MeterProvider, "SDK meter" an SDK MeterProvider with an
``InMemoryMetricReader`` (aggregation on every measurement, no export). ctxkit's runner gets
the same meter provider in the matching variant.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor
from opentelemetry.instrumentation.asyncio.environment_variables import (
    OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import ctxkit

from ._common import VARS, Batch, HandSpan, NoOpExporter, now, set_vars, tick
from ._harness import Target, Variant, measure

if TYPE_CHECKING:
    from ._harness import CaseResult, Settings

TITLE = "spawn + finish with a span per task, 4 vars (asyncio)"

BARE = "bare create_task (no span)"
OTEL = "otel-asyncio, SDK, no-op meter"
CTXKIT = "ctxkit.spawn, SDK, no-op meter"
HAND = "hand-written, SDK"
OTEL_BSP = "otel-asyncio, SDK+BatchSpanProcessor"
CTXKIT_BSP = "ctxkit.spawn, SDK+BatchSpanProcessor"
HAND_BSP = "hand-written, SDK+BatchSpanProcessor"
OTEL_METRICS = "otel-asyncio, SDK, SDK meter"
CTXKIT_METRICS = "ctxkit.spawn, SDK, SDK meter"

TARGETS = (
    Target("spawn with span (SDK) <= 1.0x otel-asyncio", CTXKIT, OTEL, 1.0),
    Target("... with BatchSpanProcessor <= 1.0x otel-asyncio", CTXKIT_BSP, OTEL_BSP, 1.0),
    Target(
        "with metrics on <= 1.0x otel-asyncio with its metrics", CTXKIT_METRICS, OTEL_METRICS, 1.0
    ),
)


class _Setup:
    """The providers of the case, made once and shut down at its end."""

    def __init__(self) -> None:
        self.plain = TracerProvider()
        self.batched = TracerProvider()
        self.processor = BatchSpanProcessor(NoOpExporter())
        self.batched.add_span_processor(self.processor)
        self.noop_meter = metrics.NoOpMeterProvider()
        self.reader = InMemoryMetricReader()
        self.sdk_meter = MeterProvider(metric_readers=[self.reader])

    def shutdown(self) -> None:
        self.plain.shutdown()
        self.batched.shutdown()
        self.sdk_meter.shutdown()


def variants(n: int, s: _Setup) -> list[Variant]:
    """Return the variants of this case, each spawning ``n`` tasks per batch."""

    async def bare() -> int:
        batch = Batch(n, asyncio.Event())
        with s.plain.get_tracer("bench").start_as_current_span("request"):
            t0 = now()
            for _ in range(n):
                asyncio.create_task(tick(batch))  # noqa: RUF006 - the point of the baseline
            await batch.done.wait()
            await asyncio.sleep(0)
            return now() - t0

    def otel(name: str, tp: TracerProvider, mp: Any) -> Variant:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            os.environ[OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE] = tick.__name__
            instrumentor = AsyncioInstrumentor()
            instrumentor.instrument(tracer_provider=tp, meter_provider=mp, skip_dep_check=True)
            try:
                tasks = set()
                with tp.get_tracer("bench").start_as_current_span("request"):
                    t0 = now()
                    for _ in range(n):
                        # the strong reference users need anyway; the instrumentation adds none
                        tasks.add(asyncio.create_task(tick(batch)))
                    await batch.done.wait()
                    await asyncio.sleep(0)
                    return now() - t0
            finally:
                instrumentor.uninstrument()

        return Variant(name, run, n)

    def ctx(name: str, tp: TracerProvider, mp: Any, ref: str) -> Variant:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            async with ctxkit.BackgroundRunner(limit=None, tracer_provider=tp, meter_provider=mp):
                with tp.get_tracer("bench").start_as_current_span("request"):
                    t0 = now()
                    for _ in range(n):
                        ctxkit.spawn(tick(batch), vars=VARS)
                    await batch.done.wait()
                    await asyncio.sleep(0)
                    return now() - t0

        return Variant(name, run, n, ref=ref)

    def hand(name: str, tp: TracerProvider, ref: str) -> Variant:
        async def run() -> int:
            batch = Batch(n, asyncio.Event())
            spawner = HandSpan(tp.get_tracer("bench"), VARS)
            with tp.get_tracer("bench").start_as_current_span("request"):
                t0 = now()
                for _ in range(n):
                    spawner.spawn(tick(batch))
                await batch.done.wait()
                await asyncio.sleep(0)
                return now() - t0

        return Variant(name, run, n, ref=ref)

    return [
        otel(OTEL, s.plain, s.noop_meter),
        ctx(CTXKIT, s.plain, s.noop_meter, OTEL),
        hand(HAND, s.plain, OTEL),
        otel(OTEL_BSP, s.batched, s.noop_meter),
        ctx(CTXKIT_BSP, s.batched, s.noop_meter, OTEL_BSP),
        hand(HAND_BSP, s.batched, OTEL_BSP),
        otel(OTEL_METRICS, s.plain, s.sdk_meter),
        ctx(CTXKIT_METRICS, s.plain, s.sdk_meter, OTEL_METRICS),
        Variant(BARE, bare, n),
    ]


def run(settings: Settings) -> list[CaseResult]:
    """Run case 2."""
    n = 2_000 if settings.quick else 10_000
    rounds = settings.pick_rounds(full=9, quick=3)

    async def main() -> CaseResult:
        set_vars()
        setup = _Setup()

        async def settle() -> None:
            setup.processor.force_flush()

        try:
            return await measure(
                "2",
                f"{TITLE}, {n:,} tasks/batch",
                variants(n, setup),
                baseline=OTEL,
                rounds=rounds,
                targets=TARGETS,
                between=settle,
                notes=[
                    "ctxkit runs with limit=None (no queueing); its task span is current in "
                    "the task, the instrumentation's is not",
                    "otel-asyncio variants keep a strong set of their tasks, as any correct "
                    "caller must; the instrumentation starts its span when the task first "
                    "runs, ctxkit and the hand-written pattern at spawn",
                ],
            )
        finally:
            setup.shutdown()

    return [asyncio.run(main())]
