"""Celery integration: the caller's ContextVars and trace reach every task, in any worker.

Install with ``pip install "ctxkit-async[celery]"`` and instrument the app once, where it is made
(the module the worker imports), after its tasks are defined or before it is finalized::

    app = Celery("app", broker=url)
    ctxkit.contrib.celery.instrument(app, vars=(request_id,))

The carrier is the message's headers; its format is ``ctxkit.propagation``'s.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace

try:
    from celery import current_task
    from celery.app.task import Task
    from celery.app.trace import task_has_custom
    from celery.exceptions import Ignore, Reject, Retry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'ctxkit.contrib.celery needs celery; install it with pip install "ctxkit-async[celery]"'
    ) from exc

from .._clone import as_var_tuple, check_propagation
from .._logging import logger
from .._trace import get_tracer, mark_error
from ..propagation import (
    _check_retries,
    _owned_keys,
    _selected,
    consume,
    extract,
    inject,
)
from ._messaging import send_attributes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from celery import Celery
    from opentelemetry import metrics

    from .._trace import Propagation, Retries

__all__ = ["instrument"]

_SYSTEM: Final = "celery"
#: Marks a task class made by ``_wrap``: its ``__call__`` runs the task inside ctxkit's span.
_WRAPPED: Final = "_ctxkit_wrapped"
#: Where a worker-run task's request keeps the carrier it came with, for the follow-up tasks
#: Celery publishes after the task returned (a chain's next task, ``link`` callbacks).
_FOLLOW_UP: Final = "_ctxkit_carrier"


@dataclass(frozen=True)
class _Config:
    vars: tuple[ContextVar[Any], ...]
    propagation: Propagation
    retries: Retries
    baggage: bool
    tracer_provider: trace.TracerProvider | None
    meter_provider: metrics.MeterProvider | None
    keys: frozenset[str]


_configs: weakref.WeakKeyDictionary[Celery, _Config] = weakref.WeakKeyDictionary()


def instrument(
    app: Celery,
    *,
    vars: Iterable[ContextVar[Any]] = (),
    propagation: Propagation = "child",
    retries: Retries = "link",
    baggage: bool = False,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Carry ContextVars and the trace from every publish of ``app`` into the task it runs.

    Semantics:
        Producer: every publish (``delay``, ``apply_async``, ``send_task``, each signature of
        a canvas, a retry) runs in a PRODUCER span ``send {task name}`` -- a child of the
        current span, with ``messaging.system = "celery"``, ``messaging.operation.name`` and
        ``.type`` ``"send"``, ``messaging.destination.name`` the task name and
        ``messaging.message.id`` the task id -- and ``ctxkit.propagation.inject``-s the trace
        and the vars into the message headers (strings). The span is current while Celery
        publishes (``before_task_publish`` receivers see it) and ends when the publish
        returns, with ERROR if it raised. A canvas built in a request carries that request's context
        into each of its tasks, also the ones a worker publishes after a task returned (a
        chain's next task, ``link`` callbacks): those carry the context the finished task
        came with.

        Worker: each execution of a task of ``app`` runs inside ``ctxkit.propagation.consume``
        of its headers: the CONSUMER span ``process {task name}`` (``messaging.system =
        "celery"``, ``messaging.message.id`` the task id, ``ctxkit.attempt`` Celery's
        ``request.retries + 1``), related to the send span as ``propagation`` says, with the
        vars set only for the task and reset after it, so nothing leaks into the next task of
        the worker process. A task that raises gets status ERROR and ``error.type`` (for
        ``self.retry()``, the exception retried for) and the exception goes on to Celery
        unchanged; ``Ignore`` and ``Reject`` are not errors. Headers are untrusted: garbage,
        missing or oversized ones never fail a task -- it runs as a new root and the rejection
        is counted and logged once. Eager execution (``task_always_eager``), ``.apply()`` and
        calling the task directly run in the caller's context: a ``process`` span that is a
        child of the current span, and the caller's vars.

        Retries: with ``retries="link"`` (default) each attempt after the first (Celery's
        ``self.retry()``, ``autoretry_for``) starts a new trace linked to the first send span
        and to the previous attempt's span; ``retries="child"`` relates every attempt to the
        first send span as ``propagation`` says.

        The task's class gets a subclass whose ``__call__`` does this around the class's own
        ``__call__``, so other task classes, ``bind=True`` tasks and the app's signals keep
        working; tasks defined after the app is finalized are not instrumented. Calling
        ``instrument`` again on the same app only replaces the options.

    Args:
        app: The Celery app, on the producer side and in the worker.
        vars: ContextVars to carry and to restore, besides the registered ones.
        propagation: ``"child"`` (default), ``"link"`` or ``"none"`` (see ``consume``).
        retries: ``"link"`` (default) or ``"child"``: how attempts after the first relate.
        baggage: Also carry W3C baggage (off by default: headers may be stored durably).
        tracer_provider: Where to create spans; None means the global provider.
        meter_provider: Where to count rejected headers; None means the global provider.

    Raises:
        TypeError: An element of ``vars`` is not a ContextVar.
        ValueError: ``propagation`` or ``retries`` is not accepted, or two selected vars share
            a name.
    """
    check_propagation(propagation)
    _check_retries(retries)
    selected = as_var_tuple(vars, "instrument")
    _selected(selected, "instrument")
    first = app not in _configs
    _configs[app] = _Config(
        selected,
        propagation,
        retries,
        bool(baggage),
        tracer_provider,
        meter_provider,
        _owned_keys(None, bool(baggage)),
    )
    if not first:
        return
    _instrument_sender(app)
    if app.finalized:
        _wrap_all(app)
    app.on_after_finalize.connect(_wrap_all, weak=False)


