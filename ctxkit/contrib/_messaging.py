"""The producer side the queue integrations share: the ``send`` span and the inject inside it.

A PRODUCER span ``send {destination}`` with the semantic-convention attributes of messaging
v1.44, set at creation (``messaging.system``, ``messaging.operation.name`` and ``.type``
``"send"``, ``messaging.destination.name``, ``messaging.message.id``), the carrier written with
that span current in a private context, and a ``Send`` that ends the span exactly once -- with
ERROR when the engine let go of a message it never sent.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from .._trace import get_tracer, mark_error
from ..propagation import inject

if TYPE_CHECKING:
    import contextvars
    from collections.abc import Iterable, MutableMapping
    from contextvars import ContextVar

    from opentelemetry import metrics
    from opentelemetry.util.types import AttributeValue

#: What a send span ended without the engine confirming the send says.
NOT_SENT: Final = "not sent: the engine let go of the message before it was enqueued"


class Send:
    """One send span between the engine's before- and after-enqueue hooks; ends it once."""

    __slots__ = ("__weakref__", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span: trace.Span | None = span

    def end(self, exc: BaseException | None = None, description: str | None = None) -> None:
        """End the span: ERROR with ``exc``, or with ``description`` and ``error.type`` _OTHER."""
        span, self.span = self.span, None
        if span is None:
            return
        if exc is not None:
            mark_error(span, exc)
        elif description is not None:
            span.set_status(Status(StatusCode.ERROR, description))
            span.set_attribute("error.type", "_OTHER")
        span.end()


def send_attributes(
    system: str, destination: str, message_id: str | None
) -> dict[str, AttributeValue]:
    """Return the messaging attributes of a send span."""
    attributes: dict[str, AttributeValue] = {
        "messaging.system": system,
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": destination,
    }
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    return attributes


def send_span(
    tracer_provider: trace.TracerProvider | None,
    context: contextvars.Context,
    system: str,
    destination: str,
    message_id: str | None,
) -> Send:
    """Start the PRODUCER span ``send {destination}``, a child of ``context``'s current span."""
    span = get_tracer(tracer_provider).start_span(
        f"send {destination}",
        context=context.run(otel_context.get_current),
        kind=trace.SpanKind.PRODUCER,
        attributes=send_attributes(system, destination, message_id),
    )
    return Send(span)


def inject_in_span(
    send: Send,
    carrier: MutableMapping[str, Any],
    context: contextvars.Context,
    *,
    vars: Iterable[ContextVar[Any]],
    baggage: bool,
    meter_provider: metrics.MeterProvider | None,
    message_id: str | None,
) -> None:
    """Inject ``context`` into ``carrier`` with the send span current; on failure end it, raise.

    ``context`` must be private to the send (a copy): the span is attached in it and never
    detached.
    """
    assert send.span is not None
    try:
        context.run(otel_context.attach, trace.set_span_in_context(send.span))
        inject(
            carrier,
            vars=vars,
            context=context,
            baggage=baggage,
            meter_provider=meter_provider,
            message_id=message_id,
        )
    except BaseException as exc:
        send.end(exc)
        raise


def end_unsent(message: object, send: Send) -> None:
    """End ``send`` with ERROR when ``message`` is collected before its send span ended."""
    weakref.finalize(message, send.end, None, NOT_SENT)
