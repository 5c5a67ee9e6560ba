"""Tests for ctxkit.contrib.taskiq: in-memory brokers, then a real worker process on a real Redis.

The in-memory tests are fast and check the middleware's mechanics (each message runs in a fresh,
empty context, as in another process). The Redis tests are what prove it: a ``redis-server`` on
a free loopback port and ``python -m taskiq worker`` processes, one per propagation mode, each
in its own temporary directory. The tasks return what they saw; the worker exports its spans to
a JSONL file.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import gc
import json
import logging
import os
import subprocess
import sys
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import SpanKind, StatusCode
from taskiq import (
    AsyncTaskiqTask,
    InMemoryBroker,
    NoResultError,
    SimpleRetryMiddleware,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
)
from taskiq.brokers.inmemory_broker import InmemoryResultBackend
from taskiq.exceptions import SendTaskError
from taskiq.kicker import AsyncKicker
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

import ctxkit
from ctxkit import propagation
from ctxkit.contrib.taskiq import CtxkitMiddleware, _attempt

from ._servers import REPO, TIMEOUT, redis_url, stop

__all__ = ["redis_url"]  # a fixture, used by name

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from taskiq.message import BrokerMessage

Mode = Literal["child", "link", "none"]
MODES: tuple[Mode, ...] = ("child", "link", "none")


# Same names as in tests/taskiq_app/app.py: names, not objects, identify vars across processes.
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


def hex_span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def rejected(reader: InMemoryMetricReader) -> dict[str, int]:
    """Return the ctxkit.propagation.rejected counts by reason."""
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    if data is None:
        return counts
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "ctxkit.propagation.rejected":
                    continue
                for point in metric.data.data_points:
                    reason = str((point.attributes or {})["ctxkit.reason"])
                    counts[reason] = int(getattr(point, "value", 0))
    return counts


# --- in-memory broker ----------------------------------------------------------------------------


class IsolatedBroker(InMemoryBroker):
    """An in-memory broker that runs each message in a fresh, empty context, like a worker would."""

    async def kick(self, message: BrokerMessage) -> None:
        task = asyncio.create_task(
            self.receiver.callback(message=message.message), context=contextvars.Context()
        )
        self._running_tasks.add(task)
        task.add_done_callback(self._running_tasks.discard)

    async def run_raw(self, data: bytes) -> None:
        """Run a message as it came off the wire, in a fresh context."""
        await asyncio.create_task(
            self.receiver.callback(message=data), context=contextvars.Context()
        )


@dataclass
class Memory:
    broker: IsolatedBroker
    seen: list[dict[str, object]]


def observation() -> dict[str, object]:
    span = trace.get_current_span()
    return {
        "trace_id": ctxkit.current_trace_id(),
        "span": span,
        "request_id": request_id.get(None),
        "tenant": tenant.get(None),
        "secret": secret.get(None),
    }


def make_memory(
    mode: Mode,
    tracer_provider: TracerProvider,
    meter_provider: MeterProvider | None = None,
    broker: IsolatedBroker | None = None,
) -> Memory:
    target = IsolatedBroker() if broker is None else broker
    target.add_middlewares(
        CtxkitMiddleware(
            vars=(request_id, tenant),
            propagation=mode,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
    )
    seen: list[dict[str, object]] = []

    @target.task(task_name="observe")
    async def observe() -> None:
        seen.append(observation())

    @target.task(task_name="observe_sync")
    def observe_sync() -> None:
        seen.append(observation())

    @target.task(task_name="fail")
    async def fail() -> None:
        raise RuntimeError("boom")

    @target.task(task_name="no_result")
    async def no_result() -> None:
        raise NoResultError

    return Memory(target, seen)


@pytest_asyncio.fixture
async def memory(tracer_provider: TracerProvider) -> AsyncIterator[Memory]:
    result = make_memory("child", tracer_provider)
    await result.broker.startup()
    yield result
    await result.broker.shutdown()


async def kick(broker: InMemoryBroker, task_name: str, **labels: Any) -> AsyncTaskiqTask[Any]:
    kicker: AsyncKicker[Any, Any] = AsyncKicker(task_name=task_name, broker=broker, labels={})
    return await kicker.with_labels(**labels).kiq()


def raw_message(task_name: str, labels: object, labels_types: object = None) -> bytes:
    return json.dumps(
        {
            "task_id": uuid.uuid4().hex,
            "task_name": task_name,
            "labels": labels,
            "labels_types": labels_types,
            "args": [],
            "kwargs": {},
        }
    ).encode()


class TestInMemory:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("task_name", ["observe", "observe_sync"])
    async def test_task_sees_vars_and_span_in_the_request_trace(
        self,
        memory: Memory,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        task_name: str,
    ) -> None:
        """An async or sync task sees the kicker's vars and runs in process <task>, a child of
        send <task>, itself a child of the request's span."""
        with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
            request_id.set("r-1")
            tenant.set({"id": 7, "tags": ["a"]})
            await kick(memory.broker, task_name)
        await memory.broker.wait_all()
        [seen] = memory.seen
        spans = {span.name: span for span in span_exporter.get_finished_spans()}
        send, process = spans[f"send {task_name}"], spans[f"process {task_name}"]
        assert seen["request_id"] == "r-1"
        assert seen["tenant"] == {"id": 7, "tags": ["a"]}
        assert seen["span"] is not None
        assert seen["trace_id"] == f"{request.get_span_context().trace_id:032x}"
        assert send.kind is SpanKind.PRODUCER
        assert send.parent is not None
        assert send.parent.span_id == request.get_span_context().span_id
        assert process.kind is SpanKind.CONSUMER
        assert process.parent is not None
        assert process.parent.span_id == send.context.span_id
        assert dict(send.attributes or {}) == {
            "messaging.system": "taskiq",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": task_name,
            "messaging.message.id": (process.attributes or {})["messaging.message.id"],
        }
        assert (process.attributes or {})["messaging.system"] == "taskiq"
        assert (process.attributes or {})["messaging.operation.type"] == "process"
        assert (process.attributes or {})["messaging.operation.name"] == "process"
        assert (process.attributes or {})["ctxkit.attempt"] == 1
        assert (process.attributes or {})["ctxkit.async"] is True
        assert process.status.status_code is StatusCode.UNSET

    @pytest.mark.asyncio
    @pytest.mark.parametrize("mode", ["link", "none"])
    async def test_link_and_none_start_new_traces(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        mode: Mode,
    ) -> None:
        """With link or none the task's span starts a new trace, linked to send <task> or not."""
        memory = make_memory(mode, tracer_provider)
        await memory.broker.startup()
        try:
            with tracer_provider.get_tracer("test").start_as_current_span("request"):
                request_id.set("r-2")
                await kick(memory.broker, "observe")
            await memory.broker.wait_all()
        finally:
            await memory.broker.shutdown()
        spans = {span.name: span for span in span_exporter.get_finished_spans()}
        send, process = spans["send observe"], spans["process observe"]
        assert memory.seen[0]["request_id"] == "r-2"
        assert process.parent is None
        assert hex_trace(process) != hex_trace(send)
        assert memory.seen[0]["trace_id"] == hex_trace(process)
        if mode == "link":
            assert [(link.context.trace_id, link.context.span_id) for link in process.links] == [
                (int(hex_trace(send), 16), hex_span_id(send))
            ]
        else:
            assert list(process.links) == []

    @pytest.mark.asyncio
    async def test_failing_task_marks_its_span(
        self, memory: Memory, span_exporter: InMemorySpanExporter
    ) -> None:
        """A task that raises leaves its process span with status ERROR, error.type and the
        exception recorded; the send span is fine."""
        task = await kick(memory.broker, "fail")
        await memory.broker.wait_all()
        result = await task.wait_result(timeout=TIMEOUT)
        assert result.is_err
        spans = {span.name: span for span in span_exporter.get_finished_spans()}
        process = spans["process fail"]
        assert process.status.status_code is StatusCode.ERROR
        assert (process.attributes or {})["error.type"] == "RuntimeError"
        assert [event.name for event in process.events] == ["exception"]
        assert spans["send fail"].status.status_code is StatusCode.UNSET

    @pytest.mark.asyncio
    async def test_no_result_error_is_not_a_failure(
        self, memory: Memory, span_exporter: InMemorySpanExporter
    ) -> None:
        """NoResultError only tells taskiq not to store a result: the span stays UNSET."""
        await kick(memory.broker, "no_result")
        await memory.broker.wait_all()
        spans = {span.name: span for span in span_exporter.get_finished_spans()}
        assert spans["process no_result"].status.status_code is StatusCode.UNSET

    @pytest.mark.asyncio
    async def test_unserialisable_var_fails_the_kick(
        self, memory: Memory, span_exporter: InMemorySpanExporter
    ) -> None:
        """A carried var that is not JSON makes kiq() raise TypeError naming it; nothing is
        sent and the send span ends with ERROR."""
        tenant.set(object())
        with pytest.raises(TypeError, match="'tenant'"):
            await kick(memory.broker, "observe")
        await memory.broker.wait_all()
        assert memory.seen == []
        [send] = span_exporter.get_finished_spans()
        assert send.status.status_code is StatusCode.ERROR
        assert (send.attributes or {})["error.type"] == "TypeError"

    @pytest.mark.asyncio
    async def test_labels_typed_as_strings(self, memory: Memory) -> None:
        """The middleware's labels are declared as strings, so taskiq's label parsing keeps
        them as sent; a stale trace label from a previous kick is replaced."""
        message = TaskiqMessage(
            task_id="1",
            task_name="observe",
            labels={"traceparent": "stale", "ctxkit-trace-id": "stale", "keep": "1"},
            labels_types={"traceparent": 1, "ctxkit-trace-id": 1, "keep": 1},
            args=[],
            kwargs={},
        )
        [middleware] = memory.broker.middlewares
        request_id.set("r-3")
        sent = middleware.pre_send(message)
        assert isinstance(sent, TaskiqMessage)
        middleware.post_send(sent)
        assert sent.labels["keep"] == "1"
        assert sent.labels["traceparent"].startswith("00-")  # the send span's
        assert "ctxkit-trace-id" not in sent.labels  # a valid span: the stale fake id goes
        assert sent.labels["ctxkit-vars"] == '{"request_id":"r-3"}'
        assert sent.labels_types == {"traceparent": 3, "keep": 1, "ctxkit-vars": 3}  # 3 is STR

    @pytest.mark.asyncio
    async def test_garbage_labels_run_as_new_root(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        meter_provider: MeterProvider,
        metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Labels of the wrong types or shapes never break the task: it runs as a new root
        without the vars, and each kind of garbage is counted and logged once."""
        memory = make_memory("child", tracer_provider, meter_provider)
        await memory.broker.startup()
        labels: object = {
            "traceparent": 12345,
            "tracestate": {"a": 1},
            "ctxkit-vars": ["request_id", "evil"],
            "ctxkit-trace-id": None,
        }
        garbage = [
            raw_message("observe", labels),
            raw_message("observe", {"traceparent": "00-zz", "ctxkit-vars": '{"request_id": "ev'}),
            raw_message("observe", {"traceparent": "00-zz", "ctxkit-vars": '{"request_id": "ev'}),
        ]
        try:
            with caplog.at_level(logging.WARNING, logger="ctxkit"):
                for data in garbage:
                    await memory.broker.run_raw(data)
        finally:
            await memory.broker.shutdown()
        assert [seen["request_id"] for seen in memory.seen] == [None, None, None]
        processes = [s for s in span_exporter.get_finished_spans() if s.name == "process observe"]
        assert len(processes) == 3
        assert all(span.parent is None for span in processes)
        assert len({hex_trace(span) for span in processes}) == 3
        assert rejected(metric_reader) == {
            "traceparent.invalid_format": 3,
            "vars.not_string": 1,
            "vars.invalid_json": 2,
        }
        messages = [r.getMessage() for r in caplog.records if r.name == "ctxkit"]
        assert len(messages) == 3  # once per kind, not per message
        assert not any("evil" in message or "ev'" in message for message in messages)

    @pytest.mark.asyncio
    async def test_bytes_labels_are_decoded(
        self, memory: Memory, span_exporter: InMemorySpanExporter
    ) -> None:
        """Labels a broker hands back as bytes (here typed BYTES) are decoded as UTF-8."""
        traceparent = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
        labels = {
            "traceparent": base64.b64encode(traceparent.encode()).decode(),
            "ctxkit-vars": base64.b64encode(b'{"request_id":"r-b"}').decode(),
        }
        await memory.broker.run_raw(
            raw_message("observe", labels, {"traceparent": 6, "ctxkit-vars": 6})
        )
        [seen] = memory.seen
        assert seen["request_id"] == "r-b"
        assert seen["trace_id"] == "0123456789abcdef0123456789abcdef"
        [process] = span_exporter.get_finished_spans()
        assert process.parent is not None
        assert process.parent.span_id == 0x0123456789ABCDEF

    @pytest.mark.asyncio
    async def test_in_place_broker_restores_the_callers_context(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """With await_inplace the task runs in the kicker's own task; afterwards the kicker's
        span and vars are exactly as before."""
        broker = InMemoryBroker(await_inplace=True).with_middlewares(
            CtxkitMiddleware(vars=(request_id,), tracer_provider=tracer_provider)
        )
        seen: list[dict[str, object]] = []

        @broker.task(task_name="observe")
        async def observe() -> None:
            seen.append(observation())

        await broker.startup()
        try:
            with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
                request_id.set("r-4")
                await observe.kiq()
                assert trace.get_current_span() is request
                assert request_id.get() == "r-4"
        finally:
            await broker.shutdown()
        spans = {span.name: span for span in span_exporter.get_finished_spans()}
        process = spans["process observe"]
        seen_span = seen[0]["span"]
        assert isinstance(seen_span, trace.Span)
        assert seen_span.get_span_context() == process.context
        assert process.parent is not None
        assert process.parent.span_id == hex_span_id(spans["send observe"])

    @pytest.mark.asyncio
    async def test_exception_without_text(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """A task raising an exception whose __str__ raises, run in the kicker's own task: the
        result holds that exception, the process span is exported as ERROR, and the kicker's
        span and vars are exactly as before."""
        broker = InMemoryBroker(await_inplace=True).with_middlewares(
            CtxkitMiddleware(vars=(request_id,), tracer_provider=tracer_provider)
        )

        @broker.task(task_name="fail_unprintable")
        async def fail_unprintable() -> None:
            raise Unprintable

        await broker.startup()
        try:
            with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
                request_id.set("r-5")
                try:
                    task = await fail_unprintable.kiq()
                except SendTaskError:
                    pytest.xfail(
                        "taskiq 0.11.19 (the lowest admitted) fails an in-place kick whose task's "
                        "exception cannot be printed before it calls the middleware's post hooks, "
                        "so no middleware can end the span or restore the context there"
                    )
                assert trace.get_current_span() is request
                assert request_id.get() == "r-5"
            result = await task.wait_result(timeout=TIMEOUT)
            assert result.is_err
            assert isinstance(result.error, Unprintable)
        finally:
            await broker.shutdown()
        process = one_finished(span_exporter, "process fail_unprintable")
        assert process.status.status_code is StatusCode.ERROR
        assert process.status.description == "Unprintable: <str() of the Unprintable raised>"
        assert (process.attributes or {})["error.type"] == "Unprintable"
        assert [event.name for event in process.events] == ["exception"]


class Unprintable(Exception):
    """An exception whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("this exception has no text")


# --- failing neighbours: every span ctxkit starts ends exactly once ----------------------------


class EndedSpans(SpanProcessor):
    """Count span ends by name and let a test wait for one."""

    def __init__(self) -> None:
        self.ended: dict[str, int] = {}
        self.events: dict[str, asyncio.Event] = {}

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    def on_end(self, span: ReadableSpan) -> None:
        self.ended[span.name] = self.ended.get(span.name, 0) + 1
        self.event(span.name).set()


@pytest.fixture
def ended(tracer_provider: TracerProvider) -> EndedSpans:
    processor = EndedSpans()
    tracer_provider.add_span_processor(processor)
    return processor


class NeighbourError(Exception):
    pass


class FailingPreExecute(TaskiqMiddleware):
    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        raise NeighbourError("pre_execute")


class FailingPostExecute(TaskiqMiddleware):
    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        raise NeighbourError("post_execute")


class FailingPreSend(TaskiqMiddleware):
    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        raise NeighbourError("pre_send")


class FailingKickBroker(IsolatedBroker):
    async def kick(self, message: BrokerMessage) -> None:
        raise ConnectionError("broker down")


class FailingResultBackend(InmemoryResultBackend[Any]):
    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        raise ConnectionError("result backend down")


def one_finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [span for span in exporter.get_finished_spans() if span.name == name]
    assert len(found) == 1, found
    return found[0]


class TestFailingNeighbours:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("neighbour", [FailingPreExecute, FailingPostExecute])
    async def test_worker_hook_skipped_by_a_neighbour(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        ended: EndedSpans,
        neighbour: type[TaskiqMiddleware],
    ) -> None:
        """A middleware after ctxkit's that raises in pre_execute or post_execute makes taskiq
        skip ctxkit's post_execute: the process span still ends, once, with ERROR, when the
        worker task finishes."""
        memory = make_memory("child", tracer_provider)
        memory.broker.add_middlewares(neighbour())
        await memory.broker.startup()
        try:
            with pytest.raises(NeighbourError):
                await memory.broker.run_raw(raw_message("observe", {}))
            await asyncio.wait_for(ended.event("process observe").wait(), TIMEOUT)
        finally:
            await memory.broker.shutdown()
        process = one_finished(span_exporter, "process observe")
        assert ended.ended["process observe"] == 1
        if neighbour is FailingPostExecute and process.status.status_code is StatusCode.UNSET:
            # taskiq 0.11.19 (the floor) still runs ctxkit's post_execute, with the task's own
            # good result, before the neighbour's raises: the task did not fail, so no ERROR
            return
        assert process.status.status_code is StatusCode.ERROR
        assert (process.attributes or {})["error.type"] == "_OTHER"

    @pytest.mark.asyncio
    async def test_broker_kick_raises(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """A broker whose kick raises: kiq() raises SendTaskError and the send span ends at
        once, with ERROR and the broker's exception."""
        memory = make_memory("child", tracer_provider, broker=FailingKickBroker())
        await memory.broker.startup()
        try:
            with pytest.raises(SendTaskError):
                await kick(memory.broker, "observe")
            send = one_finished(span_exporter, "send observe")
        finally:
            await memory.broker.shutdown()
        assert send.status.status_code is StatusCode.ERROR
        assert (send.attributes or {})["error.type"] == "ConnectionError"
        assert [event.name for event in send.events] == ["exception"]

    @pytest.mark.asyncio
    async def test_later_pre_send_raises(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """A middleware after ctxkit's that raises in pre_send: nothing is sent, and the send
        span ends, once, with ERROR as soon as taskiq lets go of the message."""
        memory = make_memory("child", tracer_provider)
        memory.broker.add_middlewares(FailingPreSend())
        await memory.broker.startup()
        try:
            with pytest.raises(NeighbourError) as excinfo:
                await kick(memory.broker, "observe")
            del excinfo  # the traceback holds the kicker's frame, and the message in it
            gc.collect()
            send = one_finished(span_exporter, "send observe")
        finally:
            await memory.broker.shutdown()
        assert send.status.status_code is StatusCode.ERROR
        assert (send.attributes or {})["error.type"] == "_OTHER"
        assert memory.seen == []

    @pytest.mark.asyncio
    @pytest.mark.parametrize("task_name", ["observe", "fail"])
    async def test_failing_result_backend(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        task_name: str,
    ) -> None:
        """A result backend that fails after the task ran does not change the process span:
        it ends once, UNSET for a task that succeeded and ERROR for one that raised."""
        broker = IsolatedBroker().with_result_backend(FailingResultBackend())
        memory = make_memory("child", tracer_provider, broker=broker)
        await memory.broker.startup()
        try:
            await memory.broker.run_raw(raw_message(task_name, {}))
        finally:
            await memory.broker.shutdown()
        process = one_finished(span_exporter, f"process {task_name}")
        expected = StatusCode.UNSET if task_name == "observe" else StatusCode.ERROR
        assert process.status.status_code is expected

    @pytest.mark.asyncio
    async def test_sent_messages_end_their_span_once(
        self, memory: Memory, span_exporter: InMemorySpanExporter
    ) -> None:
        """A message that was sent ends its span in post_send; dropping the message later does
        not end it again."""
        await kick(memory.broker, "observe")
        await memory.broker.wait_all()
        gc.collect()
        send = one_finished(span_exporter, "send observe")
        assert send.status.status_code is StatusCode.UNSET


# --- retries -----------------------------------------------------------------------------------


def make_retrying(
    tracer_provider: TracerProvider, retries: Literal["link", "child"]
) -> tuple[IsolatedBroker, list[dict[str, object]]]:
    broker = IsolatedBroker()
    broker.add_middlewares(
        CtxkitMiddleware(vars=(request_id,), retries=retries, tracer_provider=tracer_provider),
        SimpleRetryMiddleware(default_retry_count=5, default_retry_label=True),
    )
    seen: list[dict[str, object]] = []

    @broker.task(task_name="flaky")
    async def flaky() -> None:
        seen.append(observation())
        if len(seen) < 3:
            raise RuntimeError(f"attempt {len(seen)} failed")

    return broker, seen


def process_spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    spans = [span for span in exporter.get_finished_spans() if span.name == name]
    return sorted(spans, key=lambda span: int(str((span.attributes or {})["ctxkit.attempt"])))


class TestRetries:
    @pytest.mark.asyncio
    async def test_retries_link_to_the_producer_and_the_previous_attempt(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        ended: EndedSpans,
    ) -> None:
        """With retries="link" and taskiq's retry middleware, a task that fails twice runs
        three times: attempt 1 is a child of the send span, attempts 2 and 3 start new traces
        linked to that send span and to the attempt before; every attempt sees the vars, the
        failed attempts are ERROR although the retry middleware hides their error."""
        broker, seen = make_retrying(tracer_provider, "link")
        assert ended.ended == {}
        await broker.startup()
        try:
            with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
                request_id.set("r-retry")
                await kick(broker, "flaky")
            while len(seen) < 3:
                await broker.wait_all()
        finally:
            await broker.shutdown()
        sends = [s for s in span_exporter.get_finished_spans() if s.name == "send flaky"]
        [send] = [s for s in sends if s.parent and s.parent.span_id == hex_span_id_of(request)]
        first, second, third = process_spans(span_exporter, "process flaky")
        assert [s["request_id"] for s in seen] == ["r-retry"] * 3
        assert [(p.attributes or {})["ctxkit.attempt"] for p in (first, second, third)] == [1, 2, 3]
        assert first.parent is not None
        assert first.parent.span_id == hex_span_id(send)
        for attempt, previous in ((second, first), (third, second)):
            assert attempt.parent is None
            assert hex_trace(attempt) not in {hex_trace(send), hex_trace(previous)}
            assert [(link.context.trace_id, link.context.span_id) for link in attempt.links] == [
                (int(hex_trace(send), 16), hex_span_id(send)),
                (int(hex_trace(previous), 16), hex_span_id(previous)),
            ]
            attributes = attempt.attributes or {}
            assert attributes["ctxkit.linked_trace_id"] == hex_trace(send)
            assert attributes["ctxkit.previous_trace_id"] == hex_trace(previous)
        assert [p.status.status_code for p in (first, second, third)] == [
            StatusCode.ERROR,
            StatusCode.ERROR,
            StatusCode.UNSET,
        ]
        assert (first.attributes or {})["error.type"] == "RuntimeError"

    @pytest.mark.asyncio
    async def test_retries_child_keeps_every_attempt_under_the_producer(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        """With retries="child" every attempt is a child of the first send span."""
        broker, seen = make_retrying(tracer_provider, "child")
        await broker.startup()
        try:
            with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
                await kick(broker, "flaky")
            while len(seen) < 3:
                await broker.wait_all()
        finally:
            await broker.shutdown()
        sends = [s for s in span_exporter.get_finished_spans() if s.name == "send flaky"]
        [send] = [s for s in sends if s.parent and s.parent.span_id == hex_span_id_of(request)]
        attempts = process_spans(span_exporter, "process flaky")
        assert len(attempts) == 3
        for attempt in attempts:
            assert attempt.parent is not None
            assert attempt.parent.span_id == hex_span_id(send)
            assert list(attempt.links) == []

    def test_attempt_label(self) -> None:
        """The retry middleware's _retries label gives the attempt; junk means attempt 1."""
        cases: list[tuple[object, int]] = [
            (None, 1),
            ("2", 3),
            (b"1", 2),
            (4, 5),
            ("x", 1),
            ("9" * 40, 1),
            (-1, 1),
            (True, 1),
        ]
        for label, attempt in cases:
            labels = {} if label is None else {"_retries": label}
            assert _attempt(labels) == attempt, label


def hex_span_id_of(span: trace.Span) -> int:
    return int(span.get_span_context().span_id)


# --- a real worker on a real Redis ---------------------------------------------------------------


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
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def span(self, name: str, trace_id: object) -> dict[str, Any]:
        found = [s for s in self.spans() if s["name"] == name and s["trace_id"] == trace_id]
        assert len(found) == 1, f"{name} in {trace_id}: {self.spans()}\n{self.log}"
        return found[0]


@pytest.fixture(scope="module")
def workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Mode, Worker]]:
    """One `taskiq worker` process per propagation mode, all on the same Redis."""
    started: dict[Mode, Worker] = {}
    run = uuid.uuid4().hex[:8]
    try:
        for mode in MODES:
            directory = tmp_path_factory.mktemp(f"worker-{mode}")
            queue = f"ctxkit-{mode}-{run}"
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
                ),
                "CTXKIT_TEST_REDIS_URL": redis_url,
                "CTXKIT_TEST_QUEUE": queue,
                "CTXKIT_TEST_PROPAGATION": mode,
                "CTXKIT_TEST_OUT": str(directory),
            }
            with (directory / "worker.log").open("wb") as output:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "taskiq",
                        "worker",
                        "tests.taskiq_app.app:broker",
                        "--workers",
                        "1",
                        "--shutdown-timeout",
                        "3",
                        "--wait-tasks-timeout",
                        "3",
                    ],
                    cwd=directory,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started[mode] = Worker(mode, queue, directory, process)
        yield started
    finally:
        stop(*(worker.process for worker in started.values()))


