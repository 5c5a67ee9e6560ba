"""Tests for ctxkit.contrib.arq on a real Redis: an arq worker in this process, then in its own.

Run in a venv of their own (``make test-arq``): arq caps redis-py below 6, which the main test
venv's taskiq-redis and kombu do not admit (conftest.py leaves this module out where arq is not
installed). The in-process tests run ``arq.worker.Worker`` in burst mode, spans in memory; the
process tests start ``python -m arq`` workers, one per propagation mode, exporting their spans
to a JSONL file. Jobs push what they saw to a Redis list.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import os
import pickle
import subprocess
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import pytest
import pytest_asyncio
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Retry, Worker, func
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

import ctxkit
from ctxkit import propagation
from ctxkit.contrib.arq import KWARG, CtxkitArq, _attempt

from ._servers import REPO, TIMEOUT, redis_url, stop

__all__ = ["redis_url"]  # a fixture, used by name

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

Mode = Literal["child", "link", "none"]

# arq's Worker.close() calls redis-py's deprecated close(): arq's own warning, not ctxkit's.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")

# Same names as in tests/arq_app/app.py: names, not objects, identify vars across processes.
request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[object] = ContextVar("tenant")
secret: ContextVar[str] = ContextVar("secret")


@pytest.fixture(autouse=True)
def _fresh_log_once() -> Iterator[None]:
    """Each test sees the first rejection of each kind logged."""
    saved = set(propagation._logged)
    propagation._logged.clear()
    yield
    propagation._logged.clear()
    propagation._logged.update(saved)


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def rejected(reader: InMemoryMetricReader) -> dict[str, int]:
    """Return the ctxkit.propagation.rejected counts by reason."""
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    if data is None:
        return counts
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "ctxkit.propagation.rejected":
                    for point in metric.data.data_points:
                        reason = str((point.attributes or {})["ctxkit.reason"])
                        counts[reason] = int(getattr(point, "value", 0))
    return counts


# --- a worker in this process, in burst mode -----------------------------------------------------


@dataclass
class Local:
    pool: ArqRedis
    queue: str
    seen: list[dict[str, object]]
    settings: RedisSettings
    instrumentation: CtxkitArq

    async def run(self) -> None:
        """Run every job queued (retries too), then stop."""
        worker = Worker(
            functions=self.functions(),
            redis_settings=self.settings,
            queue_name=self.queue,
            burst=True,
            poll_delay=0.01,
            handle_signals=False,
            keep_result=0,
        )
        try:
            # in an empty context, as in a worker process: nothing of the test's is inherited
            running = asyncio.create_task(worker.async_run(), context=contextvars.Context())
            await asyncio.wait_for(running, 3 * TIMEOUT)
        finally:
            await worker.close()

    def functions(self) -> list[Any]:
        seen = self.seen

        def observation() -> dict[str, object]:
            record = logging.LogRecord("app", logging.INFO, __file__, 1, "msg", (), None)
            ctxkit.TraceIdFilter().filter(record)
            return {
                "record_trace_id": getattr(record, "trace_id", None),
                "record_span_id": getattr(record, "span_id", None),
                "trace_id": ctxkit.current_trace_id(),
                "span": trace.get_current_span().get_span_context(),
                "request_id": request_id.get(None),
                "tenant": tenant.get(None),
                "secret": secret.get(None),
            }

        async def observe(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            seen.append({**observation(), "args": args, "kwargs": kwargs})

        async def fail(ctx: dict[str, Any]) -> None:
            seen.append(observation())
            raise RuntimeError("boom")

        async def flaky(ctx: dict[str, Any]) -> None:
            seen.append(observation())
            if ctx["job_try"] < 3:
                raise Retry(defer=0.01)

        return self.instrumentation.functions(
            func(observe, name="observe"),
            func(fail, name="fail"),
            func(flaky, name="flaky", max_tries=5),
        )


@pytest_asyncio.fixture
async def make_local(
    redis_url: str, tracer_provider: TracerProvider
) -> AsyncIterator[Callable[..., Any]]:
    pools: list[ArqRedis] = []

    async def make(
        mode: Mode = "child",
        retries: Literal["link", "child"] = "link",
        meter_provider: MeterProvider | None = None,
    ) -> Local:
        settings = RedisSettings.from_dsn(redis_url)
        queue = f"arq:test:{uuid.uuid4().hex}"
        instrumentation = CtxkitArq(
            vars=(request_id, tenant),
            propagation=mode,
            retries=retries,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        pool = await create_pool(settings, default_queue_name=queue)
        pools.append(pool)
        instrumentation.instrument(pool)
        return Local(pool, queue, [], settings, instrumentation)

    yield make
    for pool in pools:
        await pool.aclose()


class TestInProcess:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("mode", ["child", "link", "none"])
    async def test_job_sees_vars_and_span_per_propagation(
        self,
        mode: Mode,
        make_local: Callable[..., Any],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        local: Local = await make_local(mode)
        tracer = tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER) as server:
            request_id.set("r-1")
            tenant.set({"id": 7})
            secret.set("never")
            job = await local.pool.enqueue_job("observe", 1, two=2)
        assert job is not None
        await local.run()
        (seen,) = local.seen
        assert (seen["request_id"], seen["tenant"], seen["secret"]) == ("r-1", {"id": 7}, None)
        assert (seen["args"], seen["kwargs"]) == ((1,), {"two": 2})  # the carrier is gone
        (send,) = finished(span_exporter, "send observe")
        (process,) = finished(span_exporter, "process observe")
        assert send.kind is SpanKind.PRODUCER
        assert send.parent is not None
        assert send.parent.span_id == server.get_span_context().span_id
        assert dict(send.attributes or {}) == {
            "messaging.system": "arq",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": "observe",
            "messaging.message.id": job.job_id,
        }
        attributes = dict(process.attributes or {})
        assert process.kind is SpanKind.CONSUMER
        assert attributes["messaging.system"] == "arq"
        assert attributes["messaging.operation.name"] == "process"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == "observe"
        assert attributes["messaging.message.id"] == job.job_id
        assert attributes["ctxkit.attempt"] == 1
        assert seen["trace_id"] == hex_trace(process)
        server_trace = f"{server.get_span_context().trace_id:032x}"
        if mode == "child":
            assert process.parent is not None
            assert process.parent.span_id == send.context.span_id
            assert hex_trace(process) == server_trace
        else:
            assert process.parent is None
            assert hex_trace(process) != server_trace
            expected = [send.context.span_id] if mode == "link" else []
            assert [link.context.span_id for link in process.links] == expected

    @pytest.mark.asyncio
    async def test_given_job_id_is_the_message_id(
        self, make_local: Callable[..., Any], span_exporter: InMemorySpanExporter
    ) -> None:
        local: Local = await make_local()
        job = await local.pool.enqueue_job("observe", _job_id="my-id")
        assert job is not None
        assert job.job_id == "my-id"
        assert await local.pool.enqueue_job("observe", _job_id="my-id") is None  # arq: exists
        await local.run()
        sends = finished(span_exporter, "send observe")
        assert [(s.attributes or {})["messaging.message.id"] for s in sends] == ["my-id"] * 2
        assert [s.status.status_code for s in sends] == [StatusCode.UNSET] * 2
        assert len(local.seen) == 1

    @pytest.mark.asyncio
    async def test_failure_is_marked_and_nothing_leaks(
        self, make_local: Callable[..., Any], span_exporter: InMemorySpanExporter
    ) -> None:
        local: Local = await make_local()

        async def in_request() -> None:
            request_id.set("leaky")
            await local.pool.enqueue_job("fail")

        await asyncio.create_task(in_request(), context=contextvars.Context())
        await local.pool.enqueue_job("observe")
        await local.run()
        assert sorted(str(s["request_id"]) for s in local.seen) == ["None", "leaky"]
        (process,) = finished(span_exporter, "process fail")
        assert process.status.status_code is StatusCode.ERROR
        assert (process.attributes or {})["error.type"] == "RuntimeError"
        assert request_id.get(None) is None  # nor into the worker's own context

    @pytest.mark.asyncio
    @pytest.mark.parametrize("mode", ["child", "link"])
    async def test_retries_link_to_the_producer_and_the_previous_attempt(
        self, mode: Mode, make_local: Callable[..., Any], span_exporter: InMemorySpanExporter
    ) -> None:
        local: Local = await make_local(mode)
        request_id.set("r-retry")
        await local.pool.enqueue_job("flaky")
        await local.run()
        assert [s["request_id"] for s in local.seen] == ["r-retry"] * 3
        processes = finished(span_exporter, "process flaky")
        (send,) = finished(span_exporter, "send flaky")
        assert [(p.attributes or {})["ctxkit.attempt"] for p in processes] == [1, 2, 3]
        assert len({hex_trace(p) for p in processes}) == 3
        for previous, attempt in itertools.pairwise(processes):
            assert attempt.parent is None
            assert [link.context.span_id for link in attempt.links] == [
                send.context.span_id,
                previous.context.span_id,
            ]
            assert (attempt.attributes or {})["ctxkit.previous_trace_id"] == hex_trace(previous)
        assert [p.status.status_code for p in processes] == [
            StatusCode.ERROR,
            StatusCode.ERROR,
            StatusCode.UNSET,
        ]
        assert [(p.attributes or {}).get("error.type") for p in processes[:2]] == ["Retry"] * 2

    @pytest.mark.asyncio
    async def test_retries_child_keeps_one_trace(
        self,
        make_local: Callable[..., Any],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        local: Local = await make_local("child", "child")
        with tracer_provider.get_tracer("test").start_as_current_span("GET /retry") as server:
            await local.pool.enqueue_job("flaky")
        await local.run()
        processes = finished(span_exporter, "process flaky")
        (send,) = finished(span_exporter, "send flaky")
        assert [(p.attributes or {})["ctxkit.attempt"] for p in processes] == [1, 2, 3]
        expected = f"{server.get_span_context().trace_id:032x}"
        assert {hex_trace(p) for p in processes} == {expected}
        for process in processes:
            assert process.parent is not None
            assert process.parent.span_id == send.context.span_id

    @pytest.mark.asyncio
    @pytest.mark.parametrize(
        ("carrier", "reasons"),
        [
            ("not a dict", {"carrier.not_mapping"}),
            (
                {"traceparent": "garbage", "ctxkit-vars": "[" * 5000},
                {"traceparent.invalid_format", "vars.too_large"},
            ),
            ({"traceparent": 7, "ctxkit-vars": b"{}"}, {"vars.not_string"}),
            ({"ctxkit-vars": '{"request_id": "evil", "request_id": "x"}'}, {"vars.duplicate_name"}),
        ],
    )
    async def test_hostile_carrier_runs_as_new_root(
        self,
        carrier: object,
        reasons: set[str],
        make_local: Callable[..., Any],
        span_exporter: InMemorySpanExporter,
        meter_provider: MeterProvider,
        metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        local: Local = await make_local(meter_provider=meter_provider)
        plain = await create_pool(local.settings, default_queue_name=local.queue)
        try:  # an uninstrumented pool: the carrier goes as given
            await plain.enqueue_job("observe", _ctxkit=carrier)  # KWARG, as a hostile sender
        finally:
            await plain.aclose()
        await local.run()
        (seen,) = local.seen
        assert seen["request_id"] is None
        assert seen["kwargs"] == {}
        (process,) = finished(span_exporter, "process observe")
        assert process.parent is None
        assert list(process.links) == []
        counts = rejected(metric_reader)
        assert reasons <= set(counts), counts
        for reason in reasons:
            assert f"({reason})" in caplog.text
        assert "evil" not in caplog.text

    @pytest.mark.asyncio
    async def test_fake_trace_id_travels(
        self, make_local: Callable[..., Any], tracer_provider: TracerProvider
    ) -> None:
        local: Local = await make_local()
        producer = CtxkitArq(vars=(request_id,), tracer_provider=trace.NoOpTracerProvider())
        pool = producer.instrument(
            await create_pool(local.settings, default_queue_name=local.queue)
        )
        try:
            context = ctxkit.clone_without_span()
            fake = context.run(ctxkit.current_trace_id)
            assert fake is not None

            async def send() -> None:
                await pool.enqueue_job("observe")

            await asyncio.create_task(send(), context=context)
        finally:
            await pool.aclose()
        await local.run()
        assert local.seen[0]["trace_id"] == fake

    @pytest.mark.asyncio
    async def test_logs_agree_with_the_span(
        self, make_local: Callable[..., Any], tracer_provider: TracerProvider
    ) -> None:
        """In the job, current_trace_id() and TraceIdFilter give the process span's ids."""
        local: Local = await make_local()
        with tracer_provider.get_tracer("test").start_as_current_span("GET /log"):
            await local.pool.enqueue_job("observe")
        await local.run()
        (seen,) = local.seen
        span = seen["span"]
        assert isinstance(span, trace.SpanContext)
        assert seen["trace_id"] == seen["record_trace_id"] == f"{span.trace_id:032x}"
        assert seen["record_span_id"] == f"{span.span_id:016x}"

    def test_constructor_and_arguments_are_checked(self) -> None:
        with pytest.raises(ValueError, match="'sideways'"):
            CtxkitArq(propagation="sideways")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="'never'"):
            CtxkitArq(retries="never")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="'request_id'"):
            CtxkitArq(vars=("request_id",))  # type: ignore[arg-type]
        twin: ContextVar[str] = ContextVar("request_id")
        with pytest.raises(ValueError, match="request_id"):
            CtxkitArq(vars=(request_id, twin))
        with pytest.raises(TypeError, match="'not a pool'"):
            CtxkitArq().instrument("not a pool")
        with pytest.raises(TypeError, match="<function"):
            CtxkitArq().functions(lambda ctx: None)

    def test_attempt(self) -> None:
        assert KWARG == "_ctxkit"  # the name the hostile-payload tests write as a literal
        assert _attempt(None) == 1
        assert _attempt(1) == 1
        assert _attempt(3) == 3
        for bad in (0, -1, "2", True, 10**12, 1.5):
            assert _attempt(bad) == 1


