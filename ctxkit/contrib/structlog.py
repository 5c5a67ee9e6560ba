"""structlog integration: ``trace_id`` and ``span_id`` in every event, as ``TraceIdFilter`` does.

Install with ``pip install "ctxkit-async[structlog]"`` and put the processor in the chain,
before the renderer::

    import structlog
    from ctxkit.contrib.structlog import add_trace_ids

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_trace_ids,
            structlog.processors.JSONRenderer(),
        ]
    )

It also works in the ``foreign_pre_chain`` of ``structlog.stdlib.ProcessorFormatter``, for
records of stdlib loggers that go through structlog's rendering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    import structlog  # noqa: F401 - fail early, with the extra to install
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ctxkit.contrib.structlog needs structlog; install it with "
        'pip install "ctxkit-async[structlog]"'
    ) from exc

from .._logging import current_log_ids

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

__all__ = ["add_trace_ids"]


def add_trace_ids(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Add ``trace_id`` and ``span_id`` of the logging context to the event (a processor).

    The values are those ``ctxkit.TraceIdFilter`` puts on stdlib log records (one shared
    rule), so structlog and stdlib log lines of one request, background task or consumed job
    share their ids: ``trace_id`` is ``ctxkit.current_trace_id()`` (the fake trace id of a
    consumed job's producer that had no span, else the current valid span's trace id, else the
    fake trace id of a ctxkit clone) and ``span_id`` the current valid span's id, each ``""``
    when there is none. An event that already has a ``trace_id`` key is left as it is.

    Args:
        logger: The wrapped logger (unused).
        method_name: The name of the log method called (unused).
        event_dict: The event being processed.

    Returns:
        ``event_dict``, with the two keys added.
    """
    if "trace_id" in event_dict:
        return event_dict
    event_dict["trace_id"], event_dict["span_id"] = current_log_ids()
    return event_dict