@pytest_asyncio.fixture
async def producers(
    redis_url: str, workers: dict[Mode, Worker], tracer_provider: TracerProvider
) -> AsyncIterator[dict[Mode, ListQueueBroker]]:
    """The request side: a broker per worker queue, with the middleware carrying three vars
    (the workers allow two of them)."""
    brokers: dict[Mode, ListQueueBroker] = {}
    for mode, worker in workers.items():
        broker = (
            ListQueueBroker(redis_url, queue_name=worker.queue)
            .with_result_backend(RedisAsyncResultBackend(redis_url))
            .with_middlewares(
                CtxkitMiddleware(vars=(request_id, tenant, secret), tracer_provider=tracer_provider)
            )
        )
        await broker.startup()
        brokers[mode] = broker
    try:
        yield brokers
    finally:
        for broker in brokers.values():
            await broker.shutdown()


async def result_of(worker: Worker, task: AsyncTaskiqTask[Any]) -> Any:
    try:
        result = await task.wait_result(timeout=TIMEOUT, check_interval=0.02)
    except Exception as exc:
        alive = worker.process.poll() is None
        raise AssertionError(
            f"no result from the {worker.mode} worker (alive={alive}):\n{worker.log}"
        ) from exc
    return result


async def kick_redis(
    broker: ListQueueBroker, task_name: str, **labels: Any
) -> AsyncTaskiqTask[Any]:
    kicker: AsyncKicker[Any, Any] = AsyncKicker(task_name=task_name, broker=broker, labels={})
    return await kicker.with_labels(**labels).kiq()


