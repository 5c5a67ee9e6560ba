"""Tests for ctxkit.contrib.dramatiq: a StubBroker in process, then real workers on a real Redis.

The StubBroker tests check the middleware's mechanics in this process (a dramatiq ``Worker``
with one thread runs message after message). The Redis tests are what prove it: a
``redis-server`` on a free loopback port and ``python -m dramatiq`` worker processes, one per
propagation mode, each exporting its spans to a JSONL file. Actors write what they saw to Redis.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import dramatiq
import pytest
import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

import ctxkit
from ctxkit import propagation
from ctxkit.contrib.dramatiq import OPTION, CtxkitMiddleware, _attempt
from ctxkit.contrib.structlog import add_trace_ids
from ctxkit.sampling import LinkAwareSampler

from ._servers import REPO, TIMEOUT, redis_url, stop

__all__ = ["redis_url"]  # a fixture, used by name

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan

Mode = Literal["child", "link", "none"]
T = TypeVar("T")

# Same names as in tests/dramatiq_app/app.py: names, not objects, identify vars across processes.
request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[object] = ContextVar("tenant")
secret: ContextVar[str] = ContextVar("secret")

SEND_ATTRIBUTES = ("messaging.system", "messaging.operation.name", "messaging.operation.type")


@pytest.fixture(autouse=True)
def _fresh_log_once() -> Iterator[None]:
    """Each test sees the first rejection of each kind logged."""
    saved = set(propagation._logged)
    propagation._logged.clear()
    yield
    propagation._logged.clear()
    propagation._logged.update(saved)


@pytest.fixture(autouse=True)
def _own_context() -> Iterator[None]:
    """Sync tests share pytest's context: each test sets its vars in a copy, left after it."""
    context = contextvars.copy_context()
    token = _test_context.set(context)
    yield
    _test_context.reset(token)


_test_context: ContextVar[contextvars.Context] = ContextVar("_test_context")


def in_request(fn: Callable[[], T]) -> T:
    """Run ``fn`` in the test's own context (its var sets stay out of pytest's)."""
    return _test_context.get().run(fn)


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


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


