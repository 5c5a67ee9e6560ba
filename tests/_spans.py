"""Finished spans as JSON lines: how worker processes in the tests report their spans."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from opentelemetry.sdk.trace import ReadableSpan


def span_to_json(span: ReadableSpan) -> dict[str, object]:
    """Return the parts of a finished span the tests check, as JSON-ready values."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "parent_trace_id": None if span.parent is None else f"{span.parent.trace_id:032x}",
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
        "status": span.status.status_code.name,
        "attributes": {key: _jsonable(value) for key, value in (span.attributes or {}).items()},
        "events": [event.name for event in span.events],
    }


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    return value


class JsonlSpanExporter(SpanExporter):
    """Append each finished span as one JSON line to a file (flushed at once)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_to_json(span)) + "\n" for span in spans)
        with self._lock, self._path.open("a", encoding="utf-8") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS
