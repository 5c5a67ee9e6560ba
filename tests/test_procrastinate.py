"""Tests for ctxkit.contrib.procrastinate: real worker processes on a real PostgreSQL.

The module starts one PostgreSQL (``tests/_postgres.py``: ``initdb`` + ``pg_ctl`` in a
temporary directory, on a free loopback port, procrastinate's schema applied) and one
``procrastinate worker`` process per configuration (propagation child / link / none, retries
as links; and retries as children), each on its own queue with one job at a time, and stops
them all at the end. The worker's app (``tests/procrastinate_app/app.py``) is instrumented by
ctxkit; its tasks write what they saw to a JSONL file and its spans to another, which the
tests read. This test process is the producer: it defers jobs inside a SERVER span.
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

procrastinate = pytest.importorskip("procrastinate")
psycopg = pytest.importorskip("psycopg")
from opentelemetry import trace  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from procrastinate.testing import InMemoryConnector  # noqa: E402

import ctxkit  # noqa: E402
from ctxkit import propagation  # noqa: E402
from ctxkit.contrib.procrastinate import CARRIER_KWARG, instrument  # noqa: E402

from ._postgres import postgres_dsn  # noqa: E402
from ._servers import REPO, TIMEOUT, stop  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

T = TypeVar("T")

__all__ = ["postgres_dsn"]  # a fixture, used by name

# Same names as in tests/procrastinate_app/app.py: names identify vars across processes.
request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[object] = ContextVar("tenant")
secret: ContextVar[str] = ContextVar("secret")


@pytest.fixture(autouse=True)
def _fresh_log_once() -> Iterator[None]:
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


def eventually(find: Callable[[], list[Any]], count: int = 1) -> list[Any]:
    """Poll another process's output until ``find`` returns ``count`` items."""
    deadline = time.monotonic() + TIMEOUT * 3
    while True:
        found = find()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)  # polling another process's files, not synchronising tasks


@dataclass
class Worker:
    queue: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.directory / "worker.log").read_text(errors="replace")

    def _lines(self, name: str) -> list[dict[str, Any]]:
        """The complete lines the worker wrote so far (it may be writing the last one now)."""
        path = self.directory / name
        if not path.exists():
            return []
        complete, _, _being_written = path.read_text().rpartition("\n")
        return [json.loads(line) for line in complete.splitlines() if line]

    def spans(self, name: str, job_id: int) -> list[dict[str, Any]]:
        return [
            s
            for s in self._lines("spans.jsonl")
            if s["name"] == name and s["attributes"].get("messaging.message.id") == str(job_id)
        ]

    def span(self, name: str, job_id: int, count: int = 1) -> list[dict[str, Any]]:
        """The spans named ``name`` of job ``job_id`` (waiting for ``count`` of them)."""
        found = eventually(lambda: self.spans(name, job_id), count)
        assert len(found) == count, f"{name} of job {job_id}: {found}\n{self.log}"
        return sorted(found, key=lambda s: s["attributes"]["ctxkit.attempt"])

    def observed(self, key: str, count: int = 1) -> list[dict[str, Any]]:
        found = eventually(
            lambda: [o for o in self._lines("observed.jsonl") if o["key"] == key], count
        )
        assert len(found) == count, f"observed {key}: {found}\n{self.log}"
        return found

    def task_log(self) -> str:
        path = self.directory / "tasks.log"
        return path.read_text() if path.exists() else ""


CONFIGS = {"child": ("child", "link"), "link": ("link", "link"), "none": ("none", "link")}
CONFIGS["retries-child"] = ("child", "child")


def start_worker(dsn: str, directory: Path, name: str) -> Worker:
    propagation_mode, retries = CONFIGS[name]
    queue = f"ctxkit-{name}-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "CTXKIT_TEST_PG_DSN": dsn,
        "CTXKIT_TEST_PROPAGATION": propagation_mode,
        "CTXKIT_TEST_RETRIES": retries,
        "CTXKIT_TEST_OUT": str(directory),
    }
    with (directory / "worker.log").open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "procrastinate",
                "--app=tests.procrastinate_app.app.app",
                "--verbose",
                "worker",
                f"--queues={queue}",
                "--concurrency=1",
            ],
            cwd=directory,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Worker(queue, directory, process)


@pytest.fixture(scope="module")
def workers(
    postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Worker]]:
    started: dict[str, Worker] = {}
    try:
        for name in CONFIGS:
            started[name] = start_worker(postgres_dsn, tmp_path_factory.mktemp(name), name)
        yield started
    finally:
        stop(*(worker.process for worker in started.values()))


@pytest.fixture(scope="module")
def worker(workers: dict[str, Worker]) -> Worker:
    return workers["child"]


@pytest.fixture(scope="module")
def apps(postgres_dsn: str) -> Iterator[tuple[Any, Any]]:
    """The request side: an app instrumented by ctxkit, and a plain one without it."""
    producer = procrastinate.App(
        connector=procrastinate.SyncPsycopgConnector(conninfo=postgres_dsn)
    )
    plain = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=postgres_dsn))
    producer.open()
    plain.open()
    try:
        yield producer, plain
    finally:
        producer.close()
        plain.close()


@pytest.fixture
def producer(apps: tuple[Any, Any], tracer_provider: TracerProvider) -> Any:
    """The instrumented producer app, reporting to this test's tracer provider."""
    app = apps[0]
    instrument(app, vars=(request_id, tenant, secret), tracer_provider=tracer_provider)
    return app


def defer(app: Any, worker: Worker, task: str, **kwargs: Any) -> int:
    return int(app.configure_task(name=task, queue=worker.queue).defer(**kwargs))


def in_request(tracer_provider: TracerProvider, fn: Callable[[], T]) -> tuple[T, trace.SpanContext]:
    """Defer from inside a SERVER span with the vars set, as a request handler does."""
    tracer = tracer_provider.get_tracer("test")

    def run() -> tuple[T, trace.SpanContext]:
        with tracer.start_as_current_span("GET /jobs", kind=SpanKind.SERVER) as server:
            request_id.set("req-1")
            tenant.set({"id": 7})
            secret.set("do not send")
            return fn(), server.get_span_context()

    return contextvars.copy_context().run(run)


def send_span(exporter: InMemorySpanExporter, job_id: int) -> ReadableSpan:
    [span] = [
        s
        for s in exporter.get_finished_spans()
        if s.kind == SpanKind.PRODUCER
        and (s.attributes or {}).get("messaging.message.id") == str(job_id)
    ]
    return span