def eventually(probe: Callable[[], Any], timeout: float = 3 * TIMEOUT) -> Any:
    """Poll another process's output until ``probe`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"nothing after {timeout}s")
        time.sleep(0.05)  # polling a file or another process, not synchronising tasks


# --- in process: StubBroker and a one-thread Worker ---------------------------------------------


@dataclass
class Stub:
    broker: StubBroker
    seen: list[dict[str, object]]
    actors: dict[str, dramatiq.Actor[Any, Any]]

    def run(self) -> None:
        """Process everything queued (retries too) with one worker thread, then stop it."""
        worker = dramatiq.Worker(self.broker, worker_timeout=50, worker_threads=1)
        worker.start()
        try:
            self.broker.join("default", timeout=int(3 * TIMEOUT * 1000), fail_fast=False)
            worker.join()
        finally:
            worker.stop()


def observation() -> dict[str, object]:
    span = trace.get_current_span()
    return {
        "trace_id": ctxkit.current_trace_id(),
        "span": span.get_span_context(),
        "request_id": request_id.get(None),
        "tenant": tenant.get(None),
        "secret": secret.get(None),
    }


def make_stub(
    mode: Mode,
    tracer_provider: TracerProvider,
    meter_provider: MeterProvider | None = None,
    retries: Literal["link", "child"] = "link",
) -> Stub:
    broker = StubBroker()
    broker.add_middleware(
        CtxkitMiddleware(
            vars=(request_id, tenant),
            propagation=mode,
            retries=retries,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
    )
    seen: list[dict[str, object]] = []
    runs: dict[str, int] = {}

    def observe() -> None:
        seen.append(observation())

    def fail() -> None:
        seen.append(observation())
        raise RuntimeError("boom")

    def flaky(key: str) -> None:
        runs[key] = runs.get(key, 0) + 1
        seen.append(observation())
        if runs[key] < 3:
            raise RuntimeError(f"run {runs[key]} failed")

    actors: dict[str, dramatiq.Actor[Any, Any]] = {
        # after "fail" when both wait (the leak test sends that one first): a larger number
        "observe": dramatiq.actor(broker=broker, actor_name="observe", max_retries=0, priority=10)(
            observe
        ),
        "fail": dramatiq.actor(broker=broker, actor_name="fail", max_retries=0)(fail),
        "flaky": dramatiq.actor(
            broker=broker, actor_name="flaky", max_retries=5, min_backoff=1, max_backoff=5
        )(flaky),
    }
    return Stub(broker, seen, actors)


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


class TestStub:
    @pytest.mark.parametrize("mode", ["child", "link", "none"])
    def test_actor_sees_vars_and_span_per_propagation(
        self, mode: Mode, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        stub = make_stub(mode, tracer_provider)
        tracer = tracer_provider.get_tracer("test")

        def produce() -> tuple[trace.Span, Message[Any]]:
            with tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER) as server:
                request_id.set("r-1")
                tenant.set({"id": 7})
                secret.set("never")
                return server, stub.actors["observe"].send()

        server, message = in_request(produce)
        stub.run()
        assert len(stub.seen) == 1
        seen = stub.seen[0]
        assert (seen["request_id"], seen["tenant"], seen["secret"]) == ("r-1", {"id": 7}, None)
        (send,) = finished(span_exporter, "send observe")
        (process,) = finished(span_exporter, "process observe")
        assert send.kind is SpanKind.PRODUCER
        assert send.parent is not None
        assert send.parent.span_id == server.get_span_context().span_id
        assert dict(send.attributes or {}) == {
            "messaging.system": "dramatiq",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": "observe",
            "messaging.message.id": message.message_id,
        }
        attributes = dict(process.attributes or {})
        assert process.kind is SpanKind.CONSUMER
        assert attributes["messaging.system"] == "dramatiq"
        assert attributes["messaging.operation.name"] == "process"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == "observe"
        assert attributes["messaging.message.id"] == message.message_id
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
            if mode == "link":
                assert [link.context.span_id for link in process.links] == [send.context.span_id]
            else:
                assert list(process.links) == []

    def test_carrier_is_in_the_message_options(self, tracer_provider: TracerProvider) -> None:
        stub = make_stub("child", tracer_provider)

        def produce() -> Message[Any]:
            request_id.set("r-opt")
            return stub.actors["observe"].send()

        message = in_request(produce)
        carrier = message.options[OPTION]
        assert isinstance(carrier, dict)
        assert json.loads(carrier["ctxkit-vars"]) == {"request_id": "r-opt"}
        assert all(isinstance(value, str) for value in carrier.values())

    def test_failure_marks_the_span_and_nothing_leaks_into_the_next_message(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        stub = make_stub("child", tracer_provider)
        ctx = ctxkit.clone_without_span()
        ctx.run(request_id.set, "first")
        ctx.run(stub.actors["fail"].send)
        stub.actors["observe"].send()  # sent without any var set
        stub.run()
        assert [s["request_id"] for s in stub.seen] == ["first", None]
        (process,) = finished(span_exporter, "process fail")
        assert process.status.status_code is StatusCode.ERROR
        assert (process.attributes or {})["error.type"] == "RuntimeError"
        (clean,) = finished(span_exporter, "process observe")
        assert clean.status.status_code is StatusCode.UNSET
        assert stub.seen[0]["trace_id"] != stub.seen[1]["trace_id"]

    @pytest.mark.parametrize("mode", ["child", "link"])
    def test_retries_link_to_the_producer_and_the_previous_attempt(
        self, mode: Mode, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        stub = make_stub(mode, tracer_provider)

        def produce() -> None:
            with tracer_provider.get_tracer("test").start_as_current_span("GET /retry"):
                request_id.set("r-retry")
                stub.actors["flaky"].send("k")

        in_request(produce)
        stub.run()
        assert [s["request_id"] for s in stub.seen] == ["r-retry"] * 3
        processes = finished(span_exporter, "process flaky")
        sends = finished(span_exporter, "send flaky")
        assert [(p.attributes or {})["ctxkit.attempt"] for p in processes] == [1, 2, 3]
        first_send = sends[0]
        assert len({hex_trace(p) for p in processes}) == 3
        for previous, attempt in itertools.pairwise(processes):
            assert attempt.parent is None
            assert [link.context.span_id for link in attempt.links] == [
                first_send.context.span_id,
                previous.context.span_id,
            ]
            assert (attempt.attributes or {})["ctxkit.previous_trace_id"] == hex_trace(previous)
        # the retry's send span belongs to the failed attempt's trace
        assert [hex_trace(s) for s in sends[1:]] == [hex_trace(p) for p in processes[:2]]
        assert [p.status.status_code for p in processes] == [
            StatusCode.ERROR,
            StatusCode.ERROR,
            StatusCode.UNSET,
        ]

    def test_retries_child_keeps_one_trace(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        stub = make_stub("child", tracer_provider, retries="child")
        with tracer_provider.get_tracer("test").start_as_current_span("GET /retry") as server:
            stub.actors["flaky"].send("k")
        stub.run()
        processes = finished(span_exporter, "process flaky")
        first_send = finished(span_exporter, "send flaky")[0]
        assert [(p.attributes or {})["ctxkit.attempt"] for p in processes] == [1, 2, 3]
        expected = f"{server.get_span_context().trace_id:032x}"
        assert {hex_trace(p) for p in processes} == {expected}
        for process in processes:
            assert process.parent is not None
            assert process.parent.span_id == first_send.context.span_id

    @pytest.mark.parametrize(
        ("carrier", "reasons"),
        [
            ("not a dict", {"carrier.not_mapping"}),
            (
                {"traceparent": "garbage", "ctxkit-vars": "[" * 5000},
                {"traceparent.invalid_format", "vars.too_large"},
            ),
            (
                {"traceparent": "00-" + "0" * 32 + "-0123456789abcdef-01", "ctxkit-vars": 7},
                {"traceparent.zero_trace_id", "vars.not_string"},
            ),
            ({"ctxkit-vars": '{"request_id": "evil", "request_id": "x"}'}, {"vars.duplicate_name"}),
        ],
    )
    def test_hostile_carrier_runs_as_new_root(
        self,
        carrier: object,
        reasons: set[str],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        meter_provider: MeterProvider,
        metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        stub = make_stub("child", tracer_provider, meter_provider)
        hostile: Message[Any] = Message(
            queue_name="default",
            actor_name="observe",
            args=(),
            kwargs={},
            options={OPTION: carrier},
        )
        stub.broker.queues["default"].put(hostile.encode())  # straight in, past the middleware
        stub.run()
        assert [s["request_id"] for s in stub.seen] == [None]
        (process,) = finished(span_exporter, "process observe")
        assert process.parent is None
        assert list(process.links) == []
        counts = rejected(metric_reader)
        assert reasons <= set(counts), counts
        for reason in reasons:
            assert f"({reason})" in caplog.text
        assert "evil" not in caplog.text

    def test_fake_trace_id_travels(self, tracer_provider: TracerProvider) -> None:
        stub = make_stub("child", tracer_provider)
        stub.broker.middleware[-1]._tracer_provider = trace.NoOpTracerProvider()  # type: ignore[attr-defined]
        context = ctxkit.clone_without_span()
        fake = context.run(ctxkit.current_trace_id)
        assert fake is not None
        context.run(stub.actors["observe"].send)
        stub.broker.middleware[-1]._tracer_provider = tracer_provider  # type: ignore[attr-defined]
        stub.run()
        assert stub.seen[0]["trace_id"] == fake

    @pytest.mark.parametrize("traced", [True, False])
    def test_logs_agree_with_the_span(self, traced: bool, tracer_provider: TracerProvider) -> None:
        """In the actor, current_trace_id(), TraceIdFilter and the structlog processor give
        the same ids: the process span's, or the producer's fake trace id without a trace."""
        stub = make_stub("child", tracer_provider)
        seen: list[tuple[str | None, str, str, object, object]] = []
        record_filter = ctxkit.TraceIdFilter()

        def log_ids() -> None:
            record = logging.LogRecord("app", logging.INFO, __file__, 1, "msg", (), None)
            record_filter.filter(record)
            event = add_trace_ids(None, "info", {})
            seen.append(
                (
                    ctxkit.current_trace_id(),
                    str(getattr(record, "trace_id", "")),
                    str(getattr(record, "span_id", "")),
                    event.get("trace_id"),
                    event.get("span_id"),
                )
            )

        actor = dramatiq.actor(broker=stub.broker, actor_name="log_ids")(log_ids)
        if traced:
            with tracer_provider.get_tracer("test").start_as_current_span("GET /log"):
                actor.send()
            expected = None
        else:
            context = ctxkit.clone_without_span()
            expected = context.run(ctxkit.current_trace_id)
            stub.broker.middleware[-1]._tracer_provider = trace.NoOpTracerProvider()  # type: ignore[attr-defined]
            context.run(actor.send)
            stub.broker.middleware[-1]._tracer_provider = tracer_provider  # type: ignore[attr-defined]
        stub.run()
        ((current, record_trace, record_span, event_trace, event_span),) = seen
        assert current is not None
        assert current == record_trace == event_trace
        assert record_span == event_span
        if expected is not None:
            assert current == expected  # the producer's fake id reached the logs
        else:
            assert len(record_span) == 16

    def test_unserialisable_var_ends_the_send_span_and_the_message_goes_without(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """dramatiq swallows a middleware's error while enqueueing: the send span ends with
        ERROR, dramatiq logs it, and the message goes (and runs) without a carrier."""
        stub = make_stub("child", tracer_provider)

        def produce() -> Message[Any]:
            tenant.set(object())  # not JSON-representable
            return stub.actors["observe"].send()

        message = in_request(produce)
        assert OPTION not in message.options
        (send,) = finished(span_exporter, "send observe")
        assert send.status.status_code is StatusCode.ERROR
        assert (send.attributes or {})["error.type"] == "TypeError"
        assert "before_enqueue" in caplog.text
        stub.run()
        assert [s["tenant"] for s in stub.seen] == [None]

    def test_constructor_checks_its_arguments(self) -> None:
        with pytest.raises(ValueError, match="'sideways'"):
            CtxkitMiddleware(propagation="sideways")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="'never'"):
            CtxkitMiddleware(retries="never")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="'request_id'"):
            CtxkitMiddleware(vars=("request_id",))  # type: ignore[arg-type]
        twin: ContextVar[str] = ContextVar("request_id")
        with pytest.raises(ValueError, match="request_id"):
            CtxkitMiddleware(vars=(request_id, twin))

    def test_attempt_option(self) -> None:
        assert _attempt({}) == 1
        assert _attempt({"retries": 0}) == 1
        assert _attempt({"retries": 2}) == 3
        for bad in (-1, "2", True, 10**12, None, 1.5):
            assert _attempt({"retries": bad}) == 1


# --- real workers on Redis -----------------------------------------------------------------------


@dataclass
class Worker:
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

    def span(self, name: str, span_id: object) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for span in self.spans():
                if span["name"] == name and span["span_id"] == span_id:
                    return span
            return None

        found: dict[str, Any] = eventually(find)
        return found


@pytest.fixture(scope="module")
def workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Mode, Worker]]:
    started: dict[Mode, Worker] = {}
    try:
        for mode in ("child", "link"):
            directory = tmp_path_factory.mktemp(f"dramatiq-{mode}")
            queue = f"ctxkit-{mode}-{uuid.uuid4().hex[:8]}"
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
                    [
                        sys.executable,
                        "-m",
                        "dramatiq",
                        "tests.dramatiq_app.app",
                        "--processes",
                        "1",
                        "--threads",
                        "1",
                        "--queues",
                        queue,
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started[mode] = Worker(mode, queue, directory, process)
        yield started
    finally:
        stop(*(worker.process for worker in started.values()))


@pytest.fixture
def producer(
    redis_url: str, tracer_provider: TracerProvider, workers: dict[Mode, Worker]
) -> Iterator[Callable[[Mode], dict[str, dramatiq.Actor[Any, Any]]]]:
    brokers: list[RedisBroker] = []

    def make(mode: Mode) -> dict[str, dramatiq.Actor[Any, Any]]:
        broker = RedisBroker(url=redis_url)
        broker.add_middleware(
            CtxkitMiddleware(vars=(request_id, tenant, secret), tracer_provider=tracer_provider)
        )
        brokers.append(broker)
        queue = workers[mode].queue
        return {
            name: dramatiq.actor(broker=broker, actor_name=name, queue_name=queue)(_remote)
            for name in ("observe", "fail", "flaky")
        }

    yield make
    for broker in brokers:
        broker.close()


def _remote(key: str) -> None:
    """Stands for an actor the worker defines: the producer only sends to it."""


def seen_at(redis_url: str, key: str, count: int = 1) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    try:
        found: list[bytes] = eventually(
            lambda: (items := client.lrange(key, 0, -1)) and len(items) >= count and items
        )
    finally:
        client.close()
    return [json.loads(item) for item in found]


class TestRedisWorker:
    @pytest.mark.parametrize("mode", ["child", "link"])
    def test_worker_sees_the_request(
        self,
        mode: Mode,
        workers: dict[Mode, Worker],
        producer: Callable[[Mode], dict[str, dramatiq.Actor[Any, Any]]],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        redis_url: str,
    ) -> None:
        actors = producer(mode)
        key = f"seen:{uuid.uuid4().hex}"

        def produce() -> tuple[trace.Span, Message[Any]]:
            with tracer_provider.get_tracer("test").start_as_current_span(
                "GET /orders", kind=SpanKind.SERVER
            ) as server:
                request_id.set(f"r-{mode}")
                tenant.set(["acme", 1])
                secret.set("never")
                return server, actors["observe"].send(key)

        server, message = in_request(produce)
        (seen,) = seen_at(redis_url, key)
        assert (seen["request_id"], seen["tenant"], seen["secret"]) == (
            f"r-{mode}",
            ["acme", 1],
            None,
        )
        assert seen["pid"] != os.getpid()
        worker = workers[mode]
        process = worker.span("process observe", seen["span_id"])
        (send,) = finished(span_exporter, "send observe")
        assert process["kind"] == "CONSUMER"
        assert process["trace_id"] == seen["trace_id"]
        assert process["attributes"]["messaging.message.id"] == message.message_id
        assert process["attributes"]["messaging.system"] == "dramatiq"
        assert process["attributes"]["messaging.operation.type"] == "process"
        assert process["attributes"]["messaging.destination.name"] == "observe"
        server_trace = f"{server.get_span_context().trace_id:032x}"
        if mode == "child":
            assert process["trace_id"] == server_trace
            assert process["parent_span_id"] == hex_span(send)
        else:
            assert process["trace_id"] != server_trace
            assert process["parent_span_id"] is None
            assert process["links"] == [{"trace_id": server_trace, "span_id": hex_span(send)}]
            assert process["attributes"]["ctxkit.linked_trace_id"] == server_trace

    def test_failure_is_marked_and_nothing_leaks(
        self,
        workers: dict[Mode, Worker],
        producer: Callable[[Mode], dict[str, dramatiq.Actor[Any, Any]]],
        redis_url: str,
    ) -> None:
        actors = producer("child")
        failing, clean = f"seen:{uuid.uuid4().hex}", f"seen:{uuid.uuid4().hex}"
        ctx = ctxkit.clone_without_span()
        ctx.run(request_id.set, "leaky")
        ctx.run(actors["fail"].send, failing)
        (first,) = seen_at(redis_url, failing)
        actors["observe"].send(clean)  # after the failure, on the worker's only thread
        (second,) = seen_at(redis_url, clean)
        assert first["request_id"] == "leaky"
        assert second["request_id"] is None
        assert first["pid"] == second["pid"]
        worker = workers["child"]
        process = worker.span("process fail", first["span_id"])
        assert process["status"] == "ERROR"
        assert process["attributes"]["error.type"] == "RuntimeError"
        assert worker.process.poll() is None

    def test_retries_are_new_traces_linked_with_attempts(
        self,
        workers: dict[Mode, Worker],
        producer: Callable[[Mode], dict[str, dramatiq.Actor[Any, Any]]],
        span_exporter: InMemorySpanExporter,
        redis_url: str,
    ) -> None:
        actors = producer("child")
        key = f"seen:{uuid.uuid4().hex}"

        def produce() -> None:
            request_id.set("r-retry")
            actors["flaky"].send(key)

        in_request(produce)
        (seen,) = seen_at(redis_url, key)
        assert seen["request_id"] == "r-retry"
        worker = workers["child"]
        third = worker.span("process flaky", seen["span_id"])
        assert third["attributes"]["ctxkit.attempt"] == 3
        spans = [s for s in worker.spans() if s["name"] == "process flaky"]
        by_attempt = {
            s["attributes"]["ctxkit.attempt"]: s
            for s in spans
            if s["attributes"]["messaging.message.id"]
            == third["attributes"]["messaging.message.id"]
        }
        assert sorted(by_attempt) == [1, 2, 3]
        (send,) = finished(span_exporter, "send flaky")
        assert by_attempt[1]["parent_span_id"] == hex_span(send)
        for attempt in (2, 3):
            span = by_attempt[attempt]
            previous = by_attempt[attempt - 1]
            assert span["parent_span_id"] is None
            assert span["links"] == [
                {"trace_id": hex_trace(send), "span_id": hex_span(send)},
                {"trace_id": previous["trace_id"], "span_id": previous["span_id"]},
            ]
        assert len({s["trace_id"] for s in by_attempt.values()}) == 3

    def test_hostile_payload_straight_into_the_queue_runs_as_new_root(
        self, workers: dict[Mode, Worker], redis_url: str
    ) -> None:
        plain = RedisBroker(url=redis_url)  # no ctxkit: what a hostile producer can send
        try:
            keys = []
            for carrier in (
                {"traceparent": "garbage", "ctxkit-vars": "[" * 100_000, "tracestate": 7},
                {"ctxkit-vars": '{"request_id": "evil", "request_id": "x"}'},
                ["not", "a", "dict"],
            ):
                key = f"seen:{uuid.uuid4().hex}"
                keys.append(key)
                plain.enqueue(
                    Message(
                        queue_name=workers["child"].queue,
                        actor_name="observe",
                        args=(key,),
                        kwargs={},
                        options={OPTION: carrier},
                    )
                )
            worker = workers["child"]
            for key in keys:
                (seen,) = seen_at(redis_url, key)
                assert seen["request_id"] is None
                process = worker.span("process observe", seen["span_id"])
                assert process["parent_span_id"] is None
                assert process["links"] == []
        finally:
            plain.close()
        log = worker.log
        for reason in ("traceparent.invalid_format", "vars.too_large", "vars.duplicate_name"):
            assert f"({reason})" in log, log
        assert "evil" not in log
        assert worker.process.poll() is None


# --- sampling across the queue: LinkAwareSampler end to end --------------------------------------


class SeededIds(IdGenerator):
    """Random ids from a seeded generator: the sampled fractions below are reproducible."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128) or 1