def _wrap_all(sender: Celery, **kwargs: object) -> None:
    for name, task in list(sender.tasks.items()):
        if not name.startswith("celery."):  # Celery's own (chord_unlock, backend_cleanup)
            _wrap(task)


def _wrap(task: Task) -> None:
    cls = type(task)
    if getattr(cls, _WRAPPED, False):
        return
    inner: Callable[..., Any] = cls.__call__ if task_has_custom(task, "__call__") else _run
    task.__class__ = type(
        cls.__name__,
        (cls,),
        {
            "__call__": _make_call(inner),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            _WRAPPED: True,
        },
    )


def _run(task: Task, *args: Any, **kwargs: Any) -> Any:
    """Run the task body as Celery does when ``__call__`` is not overridden."""
    request = task.request_stack.top
    if request is not None and not request.called_directly:
        return task.run(*args, **kwargs)  # the tracer pushed the request already
    return Task.__call__(task, *args, **kwargs)


def _make_call(inner: Callable[..., Any]) -> Callable[..., Any]:
    def __call__(self: Task, *args: Any, **kwargs: Any) -> Any:
        config = _configs.get(self._get_app())
        request = self.request_stack.top
        if config is None:
            return inner(self, *args, **kwargs)
        if request is None or request.called_directly or request.is_eager:
            return _run_locally(config, self, request, inner, args, kwargs)
        return _run_consumed(config, self, request, inner, args, kwargs)

    return __call__


def _error_of(exc: BaseException) -> BaseException | None:
    """Return what a task's exception says about the span: the retried-for error, or None."""
    if isinstance(exc, Retry):
        return exc.exc if isinstance(exc.exc, BaseException) else exc
    if isinstance(exc, Ignore | Reject):
        return None
    return exc


