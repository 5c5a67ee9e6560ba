"""Eager checks of what ``spawn`` and ``BackgroundRunner`` are given.

Every public entry point validates here, at the call site, before anything is started: a bad
value raises ``TypeError``/``ValueError`` naming it and saying what to pass instead, and a
rejected coroutine is closed so that it can never warn "was never awaited".
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from types import CoroutineType
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ._clone import check_propagation
from ._errors import exception_text
from ._logging import logger
from ._trace import current_trace_id

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = [
    "check_hook",
    "check_limit",
    "check_seconds",
    "default_name",
    "is_async_callable",
    "is_coroutine",
    "prepare_coroutine",
    "validate_options",
]


def is_coroutine(obj: object) -> bool:
    """Tell whether ``obj`` is a coroutine object (something ``await`` runs and ``close`` ends)."""
    return type(obj) is CoroutineType or (inspect.iscoroutine(obj) and hasattr(obj, "close"))


def is_async_callable(fn: object) -> bool:
    """Tell whether calling ``fn`` returns a coroutine (``functools.partial`` unwrapped)."""
    while hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def prepare_coroutine(
    coro_or_fn: object, args: tuple[object, ...], caller: str
) -> Coroutine[Any, Any, Any]:
    """Return the coroutine to run: ``coro_or_fn`` itself, or for a function with its ``args``.

    An async function (or a ``functools.partial`` of one, or an object with an async
    ``__call__``) is called; any other callable is run by the returned coroutine in a worker
    thread (``anyio.to_thread.run_sync``), in the context the coroutine runs in.

    Raises:
        TypeError: Neither a coroutine object nor a callable, or an async function that did
            not return a coroutine.
    """
    if is_coroutine(coro_or_fn):
        if args:
            coro_or_fn.close()  # type: ignore[attr-defined]
            raise TypeError(
                f"{caller}() got a coroutine object and positional arguments {args!r}; pass "
                "either a coroutine, or a function followed by its arguments"
            )
        return coro_or_fn  # type: ignore[return-value]
    if not callable(coro_or_fn):
        raise TypeError(
            f"{caller}() takes a coroutine object, an async function or a plain function, got "
            f"{coro_or_fn!r}"
        )
    if is_async_callable(coro_or_fn):
        coro = coro_or_fn(*args)
        if is_coroutine(coro):
            return coro  # type: ignore[no-any-return]
        raise TypeError(f"{caller}(): {coro_or_fn!r} returned {coro!r}, not a coroutine")
    if inspect.isgeneratorfunction(coro_or_fn) or inspect.isasyncgenfunction(coro_or_fn):
        raise TypeError(
            f"{caller}() cannot run the generator function {coro_or_fn!r}: calling it only "
            "makes a generator; wrap the loop that consumes it in a function"
        )
    return _in_worker_thread(coro_or_fn, args)


async def _in_worker_thread(fn: Any, args: tuple[object, ...]) -> object:
    """Run the plain function ``fn(*args)`` in a worker thread, in the calling context.

    A thread cannot be stopped: when the task is cancelled or times out, it ends at once and
    the thread is left to finish on its own; what it returns then is dropped, and how it ended
    is logged (see ``_ThreadCall``), so not even that is silent.

    The function runs in a copy of the calling context (the task's clone) that anyio makes for
    this call alone and drops when it returns. The worker thread itself is anyio's (asyncio) or
    trio's, started here when none is idle, in this task's context: from 3.14 anyio 4.15 and
    trio 0.34 onwards start it in an empty ``Context`` whatever ``thread_inherit_context``
    says, so an idle worker keeps nothing of the request it was started for (before 3.14 every
    thread starts empty). ``tests/test_thread_context.py`` pins it.
    """
    call = _ThreadCall(fn, args)
    try:
        return await anyio.to_thread.run_sync(call.run, abandon_on_cancel=True)
    finally:
        call.settle()


class _ThreadCall:
    """One plain function call in a worker thread, which its task may stop waiting for."""

    __slots__ = ("abandoned", "args", "finished", "fn", "lock")

    def __init__(self, fn: Any, args: tuple[object, ...]) -> None:
        self.fn, self.args = fn, args
        self.lock = threading.Lock()
        self.finished = self.abandoned = False

    def run(self) -> object:
        try:
            result = self.fn(*self.args)
        except BaseException as exc:
            if self._finish():
                logger.error(
                    "the thread of background task %r raised after the task had ended "
                    "(cancelled or timed out): %s: %s [trace_id=%s]",
                    _name_of(self.fn),
                    type(exc).__qualname__,
                    exception_text(exc),
                    current_trace_id(),
                    exc_info=exc,
                )
            raise
        if self._finish():
            logger.warning(
                "the thread of background task %r finished after the task had ended "
                "(cancelled or timed out); its result was dropped [trace_id=%s]",
                _name_of(self.fn),
                current_trace_id(),
            )
        return result

    def _finish(self) -> bool:
        """Mark the call finished; True if its task had stopped waiting for it."""
        with self.lock:
            self.finished = True
            return self.abandoned

    def settle(self) -> None:
        """Called when the task stops waiting: abandoned, unless the call finished."""
        with self.lock:
            self.abandoned = not self.finished


def _name_of(fn: object) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else repr(fn)


def default_name(coro_or_fn: object, coro: Coroutine[Any, Any, Any]) -> str:
    """Return a task's name when ``spawn`` was given none: the function's or coroutine's."""
    if getattr(coro, "cr_code", None) is _in_worker_thread.__code__ or not is_coroutine(coro_or_fn):
        target: object = coro_or_fn
        while isinstance(target, functools.partial):
            target = target.func
        name = getattr(target, "__qualname__", None)
        if isinstance(name, str):
            return name
    name = getattr(coro, "__qualname__", None)
    return name if isinstance(name, str) else repr(coro_or_fn)


def validate_options(
    propagation: object, span: object, timeout: object, name: object
) -> float | None:
    """Check ``spawn``'s keyword options eagerly; return the timeout as a float or None."""
    check_propagation(propagation)
    if not isinstance(span, bool):
        raise TypeError(f"span must be True or False, got {span!r}")
    if not span and propagation != "child":
        raise ValueError(
            f"propagation={propagation!r} needs span=True: with span=False the task keeps the "
            "spawner's trace id and has no span of its own to link from or to start a new "
            "trace with; drop propagation=, or keep the span"
        )
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string or None, got {name!r}")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


def check_limit(name: str, value: object, minimum: int) -> int | None:
    """Return ``value`` as a limit (an int at least ``minimum``, or None for no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum} (or None for no limit), got {value!r}")
    return value


def check_seconds(name: str, value: object) -> float | None:
    """Return ``value`` as a number of seconds >= 0, or None (wait forever)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 seconds (or None to wait forever), got {value!r}")
    return float(value)


def check_hook(on_error: object) -> None:
    """Refuse an ``on_error`` that is not a plain callable (an ``async def`` would never run)."""
    if on_error is None:
        return
    if not callable(on_error):
        raise TypeError(f"on_error must be a callable taking a TaskFailure, got {on_error!r}")
    if is_async_callable(on_error):
        raise TypeError(
            f"on_error must be a plain function, got the async callable {on_error!r}: the "
            "runner calls it synchronously, so its coroutine would never run; make it a plain "
            "function that spawns the async work (ctxkit.spawn) if it needs to await"
        )
