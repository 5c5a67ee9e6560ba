"""Telemetry for the examples: spans and logs as JSON lines, one object per line.

Spans go to the file named by ``CTXKIT_EXAMPLE_SPANS`` and log records to the file named by
``CTXKIT_EXAMPLE_LOGS`` (each defaults to stderr), so that a person can read them and a test
can parse them. Every log line carries ``trace_id`` and ``span_id`` through
``ctxkit.TraceIdFilter``. A real service would use an OTLP exporter instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, TextIO

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import ctxkit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan


def _open(variable: str) -> TextIO:
    path = os.environ.get(variable)
    return open(path, "a", buffering=1, encoding="utf-8") if path else sys.stderr


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


class JsonLinesSpanExporter(SpanExporter):
    """Write each finished span as one JSON object per line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            context = span.get_span_context()
            assert context is not None
            record = {
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": _hex(context.trace_id, 32),
                "span_id": _hex(context.span_id, 16),
                "parent_id": _hex(span.parent.span_id, 16) if span.parent else None,
                "links": [
                    {
                        "trace_id": _hex(link.context.trace_id, 32),
                        "span_id": _hex(link.context.span_id, 16),
                    }
                    for link in span.links
                ],
                "status": span.status.status_code.name,
                "attributes": dict(span.attributes or {}),
                "start_ns": span.start_time,
                "end_ns": span.end_time,
            }
            self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()
        return SpanExportResult.SUCCESS


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object, with the ids ``TraceIdFilter`` added."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_telemetry(service_name: str) -> None:
    """Install a global tracer provider and a JSON log handler on the root logger."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesSpanExporter(_open("CTXKIT_EXAMPLE_SPANS")))
    )
    trace.set_tracer_provider(provider)
    setup_logging()


def setup_logging() -> None:
    """Install a JSON log handler on the root logger, with ``TraceIdFilter`` on it."""
    handler = logging.StreamHandler(_open("CTXKIT_EXAMPLE_LOGS"))
    handler.addFilter(ctxkit.TraceIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