def _run_consumed(
    config: _Config,
    task: Task,
    request: Any,
    inner: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    carrier = _carrier(request, config.keys)
    try:
        scope = consume(
            carrier,
            task.name,
            vars=config.vars,
            propagation=config.propagation,
            system=_SYSTEM,
            baggage=config.baggage,
            tracer_provider=config.tracer_provider,
            meter_provider=config.meter_provider,
            message_id=str(request.id),
            attempt=_attempt(request),
            retries=config.retries,
        )
        scope.__enter__()
    except Exception:  # e.g. a var registered later with a clashing name
        logger.exception(
            "ctxkit could not restore the context of Celery task %r; it runs without it",
            task.name,
        )
        return inner(task, *args, **kwargs)
    try:
        result = inner(task, *args, **kwargs)
    except BaseException as exc:
        error = _error_of(exc)
        if error is None:
            scope.__exit__(None, None, None)
        else:
            scope.__exit__(type(error), error, error.__traceback__)
        raise
    finally:
        setattr(request, _FOLLOW_UP, carrier)
    scope.__exit__(None, None, None)
    return result


def _run_locally(
    config: _Config,
    task: Task,
    request: Any,
    inner: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run an eager, applied or directly called task in a child span of the caller's."""
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": task.name,
        "ctxkit.attempt": _attempt(request),
        "ctxkit.async": False,
    }
    if request is not None and request.id is not None:
        attributes["messaging.message.id"] = str(request.id)
    span = get_tracer(config.tracer_provider).start_span(
        f"process {task.name}", kind=trace.SpanKind.CONSUMER, attributes=attributes
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        return inner(task, *args, **kwargs)
    except BaseException as exc:
        error = _error_of(exc)
        if error is not None:
            mark_error(span, error)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def _attempt(request: Any) -> int:
    retries = getattr(request, "retries", 0)
    if isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0:
        return retries + 1
    return 1


def _carrier(request: Any, keys: frozenset[str]) -> dict[str, object]:
    """Return the ctxkit headers of a worker request (custom headers are its attributes)."""
    headers = getattr(request, "headers", None)
    carrier: dict[str, object] = {}
    for key in keys:
        value = getattr(request, key, None)
        if value is None and isinstance(headers, dict):
            value = headers.get(key)
        if value is not None:
            carrier[key] = value
    return carrier


# --- producer ------------------------------------------------------------------------------------


def _instrument_sender(app: Celery) -> None:
    """Make ``app``'s message sender publish inside a send span and inject the context.

    Celery makes the sender (``app.amqp.send_task_message``, a cached property) from the
    configuration the first time it is used. The app's AMQP object gets a subclass whose
    property wraps the sender it makes, so the configuration is read as late as Celery reads
    it, and a sender remade after a configuration change is wrapped too.
    """
    amqp = app.amqp
    cls = type(amqp)
    if getattr(cls, _WRAPPED, False):
        return

    def send_task_message(self: Any) -> Callable[..., Any]:
        return _wrapped_sender(self.app, self._create_task_sender())

    amqp.__class__ = type(
        cls.__name__,
        (cls,),
        {
            "send_task_message": functools.cached_property(send_task_message),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            _WRAPPED: True,
        },
    )
    amqp.__dict__.pop("send_task_message", None)  # made already: make it again, wrapped


def _wrapped_sender(app: Celery, send: Callable[..., Any]) -> Callable[..., Any]:
    def send_task_message(producer: object, name: str, message: Any, **options: Any) -> Any:
        config = _configs.get(app)
        headers = getattr(message, "headers", None)
        if config is None or not isinstance(headers, dict):  # protocol 1: no custom headers
            return send(producer, name, message, **options)
        return _publish(config, send, headers, (producer, name, message), options)

    return send_task_message


def _publish(
    config: _Config,
    send: Callable[..., Any],
    headers: dict[str, Any],
    args: tuple[object, str, Any],
    options: dict[str, Any],
) -> Any:
    task_name = str(headers.get("task") or args[1])
    task_id = headers.get("id")
    message_id = task_id if isinstance(task_id, str) else None
    extra = options.get("headers")
    if isinstance(extra, dict) and not config.keys.isdisjoint(extra):
        # Celery merges these over the message headers when it publishes; a retry passes the
        # request's own, whose ctxkit keys describe the previous attempt: leave them out.
        options = {**options, "headers": {k: v for k, v in extra.items() if k not in config.keys}}
    context = _source_context(config)
    span = get_tracer(config.tracer_provider).start_span(
        f"send {task_name}",
        context=context.run(otel_context.get_current),
        kind=trace.SpanKind.PRODUCER,
        attributes=send_attributes(_SYSTEM, task_name, message_id),
    )
    try:
        context.run(otel_context.attach, trace.set_span_in_context(span))
        inject(
            headers,
            vars=config.vars,
            context=context,
            baggage=config.baggage,
            meter_provider=config.meter_provider,
            message_id=message_id,
        )
        # The send span is current while Celery publishes: before_task_publish receivers
        # (opentelemetry-instrumentation-celery's) see it as their parent.
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            return send(*args, **options)
        finally:
            otel_context.detach(token)
    except BaseException as exc:
        mark_error(span, exc)
        raise
    finally:
        span.end()


def _source_context(config: _Config) -> contextvars.Context:
    """Return the context a publish carries.

    That is the caller's, or the finished task's carrier when Celery publishes a follow-up
    task from the worker after the task returned (a chain's next task, callbacks).
    """
    task = current_task._get_current_object() if current_task else None
    request = getattr(task, "request", None)
    follow_up = getattr(request, _FOLLOW_UP, None)
    if isinstance(follow_up, dict):
        return extract(
            follow_up,
            vars=config.vars,
            baggage=config.baggage,
            meter_provider=config.meter_provider,
        )
    return contextvars.copy_context()
