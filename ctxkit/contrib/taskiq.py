"""taskiq integration: the kicker's ContextVars and trace reach the task, in another process.

Install with ``pip install "ctxkit-async[taskiq]"`` and add the middleware to the broker that kicks
tasks and to the one the worker runs (usually the same object)::

    broker = ListQueueBroker(url).with_middlewares(CtxkitMiddleware(vars=(request_id,)))

The carrier is the message's ``labels``; its format is ``ctxkit.propagation``'s.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace

try:
    from taskiq import TaskiqMiddleware
    from taskiq.exceptions import NoResultError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'ctxkit.contrib.taskiq needs taskiq; install it with pip install "ctxkit-async[taskiq]"'
    ) from exc
try:
    from taskiq.labels import LabelType
except ImportError:  # pragma: no cover - a taskiq without typed labels keeps them as sent
    _STR_LABEL: int | None = None
else:
    _STR_LABEL = int(LabelType.STR)

from .._clone import as_var_tuple, check_propagation
from .._logging import logger
from .._trace import get_tracer, mark_error
from ..propagation import (
    MAX_VARS_SIZE,
    ConsumeScope,
    _check_options,
    _check_retries,
    _owned_keys,
    _selected,
    consume,
    inject,
)
from ._messaging import Send as _Send
from ._messaging import send_attributes

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from opentelemetry import metrics
    from opentelemetry.propagators.textmap import TextMapPropagator
    from taskiq import AsyncBroker, TaskiqMessage, TaskiqResult
    from taskiq.message import BrokerMessage

    from .._trace import Propagation, Retries

__all__ = ["CtxkitMiddleware"]

_SYSTEM: Final = "taskiq"
#: Where ``pre_send`` keeps the send span until ``post_send`` (not a model field: never sent).
_SEND_SPAN: Final = "_ctxkit_send_span"
#: The label taskiq's ``SimpleRetryMiddleware`` counts retries in (absent on the first attempt).
_RETRIES_LABEL: Final = "_retries"
#: Marks a broker whose ``kick`` ends the send spans of the messages it fails to send.
_KICK_WRAPPED: Final = "_ctxkit_kick_wrapped"


#: Sends in flight, by task id: a failing ``kick`` ends its message's span through this.
_sending: weakref.WeakValueDictionary[str, _Send] = weakref.WeakValueDictionary()


def _end_unsent(send: _Send) -> None:
    send.end(
        description="not sent: taskiq never called post_send (a later middleware's pre_send "
        "or the broker raised)"
    )


#: The consume scopes a worker task has entered, by task id. A ContextVar, so that
#: ``post_execute`` finds only a scope entered in its own context, where it can be left.
_active: ContextVar[tuple[tuple[str, _Execution], ...]] = ContextVar(
    "ctxkit.contrib.taskiq.active", default=()
)


class _Execution:
    """One task execution between ``pre_execute`` and ``post_execute``."""

    __slots__ = ("error", "scope", "task")

    def __init__(self, scope: ConsumeScope) -> None:
        self.scope = scope
        self.error: BaseException | None = None  # what on_error saw, before a retry hid it
        self.task: asyncio.Task[Any] | None = None  # watched in case post_execute is skipped

    def abandoned(self, task: asyncio.Task[Any]) -> None:
        """End the span with ERROR if the task finished without ``post_execute``."""
        # The task's exception is not read: that would silence asyncio's report of it.
        self.scope.abandon(
            self.error,
            reason="taskiq skipped post_execute: a neighbouring middleware raised",
        )


class CtxkitMiddleware(TaskiqMiddleware):
    """Carry ContextVars and the trace from the code that kicks a task into the task itself.

    Semantics:
        Producer side (``pre_send``): starts a PRODUCER span ``send {task_name}`` (a child
        of the current span; ``messaging.system = "taskiq"``, ``messaging.operation.name`` and
        ``messaging.operation.type`` ``"send"``, ``messaging.destination.name`` the task name,
        ``messaging.message.id`` the task id) and ``ctxkit.propagation.inject``-s, with that
        span current, the trace and the vars in ``vars`` plus the registered ones into the
        message's labels, as strings. The span ends in ``post_send``, once the broker took the
        message; if the broker's ``kick`` raises it ends at once with ERROR and the exception,
        and if a later middleware's ``pre_send`` raises it ends with ERROR (``error.type``
        ``_OTHER``) when taskiq lets go of the message. A var that is not JSON-representable,
        or vars over ``max_vars_size``, make ``kiq()`` raise ``TypeError``/``ValueError``.

        Worker side: ``pre_execute`` enters ``ctxkit.propagation.consume(labels, task_name,
        system="taskiq", message_id=task_id, attempt=...)`` and ``post_execute`` leaves it, so
        the task function -- async, or sync in taskiq's thread pool -- sees the restored vars
        and runs inside the CONSUMER span ``process {task_name}``, related to the send span as
        ``propagation`` says. taskiq runs ``pre_execute``, the task and ``post_execute`` in
        one asyncio task, which is what lets the scope be left where it was entered. Labels
        are untrusted: bad ones are ignored, counted and logged once, and the task runs as a
        new root; bytes labels (from brokers that hand them back so) are decoded as UTF-8
        first. A task that raises gets status ERROR and ``error.type`` on its span, also when
        a retry middleware then hides the error from the result; ``NoResultError`` is not an
        error. If taskiq skips ``post_execute`` (a neighbouring middleware's ``pre_execute``
        or ``post_execute`` raised), the span ends with ERROR when the worker task finishes.
        A failing result backend (after ``post_execute``) leaves the span as the task left it.
        Sync tasks in a process pool (``--use-process-pool``) do not see the context.

        Retries: the attempt number is ``ctxkit.attempt`` on the process span, from 1: the
        ``_retries`` label of taskiq's ``SimpleRetryMiddleware`` plus one. A retry kicked from
        the failing attempt carries that attempt's span and the first producer span, and with
        ``retries="link"`` (default) each attempt after the first starts a new trace linked to
        both; ``retries="child"`` relates every attempt to the first send span as
        ``propagation`` says.

    Args:
        vars: ContextVars to carry and to restore, besides the registered ones.
        propagation: ``"child"`` (default), ``"link"`` or ``"none"``: how the task's span
            relates to the send span (see ``ctxkit.propagation.consume``).
        retries: ``"link"`` (default) or ``"child"``: how attempts after the first relate.
        baggage: Also carry W3C baggage (off by default: labels may be stored durably).
        max_vars_size: Limit of the ``ctxkit-vars`` label, in bytes, on both sides.
        propagator: Carry the trace in this format instead of W3C Trace Context.
        tracer_provider: Where to create spans; None means the global provider.
        meter_provider: Where to count rejected labels; None means the global provider.

    Raises:
        TypeError: An element of ``vars`` is not a ContextVar, or an option has a wrong type.
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
        max_vars_size: int = MAX_VARS_SIZE,
        propagator: TextMapPropagator | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        super().__init__()
        check_propagation(propagation)
        _check_retries(retries)
        self._vars = as_var_tuple(vars, "CtxkitMiddleware")
        _selected(self._vars, "CtxkitMiddleware")
        _check_options(max_vars_size, propagator)
        self._propagation: Propagation = propagation
        self._retries: Retries = retries
        self._baggage = baggage
        self._max_vars_size = max_vars_size
        self._propagator = propagator
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._keys = _owned_keys(propagator, baggage)

    def set_broker(self, broker: AsyncBroker) -> None:
        """Keep the broker, and make its ``kick`` end the send span of a message it fails."""
        super().set_broker(broker)
        if getattr(broker, _KICK_WRAPPED, False):
            return
        kick = broker.kick

        async def kick_ending_failed_sends(message: BrokerMessage) -> None:
            try:
                await kick(message)
            except BaseException as exc:
                send = _sending.pop(message.task_id, None)
                if send is not None:
                    send.end(exc)
                raise

        broker.kick = kick_ending_failed_sends  # type: ignore[method-assign]
        setattr(broker, _KICK_WRAPPED, True)

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        """Start the send span and write the context into ``message.labels``."""
        span = get_tracer(self._tracer_provider).start_span(
            f"send {message.task_name}",
            kind=trace.SpanKind.PRODUCER,
            attributes=send_attributes(_SYSTEM, message.task_name, message.task_id),
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
                message_id=message.task_id,
            )
        except BaseException as exc:
            mark_error(span, exc)
            span.end()
            raise
        types: dict[str, int] | None = getattr(message, "labels_types", None)
        if types is not None and _STR_LABEL is not None:  # keep taskiq from coercing them
            for key in self._keys:
                if key in message.labels:
                    types[key] = _STR_LABEL
                else:
                    types.pop(key, None)
        send = _Send(span)
        _sending[message.task_id] = send
        weakref.finalize(message, _end_unsent, send)
        object.__setattr__(message, _SEND_SPAN, send)  # how taskiq's own OTel middleware does it
        return message

    def post_send(self, message: TaskiqMessage) -> None:
        """End the send span once the broker took the message."""
        send = message.__dict__.pop(_SEND_SPAN, None)
        if isinstance(send, _Send):
            if _sending.get(message.task_id) is send:
                del _sending[message.task_id]
            send.end()

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
                message_id=message.task_id,
                attempt=_attempt(message.labels),
                retries=self._retries,
            )
            scope.__enter__()
        except Exception:  # e.g. a var registered later with a clashing name
            logger.exception(
                "ctxkit could not restore the context of taskiq task %r; it runs without it",
                message.task_name,
            )
            return message
        execution = _Execution(scope)
        _active.set((*_active.get(), (message.task_id, execution)))
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: called outside a worker
            task = None
        if task is not None:
            task.add_done_callback(execution.abandoned)
            execution.task = task
        return message

    def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        """Remember the task's exception: a retry middleware may replace it in ``result``."""
        for task_id, execution in reversed(_active.get()):
            if task_id == message.task_id:
                if not isinstance(exception, NoResultError):
                    execution.error = exception
                return

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        """End the consumer span (ERROR if the task raised) and restore the worker's context."""
        active = _active.get()
        for index in range(len(active) - 1, -1, -1):
            if active[index][0] == message.task_id:
                break
        else:
            return
        execution = active[index][1]
        _active.set(active[:index] + active[index + 1 :])
        if execution.task is not None:  # an in-place broker's task may run many messages
            execution.task.remove_done_callback(execution.abandoned)
            execution.task = None
        error = execution.error
        if error is None and result.is_err and not isinstance(result.error, NoResultError):
            error = result.error
        try:
            if isinstance(error, BaseException):
                execution.scope.__exit__(type(error), error, error.__traceback__)
            else:
                execution.scope.__exit__(None, None, None)
        except Exception:
            logger.exception(
                "ctxkit could not leave the context of taskiq task %r", message.task_name
            )


def _attempt(labels: Mapping[str, Any]) -> int:
    """Return the attempt number from the retry middleware's label (1 if absent or bad)."""
    raw = labels.get(_RETRIES_LABEL)
    if isinstance(raw, bytes | bytearray):
        raw = bytes(raw).decode("ascii", "replace")
    if isinstance(raw, str) and raw.strip().isdigit() and len(raw) < 10:
        return int(raw) + 1
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 10**9:
        return raw + 1
    return 1


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
