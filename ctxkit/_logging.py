"""Log correlation: the ``ctxkit`` logger and the ``TraceIdFilter`` for stdlib logging."""

from __future__ import annotations

import logging
from typing import Final

from opentelemetry import trace

from ._trace import current_trace_id

__all__ = ["TraceIdFilter", "current_log_ids", "logger"]

#: The logger every ctxkit report goes to (task failures, shutdown summaries, bad carriers).
logger: Final = logging.getLogger("ctxkit")


def current_log_ids() -> tuple[str, str]:
    """Return the ``trace_id`` and ``span_id`` that log lines of the current context carry.

    The one rule behind ``TraceIdFilter`` and ``ctxkit.contrib.structlog.add_trace_ids``, so
    stdlib and structlog lines of one request, task or job join: ``trace_id`` is
    ``current_trace_id()`` and ``span_id`` the current valid span's id (16 lowercase hex), each
    ``""`` when there is none.
    """
    span_context = trace.get_current_span().get_span_context()
    span_id = f"{span_context.span_id:016x}" if span_context.is_valid else ""
    return current_trace_id() or "", span_id


class TraceIdFilter(logging.Filter):
    """Add ``trace_id`` and ``span_id`` attributes to every log record it sees.

    ``trace_id`` is ``ctxkit.current_trace_id()`` of the context that logs (the fake trace id of
    a consumed job's producer that had no span, else the current valid span's trace id, else the
    fake trace id of a ctxkit clone) and ``span_id`` is the current
    valid span's id; each is ``""`` when there is none. The filter never drops a record, so a
    format such as ``"%(trace_id)s %(message)s"`` works in request and background code alike.
    Attach it to a *handler* (``handler.addFilter(TraceIdFilter())``) to cover records from
    every logger, or to one logger for that logger alone. A record that already has a
    ``trace_id`` or ``span_id`` (passed through ``extra=``) keeps it; the other is still added.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the ids to ``record`` and keep it."""
        trace_id, span_id = current_log_ids()
        if not hasattr(record, "trace_id"):
            record.trace_id = trace_id
        if not hasattr(record, "span_id"):
            record.span_id = span_id
        return True