class TestRedisWorker:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("task_name", ["observe", "observe_sync"])
    async def test_worker_sees_the_request(
        self,
        workers: dict[Mode, Worker],
        producers: dict[Mode, ListQueueBroker],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        mode: Mode,
        task_name: str,
    ) -> None:
        """In another process, the task sees the allowed vars (never the others) and runs in
        process <task>, related to the request's send <task> span as the mode says."""
        worker = workers[mode]
        with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
            request_id.set("r-redis")
            tenant.set({"id": 42, "plan": "pro"})
            secret.set("s3cr3t")
            task = await kick_redis(producers[mode], task_name)
        result = await result_of(worker, task)
        assert not result.is_err, worker.log
        seen = result.return_value
        assert seen["pid"] != os.getpid()
        assert seen["request_id"] == "r-redis"
        assert seen["tenant"] == {"id": 42, "plan": "pro"}
        assert seen["secret"] is None  # carried, but the worker does not allow it
        assert seen["span_recording"] is True

        [send] = [s for s in span_exporter.get_finished_spans() if s.name == f"send {task_name}"]
        request_trace = f"{request.get_span_context().trace_id:032x}"
        assert hex_trace(send) == request_trace
        process = worker.span(f"process {task_name}", seen["trace_id"])
        assert process["span_id"] == seen["span_id"]
        assert process["kind"] == "CONSUMER"
        assert process["status"] == "UNSET"
        assert process["attributes"]["messaging.system"] == "taskiq"
        assert process["attributes"]["messaging.destination.name"] == task_name
        assert process["attributes"]["ctxkit.async"] is True
        if mode == "child":
            assert seen["trace_id"] == request_trace
            assert process["parent_span_id"] == hex_span(send)
            assert process["links"] == []
        elif mode == "link":
            assert seen["trace_id"] != request_trace
            assert process["parent_span_id"] is None
            assert process["links"] == [{"trace_id": request_trace, "span_id": hex_span(send)}]
        else:
            assert seen["trace_id"] != request_trace
            assert process["parent_span_id"] is None
            assert process["links"] == []

    @pytest.mark.asyncio
    async def test_failing_task_is_marked_and_the_worker_carries_on(
        self,
        workers: dict[Mode, Worker],
        producers: dict[Mode, ListQueueBroker],
        tracer_provider: TracerProvider,
    ) -> None:
        """A task that raises gets a process span with status ERROR and error.type, in the
        request's trace; the worker then runs the next task."""
        worker = workers["child"]
        with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
            request_id.set("r-fail")
            failing = await kick_redis(producers["child"], "fail")
        result = await result_of(worker, failing)
        assert result.is_err
        process = worker.span("process fail", f"{request.get_span_context().trace_id:032x}")
        assert process["status"] == "ERROR"
        assert process["attributes"]["error.type"] == "RuntimeError"
        assert process["events"] == ["exception"]

        request_id.set("r-after")
        after = await result_of(worker, await kick_redis(producers["child"], "observe"))
        assert after.return_value["request_id"] == "r-after"
        assert worker.process.poll() is None

    @pytest.mark.asyncio
    async def test_garbage_labels_run_as_new_root(
        self,
        redis_url: str,
        workers: dict[Mode, Worker],
        producers: dict[Mode, ListQueueBroker],
    ) -> None:
        """Messages with garbage labels -- pushed raw into Redis with non-string values, or
        kicked with malformed strings by a broker without ctxkit -- still run, as new roots
        without vars; the worker logs the rejection and keeps working."""
        worker = workers["child"]
        backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(redis_url)
        plain = ListQueueBroker(redis_url, queue_name=worker.queue).with_result_backend(backend)
        await plain.startup()
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            raw_id = uuid.uuid4().hex
            raw: dict[str, object] = {
                "task_id": raw_id,
                "task_name": "observe",
                "labels": {
                    "traceparent": 12345,
                    "tracestate": ["x"],
                    "ctxkit-vars": {"request_id": "evil"},
                    "ctxkit-trace-id": 7,
                },
                "labels_types": None,
                "args": [],
                "kwargs": {},
            }
            await client.lpush(worker.queue, json.dumps(raw))
            raw_task: AsyncTaskiqTask[Any] = AsyncTaskiqTask(raw_id, backend)
            malformed = await kick_redis(
                plain,
                "observe",
                traceparent="00-" + "0" * 32 + "-0123456789abcdef-01",
                **{"ctxkit-vars": '{"request_id": "evil", "request_id": "x"}', "baggage": "a=b"},
            )
            huge = await kick_redis(plain, "observe", **{"ctxkit-vars": "[" * 5000})
            results = [await result_of(worker, task) for task in (raw_task, malformed, huge)]
        finally:
            await client.aclose()
            await plain.shutdown()
        for result in results:
            assert not result.is_err, worker.log
            seen = result.return_value
            assert seen["request_id"] is None
            process = worker.span("process observe", seen["trace_id"])
            assert process["parent_span_id"] is None
        log = worker.log
        for reason in (
            "traceparent.invalid_format",
            "vars.not_string",
            "traceparent.zero_trace_id",
            "vars.duplicate_name",
            "vars.too_large",
        ):
            assert f"({reason})" in log, log
        assert "evil" not in log
        assert worker.process.poll() is None


