"""What the framework integrations share: the per-request switch and the start of one task.

A set-up application's middleware sets ``switch`` for the requests it serves; the frameworks'
background-task classes, patched once per process, look at it. While it is unset (an
application that was not set up, code outside any request, a ctxkit task itself) they keep
the framework's own behaviour. While it is set, a task records a copy of the context when it
is made (``add_task``, ``BackgroundTask(...)``), and running it starts one ctxkit task in that
context instead of running the function inline. A copy of a context is cheap (it shares its
mapping); what the ctxkit task sees is the clone that ``spawn`` takes from it.
"""

from __future__ import annotations

import functools
from contextvars import Context, ContextVar, copy_context
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .._clone import selection
from .._errors import CtxkitError, exception_text
from .._logging import logger
from .._options import validate_options
from .._spawn import spawn
from .._trace import current_trace_id

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .._runner import BackgroundRunner
    from .._trace import Propagation

__all__ = ["Detach", "capture", "make_detach", "start", "switch"]


@dataclass(frozen=True, slots=True)
class Detach:
    """The spawn options of a set-up application, and its runner (None: ``spawn``'s choice)."""

    vars: tuple[ContextVar[Any], ...]
    propagation: Propagation
    span: bool
    timeout: float | None
    runner: Callable[[], BackgroundRunner | None]


#: The options of the set-up application serving the current request; unset elsewhere.
switch: Final[ContextVar[Detach | None]] = ContextVar("ctxkit.contrib.detach", default=None)


def _no_runner() -> BackgroundRunner | None:
    return None


def make_detach(
    caller: str,
    vars: object,
    propagation: object,
    span: object,
    timeout: object,
    runner: Callable[[], BackgroundRunner | None] = _no_runner,
) -> Detach:
    """Check the options as ``ctxkit.spawn`` does, eagerly, and return them as a ``Detach``.

    Raises:
        TypeError: A bad option type (``vars`` not a tuple or list of ContextVars included).
        ValueError: A bad option value.
    """
    seconds = validate_options(propagation, span, timeout, None)
    if not isinstance(vars, tuple | list):
        raise TypeError(f"{caller}(): vars must be a tuple or list of ContextVars, got {vars!r}")
    carried = tuple(vars)
    selection(carried, caller)
    return Detach(carried, propagation, span, seconds, runner)  # type: ignore[arg-type]


def capture() -> Context | None:
    """Return a copy of the current context if a set-up application serves this code."""
    return copy_context() if switch.get() is not None else None


def start(
    config: Detach,
    context: Context | None,
    fn: Callable[..., object],
    args: tuple[object, ...],
    kwargs: Mapping[str, object],
) -> None:
    """Start ``fn(*args, **kwargs)`` as one ctxkit task in ``context`` (None: the current one).

    The task is spawned with the application's options, on its runner if it has one, else on
    ``ctxkit.spawn``'s choice, and named after ``fn``. A refused spawn (the runner is full,
    closed or missing) never reaches the framework, which would end the connection: it is
    logged at ERROR on the ``ctxkit`` logger with the trace id, and the other tasks go on.
    """
    target: Callable[..., object] = functools.partial(fn, **kwargs) if kwargs else fn
    run = context.run if context is not None else _call
    run(_spawn, config, target, args)


def _call(fn: Callable[..., None], *args: object) -> None:
    fn(*args)


def _spawn(config: Detach, target: Callable[..., object], args: tuple[object, ...]) -> None:
    runner = config.runner()
    try:
        if runner is not None:
            runner.spawn(
                target,
                *args,
                vars=config.vars,
                propagation=config.propagation,
                span=config.span,
                timeout=config.timeout,
            )
        else:
            spawn(
                target,
                *args,
                vars=config.vars,
                propagation=config.propagation,
                span=config.span,
                timeout=config.timeout,
            )
    except CtxkitError as exc:
        logger.error(
            "the background task %r of a request was not started: %s: %s [trace_id=%s]",
            _name_of(target),
            type(exc).__qualname__,
            exception_text(exc),
            current_trace_id(),
        )


def _name_of(fn: object) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else repr(fn)