class TestSampling:
    REQUESTS = 1000
    RETRIED = 10  # every tenth job fails once, and its retry is a new, linked trace

    def test_link_aware_sampler_keeps_the_jobs_of_kept_requests(self) -> None:
        """1,000 requests each send one job, ParentBased(TraceIdRatioBased(0.1)) under
        LinkAwareSampler on both sides (two providers, as in two processes). Every kept request
        keeps its job's trace and its retry's linked trace; about 10% of everything is kept;
        the retry of a dropped request is kept only as the worker's ratio picks it."""
        web_exporter, worker_exporter = InMemorySpanExporter(), InMemorySpanExporter()
        web = TracerProvider(
            sampler=LinkAwareSampler(ParentBased(TraceIdRatioBased(0.1))), id_generator=SeededIds(1)
        )
        worker_side = TracerProvider(
            sampler=LinkAwareSampler(ParentBased(TraceIdRatioBased(0.1))), id_generator=SeededIds(2)
        )
        web.add_span_processor(SimpleSpanProcessor(web_exporter))
        worker_side.add_span_processor(SimpleSpanProcessor(worker_exporter))
        broker = StubBroker()
        broker.add_middleware(CtxkitMiddleware(tracer_provider=worker_side))
        failed: set[int] = set()

        def job(number: int) -> None:
            if number % self.RETRIED == 0 and number not in failed:
                failed.add(number)
                raise RuntimeError("first attempt fails")

        actor = dramatiq.actor(broker=broker, actor_name="job", min_backoff=1, max_backoff=5)(job)
        sender = CtxkitMiddleware(tracer_provider=web)  # the web app's own broker middleware
        web_broker = StubBroker()
        web_broker.add_middleware(sender)
        web_broker.queues = broker.queues  # the same queue, as Redis would be
        web_actor = dramatiq.actor(broker=web_broker, actor_name="job")(job)
        requests: dict[str, bool] = {}
        retried: set[str] = set()
        tracer = web.get_tracer("web")
        for number in range(self.REQUESTS):
            with tracer.start_as_current_span("GET /order", kind=SpanKind.SERVER) as server:
                web_actor.send(number)
            context = server.get_span_context()
            requests[f"{context.trace_id:032x}"] = context.trace_flags.sampled
            if number % self.RETRIED == 0:
                retried.add(f"{context.trace_id:032x}")
        assert actor.actor_name == "job"
        Stub(broker, [], {}).run()
        web.shutdown()
        worker_side.shutdown()

        processes = finished(worker_exporter, "process job")
        first = [p for p in processes if (p.attributes or {})["ctxkit.attempt"] == 1]
        retries = [p for p in processes if (p.attributes or {})["ctxkit.attempt"] == 2]
        kept = {trace_id for trace_id, sampled in requests.items() if sampled}
        # every kept request keeps its job: a child, in the request's own trace
        assert {hex_trace(p) for p in first} == kept
        # and the retry of its job: a new trace, kept because it links to a kept trace
        linked = {str((p.attributes or {})["ctxkit.linked_trace_id"]) for p in retries}
        assert kept & retried <= linked
        assert kept & retried  # the check above is not empty
        # a dropped request's retry is a root the worker's ratio decides on its own
        orphans = linked - kept
        assert orphans <= retried - kept
        assert len(orphans) <= len(retried - kept) // 4
        # about 10% of all traces (requests, and the retries' own traces) is kept
        assert 60 <= len(kept) <= 140, len(kept)
        traces = len(requests) + len(retried)
        assert 0.06 <= (len(kept) + len(retries)) / traces <= 0.15, (len(kept), len(retries))
