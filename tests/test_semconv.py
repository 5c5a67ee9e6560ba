"""Every queue integration against one list: messaging semantic conventions v1.44.

The send and process spans of Celery, taskiq and dramatiq (arq's are checked the same way in
tests/test_arq.py, which runs in a venv of its own) carry ``messaging.system``,
``messaging.operation.name`` and ``messaging.operation.type`` (``send`` / ``process``),
``messaging.destination.name`` and ``messaging.message.id``, set at creation; their names are
``{operation} {destination}``, their kinds PRODUCER / CONSUMER, and a failed execution has
status ERROR with ``error.type``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from .test_celery import InProcess, inproc
from .test_dramatiq import make_stub
from .test_taskiq import Memory, kick, memory

__all__ = ["inproc", "memory"]  # fixtures, used by name

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

REQUIRED = (
    "messaging.system",
    "messaging.operation.name",
    "messaging.operation.type",
    "messaging.destination.name",
    "messaging.message.id",
)


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    spans = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
    return spans[0]


def check_pair(
    exporter: InMemorySpanExporter, system: str, destination: str, message_id: str
) -> tuple[ReadableSpan, ReadableSpan]:
    """Check the send and process spans of one message against the list."""
    send = one(exporter, f"send {destination}")
    process = one(exporter, f"process {destination}")
    for span, operation, kind in (
        (send, "send", SpanKind.PRODUCER),
        (process, "process", SpanKind.CONSUMER),
    ):
        attributes = dict(span.attributes or {})
        assert set(REQUIRED) <= set(attributes), (span.name, attributes)
        assert attributes["messaging.system"] == system
        assert attributes["messaging.operation.name"] == operation
        assert attributes["messaging.operation.type"] == operation
        assert attributes["messaging.destination.name"] == destination
        assert attributes["messaging.message.id"] == message_id
        assert span.name == f"{operation} {destination}"
        assert span.kind is kind
    return send, process


def check_failure(process: ReadableSpan, error_type: str) -> None:
    assert process.status.status_code is StatusCode.ERROR
    assert (process.attributes or {})["error.type"] == error_type


def test_celery(inproc: InProcess, span_exporter: InMemorySpanExporter) -> None:
    result = inproc.app.send_task("inproc.observe")
    inproc.run_next()
    check_pair(span_exporter, "celery", "inproc.observe", result.id)
    span_exporter.clear()
    failing = inproc.app.send_task("inproc.flaky")
    inproc.run_next()  # the first attempt asks for a retry: that attempt failed
    sends = [s for s in span_exporter.get_finished_spans() if s.name == "send inproc.flaky"]
    processes = [s for s in span_exporter.get_finished_spans() if s.name == "process inproc.flaky"]
    assert [(s.attributes or {})["messaging.message.id"] for s in sends] == [failing.id] * 2
    (process,) = processes
    check_failure(process, "Retry")
    # kombu's memory transport is process-wide: run the retry, leave its queue empty
    inproc.run_next()
    assert len(inproc.seen) == 3  # observe, then flaky's two attempts (it counts all runs)


@pytest.mark.asyncio
async def test_taskiq(memory: Memory, span_exporter: InMemorySpanExporter) -> None:
    task = await kick(memory.broker, "observe")
    await memory.broker.wait_all()
    check_pair(span_exporter, "taskiq", "observe", task.task_id)
    span_exporter.clear()
    failing = await kick(memory.broker, "fail")
    await memory.broker.wait_all()
    _, process = check_pair(span_exporter, "taskiq", "fail", failing.task_id)
    check_failure(process, "RuntimeError")


def test_dramatiq(tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter) -> None:
    stub = make_stub("child", tracer_provider)
    message = stub.actors["observe"].send()
    stub.run()
    check_pair(span_exporter, "dramatiq", "observe", message.message_id)
    span_exporter.clear()
    failing = stub.actors["fail"].send()
    stub.run()
    _, process = check_pair(span_exporter, "dramatiq", "fail", failing.message_id)
    check_failure(process, "RuntimeError")