# --- the wrapper called directly: edges a worker rarely reaches ---------------------------------


class FakeRedis:
    """Stands for the worker's ``ctx["redis"]``: a dict, or failing on every call."""

    def __init__(self, failing: bool = False, value: object = None) -> None:
        self.failing = failing
        self.values: dict[str, object] = {}
        self.value = value

    async def setex(self, key: str, ttl: int, value: str) -> None:
        if self.failing:
            raise ConnectionError("redis is down")
        self.values[key] = value

    async def get(self, key: str) -> object:
        if self.failing:
            raise ConnectionError("redis is down")
        return self.value if self.value is not None else self.values.get(key)


async def top_level_job(ctx: dict[str, Any]) -> dict[str, object]:
    return {"request_id": request_id.get(None), "span": trace.get_current_span()}


class TestWrapper:
    @pytest.mark.asyncio
    async def test_plain_coroutine_function_keeps_its_name(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        (function,) = CtxkitArq(vars=(request_id,), tracer_provider=tracer_provider).functions(
            top_level_job
        )
        assert function.name == "top_level_job"
        carrier: dict[str, str] = propagation.inject(
            {}, vars=(request_id,), context=self._with_request_id()
        )
        seen = await function.coroutine({"job_id": "j", "job_try": 1}, _ctxkit=carrier)
        assert seen["request_id"] == "r-direct"
        assert request_id.get(None) is None
        (process,) = finished(span_exporter, "process top_level_job")
        assert (process.attributes or {})["messaging.message.id"] == "j"

    @staticmethod
    def _with_request_id() -> contextvars.Context:
        context = contextvars.Context()
        context.run(request_id.set, "r-direct")
        return context

    @pytest.mark.asyncio
    async def test_failed_attempt_is_kept_for_the_next_one(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        async def job(ctx: dict[str, Any]) -> None:
            if ctx["job_try"] == 1:
                raise Retry(defer=1)

        instrumentation = CtxkitArq(tracer_provider=tracer_provider)
        (function,) = instrumentation.functions(func(job, name="job"))
        redis = FakeRedis()
        carrier: dict[str, str] = propagation.inject({})
        with pytest.raises(Retry):
            await function.coroutine({"job_id": "j", "job_try": 1, "redis": redis}, _ctxkit=carrier)
        (first,) = finished(span_exporter, "process job")
        assert list(redis.values) == ["ctxkit:arq:previous:j"]
        await function.coroutine({"job_id": "j", "job_try": 2, "redis": redis}, _ctxkit=carrier)
        second = finished(span_exporter, "process job")[1]
        assert [link.context.span_id for link in second.links] == [first.context.span_id]

    @pytest.mark.asyncio
    @pytest.mark.parametrize(
        "redis",
        [None, FakeRedis(failing=True), FakeRedis(value=12345)],
        ids=["none", "down", "odd"],
    )
    async def test_redis_trouble_only_loses_the_previous_link(
        self,
        redis: FakeRedis | None,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        async def job(ctx: dict[str, Any]) -> None:
            raise RuntimeError("fails")

        (function,) = CtxkitArq(tracer_provider=tracer_provider).functions(func(job, name="job"))
        for job_try in (1, 2):
            with pytest.raises(RuntimeError):
                await function.coroutine(
                    {"job_id": "j", "job_try": job_try, "redis": redis}, _ctxkit={}
                )
        _, second = finished(span_exporter, "process job")
        assert (second.attributes or {})["ctxkit.attempt"] == 2
        assert list(second.links) == []
        assert second.status.status_code is StatusCode.ERROR

    @pytest.mark.asyncio
    async def test_cancelled_job_ends_its_span_and_resets(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        async def job(ctx: dict[str, Any]) -> None:
            assert request_id.get(None) == "r-direct"
            raise asyncio.CancelledError

        (function,) = CtxkitArq(vars=(request_id,), tracer_provider=tracer_provider).functions(
            func(job, name="job")
        )
        carrier: dict[str, str] = propagation.inject(
            {}, vars=(request_id,), context=self._with_request_id()
        )
        with pytest.raises(asyncio.CancelledError):
            await function.coroutine({"job_id": "j", "job_try": 1}, _ctxkit=carrier)
        (process,) = finished(span_exporter, "process job")
        assert process.status.status_code is StatusCode.ERROR
        assert request_id.get(None) is None

    @pytest.mark.asyncio
    async def test_a_context_that_cannot_be_restored_is_logged_and_the_job_runs(
        self, tracer_provider: TracerProvider, caplog: pytest.LogCaptureFixture
    ) -> None:
        twin: ContextVar[str] = ContextVar("request_id")
        (function,) = CtxkitArq(vars=(request_id,), tracer_provider=tracer_provider).functions(
            top_level_job
        )
        ctxkit.register(twin)  # a var registered later with a clashing name (conftest resets)
        with caplog.at_level(logging.ERROR, logger="ctxkit"):
            seen = await function.coroutine({"job_id": "j"}, _ctxkit={})
        assert seen["request_id"] is None
        assert "could not restore the context of arq job 'top_level_job'" in caplog.text

    @pytest.mark.asyncio
    async def test_a_failing_enqueue_ends_the_send_span(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        class Refusing:
            async def enqueue_job(self, function: str, *args: Any, **kwargs: Any) -> None:
                assert isinstance(kwargs[KWARG], dict)
                raise ConnectionError("redis is down")

        pool = CtxkitArq(tracer_provider=tracer_provider).instrument(Refusing())
        with pytest.raises(ConnectionError):
            await pool.enqueue_job("job")
        (send,) = finished(span_exporter, "send job")
        assert send.status.status_code is StatusCode.ERROR
        assert (send.attributes or {})["error.type"] == "ConnectionError"
        assert trace.get_current_span() is trace.INVALID_SPAN


# --- real worker processes -----------------------------------------------------------------------


@dataclass
class WorkerProcess:
    mode: Mode
    queue: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.directory / "worker.log").read_text(errors="replace")

    def spans(self) -> list[dict[str, Any]]:
        path = self.directory / "spans.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    async def span(self, name: str, span_id: object) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for span in self.spans():
                if span["name"] == name and span["span_id"] == span_id:
                    return span
            return None

        found: dict[str, Any] = await eventually(find)
        return found


async def eventually(probe: Callable[[], Any], timeout: float = 3 * TIMEOUT) -> Any:
    """Poll another process's output until ``probe`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"nothing after {timeout}s")
        await asyncio.sleep(0.05)  # polling another process, not synchronising tasks


@pytest.fixture(scope="module")
def workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Mode, WorkerProcess]]:
    started: dict[Mode, WorkerProcess] = {}
    try:
        for mode in ("child", "link"):
            directory = tmp_path_factory.mktemp(f"arq-{mode}")
            queue = f"arq:ctxkit-{mode}-{uuid.uuid4().hex[:8]}"
            env = {
                **os.environ,
                "CTXKIT_TEST_REDIS_URL": redis_url,
                "CTXKIT_TEST_QUEUE": queue,
                "CTXKIT_TEST_PROPAGATION": mode,
                "CTXKIT_TEST_OUT": str(directory),
                "PYTHONPATH": str(REPO),
            }
            with (directory / "worker.log").open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "arq", "tests.arq_app.app.WorkerSettings"],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started[mode] = WorkerProcess(mode, queue, directory, process)
        yield started
    finally:
        stop(*(worker.process for worker in started.values()))


@pytest_asyncio.fixture
async def producer(
    redis_url: str, tracer_provider: TracerProvider
) -> AsyncIterator[Callable[[str], Any]]:
    pools: list[ArqRedis] = []
    instrumentation = CtxkitArq(vars=(request_id, tenant, secret), tracer_provider=tracer_provider)

    async def make(queue: str) -> ArqRedis:
        pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue)
        pools.append(pool)
        instrumentation.instrument(pool)
        return pool

    yield make
    for pool in pools:
        await pool.aclose()


async def seen_at(pool: ArqRedis, key: str, count: int = 1) -> list[dict[str, Any]]:
    async def probe() -> list[bytes] | None:
        pending: Any = pool.lrange(key, 0, -1)  # redis-py types it sync-or-async
        items = cast("list[bytes]", await pending)
        return items if len(items) >= count else None

    found: list[bytes] = await eventually(probe)
    return [json.loads(item) for item in found]


class TestWorkerProcess:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("mode", ["child", "link"])
    async def test_worker_sees_the_request(
        self,
        mode: Mode,
        workers: dict[Mode, WorkerProcess],
        producer: Callable[[str], Any],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        worker = workers[mode]
        pool: ArqRedis = await producer(worker.queue)
        key = f"seen:{uuid.uuid4().hex}"
        with tracer_provider.get_tracer("test").start_as_current_span(
            "GET /orders", kind=SpanKind.SERVER
        ) as server:
            request_id.set(f"r-{mode}")
            tenant.set(["acme", 1])
            secret.set("never")
            job = await pool.enqueue_job("observe", key)
        assert job is not None
        (seen,) = await seen_at(pool, key)
        assert (seen["request_id"], seen["tenant"], seen["secret"]) == (
            f"r-{mode}",
            ["acme", 1],
            None,
        )
        assert seen["pid"] != os.getpid()
        process = await worker.span("process observe", seen["span_id"])
        (send,) = finished(span_exporter, "send observe")
        assert process["kind"] == "CONSUMER"
        assert process["trace_id"] == seen["trace_id"]
        assert process["attributes"]["messaging.message.id"] == job.job_id
        assert process["attributes"]["messaging.system"] == "arq"
        assert process["attributes"]["messaging.destination.name"] == "observe"
        server_trace = f"{server.get_span_context().trace_id:032x}"
        if mode == "child":
            assert process["trace_id"] == server_trace
            assert process["parent_span_id"] == hex_span(send)
        else:
            assert process["trace_id"] != server_trace
            assert process["parent_span_id"] is None
            assert process["links"] == [{"trace_id": server_trace, "span_id": hex_span(send)}]

    @pytest.mark.asyncio
    async def test_concurrent_jobs_keep_their_own_vars_and_failures_are_marked(
        self, workers: dict[Mode, WorkerProcess], producer: Callable[[str], Any]
    ) -> None:
        worker = workers["child"]
        pool: ArqRedis = await producer(worker.queue)
        key, failing = f"seen:{uuid.uuid4().hex}", f"seen:{uuid.uuid4().hex}"
        request_id.set("from-request")
        for index in range(4):  # run side by side (max_jobs = 4), each setting its own value
            await pool.enqueue_job("slow_observe", key, f"job-{index}")
        await pool.enqueue_job("fail", failing)
        seen = await seen_at(pool, key, 4)
        assert sorted(s["request_id"] for s in seen) == [f"job-{i}" for i in range(4)]
        (failed,) = await seen_at(pool, failing)
        assert failed["request_id"] == "from-request"
        process = await worker.span("process fail", failed["span_id"])
        assert process["status"] == "ERROR"
        assert process["attributes"]["error.type"] == "RuntimeError"
        # a job sent with no vars after all those sees none
        request_id.set("")
        clean = f"seen:{uuid.uuid4().hex}"
        await asyncio.create_task(pool.enqueue_job("observe", clean), context=contextvars.Context())
        (after,) = await seen_at(pool, clean)
        assert after["request_id"] is None
        assert worker.process.poll() is None

    @pytest.mark.asyncio
    async def test_retries_are_new_traces_linked_with_attempts(
        self,
        workers: dict[Mode, WorkerProcess],
        producer: Callable[[str], Any],
        span_exporter: InMemorySpanExporter,
    ) -> None:
        worker = workers["child"]
        pool: ArqRedis = await producer(worker.queue)
        key = f"seen:{uuid.uuid4().hex}"
        request_id.set("r-retry")
        await pool.enqueue_job("flaky", key)
        (seen,) = await seen_at(pool, key)
        assert seen["request_id"] == "r-retry"
        third = await worker.span("process flaky", seen["span_id"])
        assert third["attributes"]["ctxkit.attempt"] == 3
        by_attempt = {
            s["attributes"]["ctxkit.attempt"]: s
            for s in worker.spans()
            if s["name"] == "process flaky"
            and s["attributes"]["messaging.message.id"] == seen["job_id"]
        }
        assert sorted(by_attempt) == [1, 2, 3]
        (send,) = finished(span_exporter, "send flaky")
        assert by_attempt[1]["parent_span_id"] == hex_span(send)
        for attempt in (2, 3):
            span, previous = by_attempt[attempt], by_attempt[attempt - 1]
            assert span["parent_span_id"] is None
            assert span["links"] == [
                {"trace_id": hex_trace(send), "span_id": hex_span(send)},
                {"trace_id": previous["trace_id"], "span_id": previous["span_id"]},
            ]
        assert len({s["trace_id"] for s in by_attempt.values()}) == 3

    @pytest.mark.asyncio
    async def test_hostile_payload_straight_into_the_queue_runs_as_new_root(
        self, workers: dict[Mode, WorkerProcess], redis_url: str
    ) -> None:
        worker = workers["child"]
        plain = await create_pool(
            RedisSettings.from_dsn(redis_url), default_queue_name=worker.queue
        )
        try:  # no ctxkit on this pool: what a hostile producer can send
            keys = []
            for carrier in (
                {"traceparent": "garbage", "ctxkit-vars": "[" * 100_000, "tracestate": 7},
                {"ctxkit-vars": '{"request_id": "evil", "request_id": "x"}'},
                ["not", "a", "dict"],
                pickle.dumps("bytes are not a carrier"),
            ):
                key = f"seen:{uuid.uuid4().hex}"
                keys.append(key)
                await plain.enqueue_job("observe", key, _ctxkit=carrier)  # KWARG
            for key in keys:
                (seen,) = await seen_at(plain, key)
                assert seen["request_id"] is None
                process = await worker.span("process observe", seen["span_id"])
                assert process["parent_span_id"] is None
                assert process["links"] == []
        finally:
            await plain.aclose()
        log = worker.log
        for reason in ("traceparent.invalid_format", "vars.too_large", "vars.duplicate_name"):
            assert f"({reason})" in log, log
        assert "evil" not in log
        assert worker.process.poll() is None
