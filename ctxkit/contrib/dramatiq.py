"""dramatiq integration: the sender's ContextVars and trace reach the actor, in any worker.

Install with ``pip install "ctxkit-async[dramatiq]"`` and add the middleware to the broker, in
the module both the producer and the worker import::

    broker = RedisBroker(url=url)
    broker.add_middleware(CtxkitMiddleware(vars=(request_id,)))

The carrier is the message's ``options["ctxkit"]``: a dict of strings in
``ctxkit.propagation``'s format, which travels with the message (JSON-encoded by dramatiq).
"""

from __future__ import annotations

import contextvars
import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

try:
    from dramatiq.middleware import Middleware
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ctxkit.contrib.dramatiq needs dramatiq; install it with "
        'pip install "ctxkit-async[dramatiq]"'
    ) from exc

from .._clone import as_var_tuple, check_propagation
from .._logging import logger
from ..propagation import (
    ConsumeScope,
    _check_retries,
    _job_var,
    _selected,
    consume,
)
from ._messaging import end_unsent, inject_in_span, send_span

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from dramatiq.broker import Broker
    from opentelemetry import metrics, trace

    from .._trace import Propagation, Retries

__all__ = ["OPTION", "CtxkitMiddleware"]

_SYSTEM: Final = "dramatiq"
#: The message option that holds the carrier.
OPTION: Final = "ctxkit"
#: Where ``before_enqueue`` keeps the send span until ``after_enqueue`` (not a field: never sent).
_SEND_SPAN: Final = "_ctxkit_send_span"


class _State(threading.local):
    """Per worker thread: the scopes entered, and the last failed job for its retry's enqueue."""

    def __init__(self) -> None:
        self.active: list[tuple[str, ConsumeScope]] = []
        #: The context a failed message ran in, kept for the retry the Retries middleware may
        #: enqueue once this middleware has left the message's scope.
        self.finished: tuple[str, contextvars.Context] | None = None