class TestProducer:
    def test_defer_runs_in_a_send_span_with_the_carrier(
        self,
        producer: Any,
        worker: Worker,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        postgres_dsn: str,
    ) -> None:
        """defer() inserts the job inside a PRODUCER span, a child of the request's span,
        with the messaging attributes; the job row's args hold the carrier under _ctxkit."""
        key = uuid.uuid4().hex
        job_id, server = in_request(
            tracer_provider, lambda: defer(producer, worker, "observe", key=key)
        )
        send = send_span(span_exporter, job_id)
        assert send.name == "send observe"
        assert send.parent is not None
        assert send.parent.span_id == server.span_id
        assert dict(send.attributes or {}) == {
            "messaging.system": "procrastinate",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": "observe",
            "messaging.message.id": str(job_id),
            "ctxkit.queue": worker.queue,
        }
        with psycopg.connect(postgres_dsn) as connection:
            row = connection.execute(
                "SELECT args FROM procrastinate_jobs WHERE id = %s", (job_id,)
            ).fetchone()
        assert row is not None
        args = row[0]
        assert args["key"] == key
        carrier = args[CARRIER_KWARG]
        assert carrier["traceparent"].startswith(f"00-{hex_trace(send)}-{hex_span(send)}-")
        assert json.loads(carrier["ctxkit-vars"]) == {
            "request_id": "req-1",
            "tenant": {"id": 7},
            "secret": "do not send",
        }
        worker.observed(key)

    def test_batch_defer_gets_one_span_per_job(
        self,
        producer: Any,
        worker: Worker,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """batch_defer() makes one send span per job, each job carrying its own span."""
        keys = [uuid.uuid4().hex for _ in range(3)]
        task = producer.configure_task(name="observe", queue=worker.queue)
        ids, _ = in_request(tracer_provider, lambda: task.batch_defer(*({"key": k} for k in keys)))
        sends = [send_span(span_exporter, job_id) for job_id in ids]
        assert len({hex_span(s) for s in sends}) == 3
        for key, job_id, send in zip(keys, ids, sends, strict=True):
            [seen] = worker.observed(key)
            [process] = worker.span("process observe", job_id)
            assert process["parent_span_id"] == hex_span(send)
            assert seen["request_id"] == "req-1"

    @pytest.mark.anyio
    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_defer_async(
        self,
        postgres_dsn: str,
        worker: Worker,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """defer_async() through an async connector is instrumented the same way."""
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=postgres_dsn))
        instrument(app, vars=(request_id,), tracer_provider=tracer_provider)
        key = uuid.uuid4().hex
        async with app.open_async():
            with tracer_provider.get_tracer("test").start_as_current_span("request"):
                request_id.set("async-req")
                job_id = await app.configure_task(name="observe", queue=worker.queue).defer_async(
                    key=key
                )
        send = send_span(span_exporter, job_id)
        [seen] = worker.observed(key)
        [process] = worker.span("process observe", job_id)
        assert seen["request_id"] == "async-req"
        assert process["parent_span_id"] == hex_span(send)

    def test_failed_insert_ends_the_span_with_error(
        self,
        producer: Any,
        worker: Worker,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """A defer refused by PostgreSQL (a queueing lock already taken) ends its send span
        with ERROR and error.type; the exception reaches the caller unchanged."""
        lock = uuid.uuid4().hex
        task = producer.configure_task(
            name="observe", queue=f"{worker.queue}-parked", queueing_lock=lock
        )
        task.defer(key="parked")
        with pytest.raises(procrastinate.exceptions.AlreadyEnqueued):
            task.defer(key="parked")
        spans = [s for s in span_exporter.get_finished_spans() if s.name == "send observe"]
        assert [s.status.status_code for s in spans] == [StatusCode.UNSET, StatusCode.ERROR]
        assert (spans[1].attributes or {})["error.type"] == "AlreadyEnqueued"

    def test_unserialisable_var_fails_before_insert(
        self, producer: Any, worker: Worker, span_exporter: InMemorySpanExporter
    ) -> None:
        """A carried var that is not JSON makes defer() raise TypeError, inserting nothing."""

        def run() -> None:
            request_id.set(object())  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="request_id"):
                defer(producer, worker, "observe", key="never")

        contextvars.copy_context().run(run)
        [span] = span_exporter.get_finished_spans()
        assert span.status.status_code == StatusCode.ERROR