class TestRedisRetries:
    @pytest.mark.asyncio
    async def test_task_failing_twice_then_succeeding(
        self,
        workers: dict[Mode, Worker],
        producers: dict[Mode, ListQueueBroker],
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """On a real worker with taskiq's retry middleware, a task that fails twice and then
        succeeds leaves three process spans: attempt 1 a child of the request's send span,
        attempts 2 and 3 new traces linked to that send span and to the attempt before."""
        worker = workers["child"]
        key = f"flaky-{uuid.uuid4().hex}"
        with tracer_provider.get_tracer("test").start_as_current_span("request"):
            request_id.set("r-flaky")
            kicker: AsyncKicker[Any, Any] = AsyncKicker(
                task_name="flaky", broker=producers["child"], labels={}
            )
            task = await kicker.with_labels(retry_on_error=True, max_retries=5).kiq(key)
        result = await result_of(worker, task)
        assert not result.is_err, worker.log
        assert result.return_value["request_id"] == "r-flaky"
        [send] = [s for s in span_exporter.get_finished_spans() if s.name == "send flaky"]
        attempts = sorted(
            (s for s in worker.spans() if s["name"] == "process flaky"),
            key=lambda span: int(span["attributes"]["ctxkit.attempt"]),
        )
        assert [s["attributes"]["ctxkit.attempt"] for s in attempts] == [1, 2, 3], worker.log
        first, second, third = attempts
        assert first["trace_id"] == hex_trace(send)
        assert first["parent_span_id"] == hex_span(send)
        assert first["status"] == "ERROR"
        for attempt, previous in ((second, first), (third, second)):
            assert attempt["parent_span_id"] is None
            assert attempt["trace_id"] not in {hex_trace(send), previous["trace_id"]}
            assert attempt["links"] == [
                {"trace_id": hex_trace(send), "span_id": hex_span(send)},
                {"trace_id": previous["trace_id"], "span_id": previous["span_id"]},
            ]
        assert second["status"] == "ERROR"
        assert third["status"] == "UNSET"
        assert third["trace_id"] == result.return_value["trace_id"]


class TestMiddlewareHooks:
    """The hooks called directly, for the paths a broker rarely takes."""

    def message(
        self, labels: dict[str, Any], labels_types: dict[str, int] | None = None
    ) -> TaskiqMessage:
        return TaskiqMessage(
            task_id="t-1",
            task_name="observe",
            labels=labels,
            labels_types=labels_types,
            args=[],
            kwargs={},
        )

    def test_untyped_labels_and_post_send_without_span(self) -> None:
        """A message without labels_types gets the labels alone; post_send on a message that
        pre_send never saw does nothing."""
        middleware = CtxkitMiddleware(vars=(var for var in (request_id,)))  # any iterable
        message = self.message({})

        def run() -> None:
            request_id.set("r-h")
            middleware.pre_send(message)

        contextvars.Context().run(run)
        assert message.labels_types is None
        assert message.labels["ctxkit-vars"] == '{"request_id":"r-h"}'
        middleware.post_send(self.message({}))

    def test_clashing_registration_is_logged_and_the_task_runs(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A var registered after the middleware was made, with the name of one it carries,
        cannot be told apart: pre_execute logs the error and lets the task run without the
        context; post_execute then has nothing to leave."""
        middleware = CtxkitMiddleware(vars=(request_id,))
        ctxkit.register(ContextVar("request_id"))
        message = self.message({"ctxkit-vars": '{"request_id":"r"}'})
        with caplog.at_level(logging.ERROR, logger="ctxkit"):
            assert middleware.pre_execute(message) is message
        assert "could not restore" in caplog.text
        assert request_id.get(None) is None
        middleware.post_execute(
            message, TaskiqResult(is_err=False, return_value=None, execution_time=0)
        )

    def test_leaving_in_another_context_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """If post_execute ran in a copy of the task's context, the scope cannot be left
        there: the error is logged, never raised into the worker."""
        middleware = CtxkitMiddleware(vars=(request_id,))
        message = self.message({"ctxkit-vars": '{"request_id":"r"}'})
        task_context = contextvars.Context()
        task_context.run(middleware.pre_execute, message)
        assert task_context[request_id] == "r"
        result: TaskiqResult[None] = TaskiqResult(is_err=False, return_value=None, execution_time=0)
        with caplog.at_level(logging.ERROR, logger="ctxkit"):
            task_context.copy().run(middleware.post_execute, message, result)
        assert "could not leave" in caplog.text

    def test_bytes_that_are_not_utf8_are_rejected(
        self,
        meter_provider: MeterProvider,
        metric_reader: InMemoryMetricReader,
    ) -> None:
        """A bytes label that is not UTF-8 stays bytes and is rejected as not a string."""
        middleware = CtxkitMiddleware(vars=(request_id,), meter_provider=meter_provider)
        message = self.message({"ctxkit-vars": b"\xff"})
        result: TaskiqResult[None] = TaskiqResult(is_err=False, return_value=None, execution_time=0)

        def run() -> None:
            middleware.pre_execute(message)
            assert request_id.get(None) is None
            middleware.post_execute(message, result)

        contextvars.Context().run(run)
        assert rejected(metric_reader) == {"vars.not_string": 1}

    def test_constructor_checks_its_arguments(self) -> None:
        """Bad options raise when the middleware is made, not when a task runs."""
        with pytest.raises(ValueError, match="propagation"):
            CtxkitMiddleware(propagation="both")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ContextVar"):
            CtxkitMiddleware(vars=("request_id",))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="'request_id'"):
            CtxkitMiddleware(vars=(request_id, ContextVar("request_id")))