class CtxkitMiddleware(Middleware):
    """Carry ContextVars and the trace from the code that sends a message into the actor.

    Semantics:
        Producer (``before_enqueue``/``after_enqueue``): every enqueue of the broker --
        ``send``, ``send_with_options``, pipelines, groups, a retry -- runs in a PRODUCER span
        ``send {actor name}`` (a child of the current span; ``messaging.system =
        "dramatiq"``, ``messaging.operation.name``/``.type`` ``"send"``,
        ``messaging.destination.name`` the actor name, ``messaging.message.id`` the message
        id), and the trace and the vars are ``inject``-ed, with that span current, into
        ``message.options["ctxkit"]``. The span ends once the broker took the message; if the
        broker fails to, it ends with ERROR when the message is let go. A var that is not
        JSON-representable, or vars over the size limit, are logged by dramatiq and the
        message goes without a carrier (dramatiq swallows middleware errors).

        Worker (``before_process_message``/``after_process_message``/``after_skip_message``):
        each message runs inside ``ctxkit.propagation.consume`` of its carrier: the CONSUMER
        span ``process {actor name}``, related to the send span as ``propagation`` says, with
        the vars set for that message only -- dramatiq's worker threads run message after
        message, and everything is reset after each one. An actor that raises gets ERROR and
        ``error.type``; a skipped message is not an error. The carrier is untrusted: a
        malformed, oversized or hostile one is ignored, counted in
        ``ctxkit.propagation.rejected`` and logged once per kind, and the message runs as a
        new root. Async actors (dramatiq's ``AsyncIO`` middleware) run on another thread's
        event loop and do not see the vars.

        Retries: ``ctxkit.attempt`` is dramatiq's ``options["retries"]`` plus one. When the
        ``Retries`` middleware re-enqueues a failed message, its carrier names the first
        producer span and the failed attempt's span; with ``retries="link"`` (default) each
        attempt after the first starts a new trace linked to both, with ``retries="child"``
        every attempt relates to the first send span as ``propagation`` says.

    Args:
        vars: ContextVars to carry and to restore, besides the registered ones.
        propagation: ``"child"`` (default), ``"link"`` or ``"none"`` (see ``consume``).
        retries: ``"link"`` (default) or ``"child"``: how attempts after the first relate.
        baggage: Also carry W3C baggage (off by default: messages may be stored durably).
        tracer_provider: Where to create spans; None means the global provider.
        meter_provider: Where to count rejected carriers; None means the global provider.

    Raises:
        TypeError: An element of ``vars`` is not a ContextVar.
        ValueError: ``propagation`` or ``retries`` is not accepted, or two selected vars share
            a name.
    """

    def __init__(
        self,
        *,
        vars: Iterable[ContextVar[Any]] = (),
        propagation: Propagation = "child",
        retries: Retries = "link",
        baggage: bool = False,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        check_propagation(propagation)
        _check_retries(retries)
        self._vars = as_var_tuple(vars, "CtxkitMiddleware")
        _selected(self._vars, "CtxkitMiddleware")
        self._propagation: Propagation = propagation
        self._retries: Retries = retries
        self._baggage = bool(baggage)
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._state = _State()
        #: Ids of delayed messages a worker holds: it enqueues them again, unchanged, when due.
        self._delayed: set[str] = set()
        self._delayed_lock = threading.Lock()

    # --- producer --------------------------------------------------------------------------------

    def before_enqueue(self, broker: Broker, message: Any, delay: int | None) -> None:
        """Start the send span and write the context into ``message.options["ctxkit"]``."""
        if self._delayed:
            with self._delayed_lock:
                moved = message.message_id in self._delayed
                self._delayed.discard(message.message_id)
            if moved:  # a due delayed message moved to its queue: not a send, carrier kept
                return
        finished = self._state.finished
        if finished is not None and finished[0] == message.message_id:
            # The Retries middleware re-enqueues the attempt that just failed, after this
            # middleware left its scope: send from that attempt's context (its vars, its span).
            self._state.finished = None
            context = finished[1]
        else:
            context = contextvars.copy_context()
        carrier: dict[str, object] = {}
        send = send_span(
            self._tracer_provider,
            context,
            _SYSTEM,
            message.actor_name,
            message.message_id,
        )
        inject_in_span(
            send,
            carrier,
            context,
            vars=self._vars,
            baggage=self._baggage,
            meter_provider=self._meter_provider,
            message_id=message.message_id,
        )
        message.options[OPTION] = carrier
        object.__setattr__(message, _SEND_SPAN, send)
        end_unsent(message, send)

    def after_enqueue(self, broker: Broker, message: Any, delay: int | None) -> None:
        """End the send span once the broker took the message."""
        send = message.__dict__.pop(_SEND_SPAN, None)
        if send is not None:
            send.end()

    # --- worker ----------------------------------------------------------------------------------

    def before_delay_message(self, broker: Broker, message: Any) -> None:
        """Remember a delayed message: the worker moves it to its queue when due, unchanged."""
        with self._delayed_lock:
            self._delayed.add(message.message_id)

    def before_process_message(self, broker: Broker, message: Any) -> None:
        """Restore the carrier's context in the worker thread and start the consumer span."""
        self._state.finished = None
        try:
            scope = consume(
                message.options.get(OPTION),
                message.actor_name,
                vars=self._vars,
                propagation=self._propagation,
                system=_SYSTEM,
                baggage=self._baggage,
                tracer_provider=self._tracer_provider,
                meter_provider=self._meter_provider,
                message_id=str(message.message_id),
                attempt=_attempt(message.options),
                retries=self._retries,
            )
            scope.__enter__()
        except Exception:  # e.g. a var registered later with a clashing name
            logger.exception(
                "ctxkit could not restore the context of dramatiq message %r; it runs without it",
                message.actor_name,
            )
            return
        self._state.active.append((message.message_id, scope))

    def after_process_message(
        self,
        broker: Broker,
        message: Any,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        """End the consumer span (ERROR if the actor raised) and reset the worker's context."""
        if exception is not None:
            job = _job_var.get(None)
            if job is not None and job.message_id == message.message_id:
                # for the retry the Retries middleware may enqueue
                self._state.finished = (message.message_id, contextvars.copy_context())
        self._leave(message, exception)

    def after_skip_message(self, broker: Broker, message: Any) -> None:
        """End the consumer span of a message another middleware skipped (not an error)."""
        self._leave(message, None)

    def _leave(self, message: Any, exception: BaseException | None) -> None:
        active = self._state.active
        for index in range(len(active) - 1, -1, -1):
            if active[index][0] == message.message_id:
                break
        else:
            return
        scope = active.pop(index)[1]
        try:
            if exception is None:
                scope.__exit__(None, None, None)
            else:
                scope.__exit__(type(exception), exception, exception.__traceback__)
        except Exception:
            logger.exception(
                "ctxkit could not leave the context of dramatiq message %r", message.actor_name
            )


def _attempt(options: Mapping[str, Any]) -> int:
    """Return the attempt number from the Retries middleware's count (1 if absent or bad)."""
    retries = options.get("retries")
    if isinstance(retries, int) and not isinstance(retries, bool) and 0 <= retries < 10**9:
        return retries + 1
    return 1
