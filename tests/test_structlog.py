"""Tests for ctxkit.contrib.structlog: trace and span ids on structlog events."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog
from structlog.testing import CapturingLogger

import ctxkit
from ctxkit import propagation
from ctxkit.contrib.structlog import add_trace_ids

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from structlog.typing import EventDict

ROOT = Path(__file__).resolve().parent.parent


def process() -> EventDict:
    return add_trace_ids(None, "info", {"event": "hello"})


class Recording(logging.Handler):
    """A handler that keeps the records it is handed (after its filters)."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def filtered() -> tuple[str, str]:
    """What TraceIdFilter puts on a stdlib record logged here."""
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    ctxkit.TraceIdFilter().filter(record)
    return record.__dict__["trace_id"], record.__dict__["span_id"]


class TestAddTraceIds:
    def test_empty_ids_without_a_trace(self) -> None:
        """With no span and no clone, both ids are empty strings, as with TraceIdFilter."""
        assert process() == {"event": "hello", "trace_id": "", "span_id": ""}

    def test_ids_of_the_current_span(self, tracer_provider: TracerProvider) -> None:
        """Inside a span, the span's trace id and span id, formatted as hex."""
        with tracer_provider.get_tracer("t").start_as_current_span("s") as span:
            event = process()
            assert (event["trace_id"], event["span_id"]) == filtered()
        context = span.get_span_context()
        assert event["trace_id"] == f"{context.trace_id:032x}"
        assert event["span_id"] == f"{context.span_id:016x}"

    def test_fake_trace_id_of_a_clone(self) -> None:
        """In a clone with no valid span, the clone's fake trace id and no span id."""
        clone = ctxkit.clone_without_span()
        event = clone.run(process)
        assert event["trace_id"] == clone.run(ctxkit.current_trace_id)
        assert re.fullmatch("[0-9a-f]{32}", event["trace_id"])
        assert event["span_id"] == ""
        assert (event["trace_id"], event["span_id"]) == clone.run(filtered)

    def test_an_existing_trace_id_is_kept(self, tracer_provider: TracerProvider) -> None:
        """A trace_id bound by the caller wins, as with TraceIdFilter's extra=."""
        with tracer_provider.get_tracer("t").start_as_current_span("s"):
            event = add_trace_ids(None, "info", {"event": "e", "trace_id": "mine"})
        assert event == {"event": "e", "trace_id": "mine"}

    @pytest.mark.anyio
    async def test_a_background_task_logs_with_the_request_trace(
        self, tracer_provider: TracerProvider
    ) -> None:
        """Events of a spawned task carry the request's trace id and the task span's id."""
        capture = CapturingLogger()
        logger = structlog.wrap_logger(capture, processors=[add_trace_ids])

        async def task() -> None:
            logger.info("in the task")

        tracer = tracer_provider.get_tracer("t")
        async with ctxkit.BackgroundRunner(tracer_provider=tracer_provider):
            with tracer.start_as_current_span("request") as request:
                logger.info("in the request")
                handle = ctxkit.spawn(task)
            await handle.wait()
        in_request, in_task = (call.kwargs for call in capture.calls)
        assert in_request["trace_id"] == in_task["trace_id"] == handle.trace_id
        assert in_request["span_id"] == f"{request.get_span_context().span_id:016x}"
        assert in_task["span_id"] == f"{handle.span_context.span_id:016x}"

    def test_a_consumed_job_of_a_producer_with_a_fake_trace_id(
        self, tracer_provider: TracerProvider
    ) -> None:
        """In consume() of a job whose producer had only a fake trace id, structlog events and
        stdlib records (TraceIdFilter) carry the same ids: the producer's fake trace id, which
        joins them to the producer's lines, and the consumer span's id."""
        producer = ctxkit.clone_without_span()
        fake = producer.run(ctxkit.current_trace_id)
        assert fake is not None
        carrier: dict[str, str] = producer.run(propagation.inject, {})
        capture = CapturingLogger()
        logger = structlog.wrap_logger(capture, processors=[add_trace_ids])
        records: list[logging.LogRecord] = []
        handler = Recording(records)
        handler.addFilter(ctxkit.TraceIdFilter())
        stdlib_logger = logging.getLogger("test_ctxkit_structlog_consume")
        stdlib_logger.propagate = False
        stdlib_logger.addHandler(handler)
        try:
            with propagation.consume(carrier, "jobs", tracer_provider=tracer_provider) as span:
                logger.info("from structlog")
                stdlib_logger.warning("from stdlib")
        finally:
            stdlib_logger.removeHandler(handler)
        [event] = capture.calls
        [record] = records
        span_id = f"{span.get_span_context().span_id:016x}"
        assert (event.kwargs["trace_id"], event.kwargs["span_id"]) == (fake, span_id)
        assert (record.__dict__["trace_id"], record.__dict__["span_id"]) == (fake, span_id)

    def test_in_the_foreign_pre_chain_of_processor_formatter(
        self, tracer_provider: TracerProvider
    ) -> None:
        """Stdlib records rendered by structlog get the ids of the code that logged."""
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[structlog.stdlib.add_log_level, add_trace_ids],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
        stdlib_logger = logging.getLogger("test_ctxkit_structlog")
        stdlib_logger.propagate = False
        stdlib_logger.addHandler(handler)
        try:
            with tracer_provider.get_tracer("t").start_as_current_span("s") as span:
                stdlib_logger.warning("from stdlib")
        finally:
            stdlib_logger.removeHandler(handler)
        line = json.loads(stream.getvalue())
        assert line["event"] == "from stdlib"
        assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"


def docs_examples() -> dict[str, str]:
    text = (ROOT / "docs" / "logging.md").read_text()
    return dict(re.findall(r'```python title="([\w.]+)"\n(.*?)```', text, flags=re.DOTALL))


class TestDocsExamples:
    @pytest.mark.parametrize(
        ("name", "stream"), [("stdlib_json.py", "stderr"), ("structlog_json.py", "stdout")]
    )
    def test_request_and_task_lines_share_the_trace_id(self, name: str, stream: str) -> None:
        """Each example of docs/logging.md prints JSON lines with the request's trace id."""
        result = subprocess.run(
            [sys.executable, "-c", docs_examples()[name]],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        lines = [json.loads(line) for line in getattr(result, stream).splitlines()]
        by_message = {line.get("message", line.get("event")): line for line in lines}
        request, task = by_message["checkout"], by_message["receipt sent"]
        assert re.fullmatch("[0-9a-f]{32}", request["trace_id"])
        assert task["trace_id"] == request["trace_id"]
        assert re.fullmatch("[0-9a-f]{16}", task["span_id"])
        assert task["span_id"] != request["span_id"]
