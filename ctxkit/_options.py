"""Eager checks of what ``spawn`` and ``BackgroundRunner`` are given.

Every public entry point validates here, at the call site, before anything is started: a bad
value raises ``TypeError``/``ValueError`` naming it and saying what to pass instead, and a
rejected coroutine is closed so that it can never warn "was never awaited".
"""

from __future__ import annotations

import inspect
import math
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from ._clone import check_propagation

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = [
    "check_hook",
    "check_limit",
    "check_seconds",
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
    """Return the coroutine to run: ``coro_or_fn`` itself, or ``coro_or_fn(*args)``.

    Raises:
        TypeError: Anything but a coroutine object or an async function (with its args).
    """
    if is_coroutine(coro_or_fn):
        if args:
            coro_or_fn.close()  # type: ignore[attr-defined]
            raise TypeError(
                f"{caller}() got a coroutine object and positional arguments {args!r}; pass "
                "either a coroutine, or an async function followed by its arguments"
            )
        return coro_or_fn  # type: ignore[return-value]
    if callable(coro_or_fn) and is_async_callable(coro_or_fn):
        coro = coro_or_fn(*args)
        if is_coroutine(coro):
            return coro  # type: ignore[no-any-return]
        raise TypeError(f"{caller}(): {coro_or_fn!r} returned {coro!r}, not a coroutine")
    raise TypeError(
        f"{caller}() takes a coroutine object or an async function, got {coro_or_fn!r}; "
        "a plain function would run at once in the caller: make it `async def`, or run it "
        "in a thread with anyio.to_thread.run_sync inside an async function"
    )


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
