"""Log correlation: the ``ctxkit`` logger and the ``TraceIdFilter`` for stdlib logging."""

from __future__ import annotations

import logging
from typing import Final

from opentelemetry import trace

from ._trace import fake_trace_id_var, inherited_trace_id_var

__all__ = ["TraceIdFilter", "exception_text", "logger"]

#: The logger every ctxkit report goes to (task failures, shutdown summaries, bad carriers).
logger: Final = logging.getLogger("ctxkit")


def exception_text(exc: BaseException) -> str:
    """Return ``str(exc)``, or a stand-in when the exception's own ``__str__`` raises.

    The text goes into log lines and span statuses that must be made whatever the task raised:
    logging would drop a record whose argument cannot be formatted.
    """
    try:
        return str(exc)
    except Exception:
        return f"<str() of the {type(exc).__qualname__} raised>"


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
        span_context = trace.get_current_span().get_span_context()
        inherited = inherited_trace_id_var.get(None)
        if inherited is not None:  # the producer's fake id wins, so both sides' logs join
            trace_id = inherited
            span_id = f"{span_context.span_id:016x}" if span_context.is_valid else ""
        elif span_context.is_valid:
            trace_id = f"{span_context.trace_id:032x}"
            span_id = f"{span_context.span_id:016x}"
        else:
            trace_id = fake_trace_id_var.get("")
            span_id = ""
        if not hasattr(record, "trace_id"):
            record.trace_id = trace_id
        if not hasattr(record, "span_id"):
            record.span_id = span_id
        return True
