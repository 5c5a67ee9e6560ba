"""taskiq integration: the kicker's ContextVars and trace reach the task, in another process.

Install with ``pip install "ctxkit[taskiq]"`` and add the middleware to the broker that kicks
tasks and to the one the worker runs (usually the same object)::

    broker = ListQueueBroker(url).with_middlewares(CtxkitMiddleware(vars=(request_id,)))

The carrier is the message's ``labels``; its format is ``ctxkit.propagation``'s.
"""

from __future__ import annotations

import contextvars
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

try:
    from taskiq import TaskiqMiddleware
    from taskiq.exceptions import NoResultError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'ctxkit.contrib.taskiq needs taskiq; install it with pip install "ctxkit[taskiq]"'
    ) from exc
try:
    from taskiq.labels import LabelType
except ImportError:  # pragma: no cover - a taskiq without typed labels keeps them as sent
    _STR_LABEL: int | None = None
else:
    _STR_LABEL = int(LabelType.STR)

from .._clone import as_var_tuple, check_propagation
from .._logging import logger
from .._trace import get_tracer
from ..propagation import (
    MAX_VARS_SIZE,
    ConsumeScope,
    _check_options,
    _owned_keys,
    _selected,
    consume,
    inject,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from opentelemetry import metrics
    from opentelemetry.propagators.textmap import TextMapPropagator
    from taskiq import TaskiqMessage, TaskiqResult

    from .._trace import Propagation

__all__ = ["CtxkitMiddleware"]

_SYSTEM: Final = "taskiq"
#: Where ``pre_send`` keeps the send span until ``post_send`` (not a model field: never sent).
_SEND_SPAN: Final = "_ctxkit_send_span"

#: The consume scopes a worker task has entered, by task id. A ContextVar, so that
#: ``post_execute`` finds only a scope entered in its own context, where it can be left.
_active: ContextVar[tuple[tuple[str, ConsumeScope], ...]] = ContextVar(
    "ctxkit.contrib.taskiq.active", default=()
)


class CtxkitMiddleware(TaskiqMiddleware):
    """Carry ContextVars and the trace from the code that kicks a task into the task itself.

    Semantics:
        Producer side (``pre_send``): starts a PRODUCER span ``send {task_name}`` (a child
        of the current span; ``messaging.system = "taskiq"``, ``messaging.operation.type =
        "send"``, ``messaging.destination.name`` the task name, ``messaging.message.id`` the
        task id) and ``ctxkit.propagation.inject``-s, with that span current, the trace and
        the vars in ``vars`` plus the registered ones into the message's labels, as strings.
        The span ends in ``post_send``, once the broker took the message (if the broker
        raises, it is never ended). A var that is not JSON-representable, or vars over
        ``max_vars_size``, make ``kiq()`` raise ``TypeError``/``ValueError``.

        Worker side: ``pre_execute`` enters ``ctxkit.propagation.consume(labels, task_name,
        system="taskiq", ...)`` and ``post_execute`` leaves it, so the task function -- async,
        or sync in taskiq's thread pool -- sees the restored vars and runs inside the CONSUMER
        span ``process {task_name}``, related to the send span as ``propagation`` says. taskiq
        runs ``pre_execute``, the task and ``post_execute`` in one asyncio task, which is what
        lets the scope be left where it was entered. Labels are untrusted: bad ones are
        ignored, counted and logged once, and the task runs as a new root; bytes labels
        (from brokers that hand them back so) are decoded as UTF-8 first. A task that raises
        gets status ERROR and ``error.type`` on its span; ``NoResultError`` is not an error.
        If a middleware after this one fails in ``pre_execute``, taskiq skips
        ``post_execute`` and the span is never ended. Sync tasks in a process pool
        (``--use-process-pool``) do not see the context.

    Args:
        vars: ContextVars to carry and to restore, besides the registered ones.
        propagation: ``"child"`` (default), ``"link"`` or ``"none"``: how the task's span
            relates to the send span (see ``ctxkit.propagation.consume``).
        baggage: Also carry W3C baggage (off by default: labels may be stored durably).
        max_vars_size: Limit of the ``ctxkit-vars`` label, in bytes, on both sides.
        propagator: Carry the trace in this format instead of W3C Trace Context.
        tracer_provider: Where to create spans; None means the global provider.
        meter_provider: Where to count rejected labels; None means the global provider.

    Raises:
        TypeError: An element of ``vars`` is not a ContextVar, or an option has a wrong type.
        ValueError: ``propagation`` is not accepted, or two selected vars share a name.
    """

    def __init__(
        self,
        *,
        vars: Iterable[ContextVar[Any]] = (),
        propagation: Propagation = "child",
        baggage: bool = False,
        max_vars_size: int = MAX_VARS_SIZE,
        propagator: TextMapPropagator | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        super().__init__()
        check_propagation(propagation)
        self._vars = as_var_tuple(vars, "CtxkitMiddleware")
        _selected(self._vars, "CtxkitMiddleware")
        _check_options(max_vars_size, propagator)
        self._propagation: Propagation = propagation
        self._baggage = baggage
        self._max_vars_size = max_vars_size
        self._propagator = propagator
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._keys = _owned_keys(propagator, baggage)

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        """Start the send span and write the context into ``message.labels``."""
        span = get_tracer(self._tracer_provider).start_span(
            f"send {message.task_name}",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "send",
                "messaging.destination.name": message.task_name,
                "messaging.message.id": message.task_id,
            },
        )
        # Inject from a private copy where the send span is current: nothing is attached to
        # the caller's context, so nothing has to be detached from it.
        context = contextvars.copy_context()
        context.run(otel_context.attach, trace.set_span_in_context(span))
        try:
            inject(
                message.labels,
                vars=self._vars,
                context=context,
                baggage=self._baggage,
                propagator=self._propagator,
                max_vars_size=self._max_vars_size,
                meter_provider=self._meter_provider,
            )
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.record_exception(exc)
            span.set_attribute("error.type", type(exc).__qualname__)
            span.end()
            raise
        types: dict[str, int] | None = getattr(message, "labels_types", None)
        if types is not None and _STR_LABEL is not None:  # keep taskiq from coercing them
            for key in self._keys:
                if key in message.labels:
                    types[key] = _STR_LABEL
                else:
                    types.pop(key, None)
        object.__setattr__(message, _SEND_SPAN, span)  # how taskiq's own OTel middleware does it
        return message

    def post_send(self, message: TaskiqMessage) -> None:
        """End the send span once the broker took the message."""
        span = message.__dict__.pop(_SEND_SPAN, None)
        if isinstance(span, trace.Span):
            span.end()

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """Restore the labels' context in the worker task and start the consumer span."""
        try:
            scope = consume(
                _carrier(message.labels, self._keys),
                message.task_name,
                vars=self._vars,
                propagation=self._propagation,
                system=_SYSTEM,
                baggage=self._baggage,
                propagator=self._propagator,
                tracer_provider=self._tracer_provider,
                max_vars_size=self._max_vars_size,
                meter_provider=self._meter_provider,
                attributes={"messaging.message.id": message.task_id},
            )
            scope.__enter__()
        except Exception:  # e.g. a var registered later with a clashing name
            logger.exception(
                "ctxkit could not restore the context of taskiq task %r; it runs without it",
                message.task_name,
            )
            return message
        _active.set((*_active.get(), (message.task_id, scope)))
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        """End the consumer span (ERROR if the task raised) and restore the worker's context."""
        active = _active.get()
        for index in range(len(active) - 1, -1, -1):
            if active[index][0] == message.task_id:
                break
        else:
            return
        scope = active[index][1]
        _active.set(active[:index] + active[index + 1 :])
        error = result.error if result.is_err else None
        try:
            if isinstance(error, BaseException) and not isinstance(error, NoResultError):
                scope.__exit__(type(error), error, error.__traceback__)
            else:
                scope.__exit__(None, None, None)
        except Exception:
            logger.exception(
                "ctxkit could not leave the context of taskiq task %r", message.task_name
            )


def _carrier(labels: Mapping[str, Any], keys: frozenset[str]) -> Mapping[str, Any]:
    """Return ``labels``, with bytes values of the propagation ``keys`` decoded as UTF-8."""
    fixed: dict[str, Any] | None = None
    for key in keys:
        value = labels.get(key)
        if isinstance(value, bytes | bytearray):
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                continue  # left as bytes: rejected (and counted) as not a string
            if fixed is None:
                fixed = dict(labels)
            fixed[key] = text
    return labels if fixed is None else fixed