class TestWorker:
    @pytest.mark.parametrize("mode", ["child", "link", "none"])
    def test_relation_vars_and_attributes(
        self,
        mode: str,
        producer: Any,
        workers: dict[str, Worker],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """The job runs in a CONSUMER span related to the send span as propagation says,
        with the allowed vars (not secret), the carrier stripped from its kwargs, and
        current_trace_id() and the log filter agreeing with the span."""
        worker = workers[mode]
        key = uuid.uuid4().hex
        job_id, server = in_request(
            tracer_provider, lambda: defer(producer, worker, "observe", key=key)
        )
        send = send_span(span_exporter, job_id)
        [seen] = worker.observed(key)
        [process] = worker.span("process observe", job_id)
        assert process["kind"] == "CONSUMER"
        assert process["status"] == "UNSET"
        attributes = process["attributes"]
        assert attributes["messaging.system"] == "procrastinate"
        assert attributes["messaging.operation.name"] == "process"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == "observe"
        assert attributes["ctxkit.queue"] == worker.queue
        assert attributes["ctxkit.attempt"] == 1
        if mode == "child":
            assert process["trace_id"] == hex_trace(send)
            assert process["parent_span_id"] == hex_span(send)
            assert process["links"] == []
        elif mode == "link":
            assert process["trace_id"] != hex_trace(send)
            assert process["parent_span_id"] is None
            assert process["links"] == [{"trace_id": hex_trace(send), "span_id": hex_span(send)}]
            assert attributes["ctxkit.linked_trace_id"] == hex_trace(send)
        else:
            assert process["trace_id"] != hex_trace(send)
            assert process["parent_span_id"] is None
            assert process["links"] == []
        assert seen["request_id"] == "req-1"
        assert seen["tenant"] == {"id": 7}
        assert seen["secret"] is None
        assert seen["kwargs"] == ["key"]
        assert seen["span_id"] == process["span_id"]
        assert seen["trace_id"] == process["trace_id"]
        assert f"{process['trace_id']} observed {key}" in worker.task_log()
        assert seen["structlog"] == {"trace_id": process["trace_id"], "span_id": process["span_id"]}
        assert send.context is not None
        assert send.context.trace_id == server.trace_id

    def test_sync_task_sees_the_context(
        self, producer: Any, worker: Worker, tracer_provider: TracerProvider
    ) -> None:
        """A sync task, run in a thread, sees the vars and the process span."""
        key = uuid.uuid4().hex
        job_id, _ = in_request(
            tracer_provider, lambda: defer(producer, worker, "observe_sync", key=key)
        )
        [seen] = worker.observed(key)
        [process] = worker.span("process observe_sync", job_id)
        assert seen["thread"] != "MainThread"
        assert seen["request_id"] == "req-1"
        assert seen["span_id"] == process["span_id"]

    def test_failure_marks_the_span_and_the_worker_carries_on(
        self, producer: Any, worker: Worker, tracer_provider: TracerProvider
    ) -> None:
        """A task that raises gets status ERROR and error.type; the next job still runs."""
        key = uuid.uuid4().hex
        job_id, _ = in_request(tracer_provider, lambda: defer(producer, worker, "fail", key=key))
        [process] = worker.span("process fail", job_id)
        assert process["status"] == "ERROR"
        assert process["attributes"]["error.type"] == "RuntimeError"
        assert "exception" in process["events"]
        after = uuid.uuid4().hex
        defer(producer, worker, "observe", key=after)
        worker.observed(after)
        assert worker.process.poll() is None

    def test_nothing_leaks_into_the_next_job(
        self, producer: Any, apps: tuple[Any, Any], worker: Worker, tracer_provider: TracerProvider
    ) -> None:
        """A job that sets vars leaves nothing behind: the next job of the same worker (one
        at a time), deferred without ctxkit, sees no vars and a trace of its own."""
        first, second = uuid.uuid4().hex, uuid.uuid4().hex
        job_id, _ = in_request(
            tracer_provider, lambda: defer(producer, worker, "set_and_observe", key=first)
        )
        [seen_first] = worker.observed(first)
        assert seen_first["request_id"] == "leaked"  # set by the task itself
        other = defer(apps[1], worker, "observe", key=second)
        [seen_second] = worker.observed(second)
        [process] = worker.span("process observe", other)
        assert seen_second["request_id"] is None
        assert seen_second["tenant"] is None
        assert seen_second["trace_id"] == process["trace_id"]
        assert process["trace_id"] != seen_first["trace_id"]
        assert process["parent_span_id"] is None
        assert job_id != other

    def test_fake_trace_id_travels(self, producer: Any, worker: Worker) -> None:
        """Inside a request with no trace, ctxkit's fake trace id travels: the task's
        current_trace_id() and its log lines carry it; the span records it."""
        instrument(producer, vars=(request_id,), tracer_provider=trace.NoOpTracerProvider())
        context = ctxkit.clone_without_span()
        fake = context.run(ctxkit.current_trace_id)
        assert fake is not None
        key = uuid.uuid4().hex
        job_id = context.run(defer, producer, worker, "observe", key=key)
        [seen] = worker.observed(key)
        [process] = worker.span("process observe", job_id)
        assert seen["trace_id"] == fake
        assert process["attributes"]["ctxkit.fake_trace_id"] == fake
        assert f"{fake} observed {key}" in worker.task_log()
        assert seen["structlog"]["trace_id"] == fake


class TestRetries:
    def test_retries_link_to_the_producer_and_the_previous_attempt(
        self,
        producer: Any,
        worker: Worker,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """retries="link": attempt 1 is a child of the send span; attempts 2 and 3 each
        start a new trace linked to the send span and to the attempt before."""
        key = uuid.uuid4().hex
        job_id, _ = in_request(tracer_provider, lambda: defer(producer, worker, "flaky", key=key))
        send = send_span(span_exporter, job_id)
        attempts = worker.span("process flaky", job_id, count=3)
        seen = worker.observed(key, count=3)
        assert [a["attributes"]["ctxkit.attempt"] for a in attempts] == [1, 2, 3]
        assert [a["status"] for a in attempts] == ["ERROR", "ERROR", "UNSET"]
        first, second, third = attempts
        assert first["trace_id"] == hex_trace(send)
        assert first["parent_span_id"] == hex_span(send)
        producer_link = {"trace_id": hex_trace(send), "span_id": hex_span(send)}
        for previous, attempt in ((first, second), (second, third)):
            assert attempt["parent_span_id"] is None
            assert attempt["trace_id"] not in (hex_trace(send), previous["trace_id"])
            assert attempt["links"] == [
                producer_link,
                {"trace_id": previous["trace_id"], "span_id": previous["span_id"]},
            ]
            assert attempt["attributes"]["ctxkit.previous_trace_id"] == previous["trace_id"]
            assert attempt["attributes"]["ctxkit.linked_trace_id"] == hex_trace(send)
        assert {s["request_id"] for s in seen} == {"req-1"}
        assert all(s["kwargs"] == ["key"] for s in seen)

    def test_retries_child_keep_one_trace(
        self,
        producer: Any,
        workers: dict[str, Worker],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """retries="child": every attempt is a child of the first send span."""
        worker = workers["retries-child"]
        key = uuid.uuid4().hex
        job_id, _ = in_request(tracer_provider, lambda: defer(producer, worker, "flaky", key=key))
        send = send_span(span_exporter, job_id)
        attempts = worker.span("process flaky", job_id, count=3)
        assert [a["attributes"]["ctxkit.attempt"] for a in attempts] == [1, 2, 3]
        for attempt in attempts:
            assert attempt["trace_id"] == hex_trace(send)
            assert attempt["parent_span_id"] == hex_span(send)
            assert attempt["links"] == []


def insert_job(dsn: str, queue: str, task: str, args: object) -> int:
    """Insert a job straight into procrastinate's table, as a hostile producer could."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            "VALUES (%s, %s, %s::jsonb) RETURNING id",
            (queue, task, json.dumps(args)),
        ).fetchone()
    assert row is not None
    return int(row[0])


class TestUntrustedCarriers:
    def test_hostile_carriers_run_as_new_roots(self, worker: Worker, postgres_dsn: str) -> None:
        """Jobs inserted straight into the queue with garbage, malformed, oversized or hostile
        carriers never fail: each runs as a new root without vars, the carrier never reaches
        the task, and each kind of rejection is logged (never the carrier's content)."""
        carriers: list[object] = [
            "garbage",
            ["not", "a", "mapping"],
            {
                "traceparent": "00-" + "0" * 32 + "-0123456789abcdef-01",
                "ctxkit-vars": '{"request_id": "evil", "request_id": "x"}',
                "ctxkit-trace-id": "not hex",
            },
            {"traceparent": "garbage", "ctxkit-vars": "[" * 50000, "tracestate": 7},
            {"ctxkit-vars": ["not", "a", "string"], "ctxkit-producer": {"evil": True}},
            {"ctxkit-vars": '{"request_id": "' + "e" * 100_000 + '"}'},
        ]
        keys = []
        for carrier in carriers:
            key = uuid.uuid4().hex
            keys.append(
                (
                    key,
                    insert_job(
                        postgres_dsn,
                        worker.queue,
                        "observe",
                        {
                            "key": key,
                            CARRIER_KWARG: carrier,
                        },
                    ),
                )
            )
        for key, job_id in keys:
            [seen] = worker.observed(key)
            [process] = worker.span("process observe", job_id)
            assert seen["request_id"] is None
            assert seen["kwargs"] == ["key"]
            assert process["parent_span_id"] is None
            assert process["links"] == []
            assert process["status"] == "UNSET"
        log = worker.log
        for reason in (
            "carrier.not_mapping",
            "traceparent.zero_trace_id",
            "vars.duplicate_name",
            "trace_id.invalid",
            "traceparent.invalid_format",
            "vars.too_large",
            "vars.not_string",
        ):
            assert f"({reason})" in log, log
            assert log.count(f"({reason})") == 1, log
        # procrastinate logs each job's kwargs, the carrier included, before any middleware
        # runs (docs/procrastinate.md says so); ctxkit's own lines never hold its content.
        ctxkit_lines = [line for line in log.splitlines() if ":ctxkit:" in line]
        assert ctxkit_lines
        assert not [line for line in ctxkit_lines if "evil" in line or "eeee" in line]
        assert worker.process.poll() is None

    def test_job_without_carrier_runs_as_new_root(
        self, apps: tuple[Any, Any], worker: Worker
    ) -> None:
        """A job deferred without ctxkit has no carrier: it runs as a new root, unrejected."""
        key = uuid.uuid4().hex
        job_id = defer(apps[1], worker, "observe", key=key)
        [seen] = worker.observed(key)
        [process] = worker.span("process observe", job_id)
        assert seen["request_id"] is None
        assert process["parent_span_id"] is None
        assert seen["trace_id"] == process["trace_id"]


class TestRejectedMetric:
    def test_rejections_are_counted(
        self,
        postgres_dsn: str,
        meter_provider: MeterProvider,
        metric_reader: InMemoryMetricReader,
        tracer_provider: TracerProvider,
    ) -> None:
        """A worker middleware run in process counts a rejected carrier in
        ctxkit.propagation.rejected (the worker processes count theirs the same way)."""
        import asyncio

        connector = InMemoryConnector()
        app = procrastinate.App(connector=connector)
        instrument(app, tracer_provider=tracer_provider, meter_provider=meter_provider)

        @app.task(name="noop")
        def noop() -> None:
            pass

        async def run() -> None:
            async with app.open_async():
                job_id = await noop.defer_async()
                connector.jobs[job_id]["args"][CARRIER_KWARG] = "garbage"
                await app.run_worker_async(wait=False)

        asyncio.run(run())
        data = metric_reader.get_metrics_data()
        assert data is not None
        points = [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "ctxkit.propagation.rejected"
            for point in metric.data.data_points
        ]
        assert [(p.attributes, getattr(p, "value", None)) for p in points] == [
            ({"ctxkit.reason": "carrier.not_mapping"}, 1)
        ]


class TestInProcessWorker:
    """The worker middleware run in this process (InMemoryConnector), for what the worker
    processes cannot show: logs of this process, a connector that cannot save a carrier."""

    def run_worker(self, app: Any) -> None:
        import asyncio

        async def run() -> None:
            async with app.open_async():
                await app.run_worker_async(wait=False, install_signal_handlers=False)

        asyncio.run(run())

    def test_retry_links_to_the_producer_when_the_carrier_cannot_be_saved(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A connector that cannot run ctxkit's UPDATE (procrastinate's in-memory one) does
        not fail the job: the failure is logged and the retry links to the producer only."""
        import asyncio

        app = procrastinate.App(connector=InMemoryConnector())
        instrument(app, vars=(request_id,), tracer_provider=tracer_provider)
        seen: list[str | None] = []

        @app.task(name="flaky_local", pass_context=True, retry=1)
        async def flaky_local(context: Any) -> None:
            seen.append(request_id.get(None))
            if context.job.attempts == 0:
                raise RuntimeError("first attempt fails")

        async def produce() -> None:
            async with app.open_async():
                with tracer_provider.get_tracer("test").start_as_current_span("request"):
                    request_id.set("local")
                    await flaky_local.defer_async()

        asyncio.run(produce())
        with caplog.at_level("WARNING", logger="ctxkit"):
            self.run_worker(app)
        assert seen == ["local", "local"]
        [send] = [s for s in span_exporter.get_finished_spans() if s.name == "send flaky_local"]
        first, second = sorted(
            (s for s in span_exporter.get_finished_spans() if s.name == "process flaky_local"),
            key=lambda s: str((s.attributes or {})["ctxkit.attempt"]),
        )
        assert first.status.status_code == StatusCode.ERROR
        assert first.parent is not None
        assert first.parent.span_id == int(hex_span(send), 16)
        assert second.parent is None
        assert [link.context.span_id for link in second.links] == [int(hex_span(send), 16)]
        assert "could not save the context" in caplog.text

    @pytest.mark.parametrize(("retries", "retry"), [("link", 0), ("child", 1)])
    def test_failure_without_a_carrier_write(
        self,
        retries: Any,
        retry: int,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A failing job that its task does not retry, or any failing job with
        retries="child", gets an ERROR span and no carrier write (nothing logged about one)."""
        app = procrastinate.App(connector=InMemoryConnector())
        instrument(app, retries=retries, tracer_provider=tracer_provider)

        @app.task(name="fail_local", retry=retry)
        def fail_local() -> None:
            raise ValueError("no retry")

        fail_local.defer()
        with caplog.at_level("WARNING", logger="ctxkit"):
            self.run_worker(app)
        processes = [
            s for s in span_exporter.get_finished_spans() if s.name == "process fail_local"
        ]
        assert len(processes) == retry + 1
        process = processes[-1]
        assert process.status.status_code == StatusCode.ERROR
        assert (process.attributes or {})["error.type"] == "ValueError"
        assert "could not save" not in caplog.text

    def test_a_failing_restore_still_runs_the_job(
        self,
        tracer_provider: TracerProvider,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """If ctxkit cannot restore a job's context, the job runs without it (logged), and
        still without the carrier among its kwargs."""
        from ctxkit.contrib import procrastinate as contrib

        def broken(*args: object, **kwargs: object) -> Any:
            raise RuntimeError("broken")

        app = procrastinate.App(connector=InMemoryConnector())
        instrument(app, tracer_provider=tracer_provider)
        ran: list[dict[str, Any]] = []

        @app.task(name="kw_local")
        def kw_local(**kwargs: Any) -> None:
            ran.append(kwargs)

        kw_local.defer(x=1)
        monkeypatch.setattr(contrib, "consume", broken)
        with caplog.at_level("ERROR", logger="ctxkit"):
            self.run_worker(app)
        assert ran == [{"x": 1}]
        assert "could not restore the context of procrastinate job 'kw_local'" in caplog.text

    def test_failed_async_insert_ends_the_span_with_error(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """defer_async() refused (a queueing lock already taken) ends its send span with
        ERROR; the exception reaches the caller unchanged."""
        import asyncio

        app = procrastinate.App(connector=InMemoryConnector())
        instrument(app, tracer_provider=tracer_provider)

        @app.task(name="locked", queueing_lock="one")
        async def locked() -> None:
            pass

        async def produce() -> None:
            async with app.open_async():
                await locked.defer_async()
                with pytest.raises(procrastinate.exceptions.AlreadyEnqueued):
                    await locked.defer_async()

        asyncio.run(produce())
        spans = [s for s in span_exporter.get_finished_spans() if s.name == "send locked"]
        assert [s.status.status_code for s in spans] == [StatusCode.UNSET, StatusCode.ERROR]

    def test_send_span_is_current_during_the_insert(
        self, tracer_provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The insert of a single job runs with its send span current (database
        instrumentations see it as their parent); a batch's insert runs in the caller's."""
        import asyncio

        connector = InMemoryConnector()
        app = procrastinate.App(connector=connector)
        instrument(app, tracer_provider=tracer_provider)
        current: list[str] = []
        inner = connector.defer_jobs_all

        async def recording(jobs: Any) -> Any:
            current.append(getattr(trace.get_current_span(), "name", "?"))
            return await inner(jobs)

        monkeypatch.setattr(connector, "defer_jobs_all", recording)

        @app.task(name="current")
        async def current_task() -> None:
            pass

        async def produce() -> None:
            async with app.open_async():
                with tracer_provider.get_tracer("test").start_as_current_span("request"):
                    await current_task.defer_async()
                    await current_task.batch_defer_async({}, {})

        asyncio.run(produce())
        assert current == ["send current", "request"]

    def test_attempt_of_a_job_with_a_bad_count(self) -> None:
        """A job whose attempt count is not a non-negative int is attempt 1."""
        from types import SimpleNamespace

        from ctxkit.contrib.procrastinate import _attempt

        assert _attempt(SimpleNamespace(attempts=2)) == 3  # type: ignore[arg-type]
        for bad in (-1, True, None, "2"):
            assert _attempt(SimpleNamespace(attempts=bad)) == 1  # type: ignore[arg-type]


class TestOptions:
    def test_not_an_app(self) -> None:
        """instrument() refuses what is not a procrastinate App, naming it."""
        with pytest.raises(TypeError, match="'nope'"):
            instrument("nope")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("options", "error", "match"),
        [
            ({"propagation": "sideways"}, ValueError, "sideways"),
            ({"retries": "never"}, ValueError, "never"),
            ({"vars": ["request_id"]}, TypeError, "request_id"),
        ],
    )
    def test_bad_options(self, options: dict[str, Any], error: type[Exception], match: str) -> None:
        """A bad option raises at once, naming the value, and leaves the app untouched."""
        app = procrastinate.App(connector=InMemoryConnector())
        with pytest.raises(error, match=match):
            instrument(app, **options)
        assert "worker_middleware" not in app.worker_defaults

    def test_instrument_twice_replaces_the_options(self) -> None:
        """Instrumenting the same app again keeps one middleware, with the new options."""
        app = procrastinate.App(connector=InMemoryConnector())
        instrument(app)
        instrument(app, propagation="link")
        assert len(app.worker_defaults["worker_middleware"]) == 1
