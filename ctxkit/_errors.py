"""Every exception ctxkit raises, in one place.

The hierarchy: each class also inherits the builtin a caller would already catch, so
``except RuntimeError`` keeps working for code that does not know ctxkit::

    CtxkitError (Exception)
    ├── RunnerClosedError (RuntimeError)   spawn on a runner that is closing, closed or not open
    ├── RunnerFullError (RuntimeError)     spawn past ``limit`` running + ``pending_limit`` waiting
    ├── NoRunnerError (RuntimeError)       ctxkit.spawn with no runner to use (trio, no event loop)
    ├── TaskNotDoneError (RuntimeError, asyncio.InvalidStateError)
    │                                      result()/exception() of a task that has not ended
    ├── TaskTimeoutError (TimeoutError)    await / result() of a task whose timeout passed
    └── TaskCancelledError (asyncio.CancelledError)
                                           await / result() of a task that was cancelled

``TaskCancelledError`` is an ``asyncio.CancelledError``, as what awaiting a cancelled
``asyncio.Task`` raises, so code that already handles that case handles it; it is also a
``CtxkitError`` (and so an ``Exception``), which ``asyncio.CancelledError`` is not.

Bad arguments raise the plain builtins ``TypeError`` and ``ValueError``.
"""

from __future__ import annotations

import asyncio

__all__ = [
    "CtxkitError",
    "NoRunnerError",
    "RunnerClosedError",
    "RunnerFullError",
    "TaskCancelledError",
    "TaskNotDoneError",
    "TaskTimeoutError",
    "exception_text",
]


class CtxkitError(Exception):
    """Base class of every exception defined by ctxkit."""


class RunnerClosedError(CtxkitError, RuntimeError):
    """The runner does not take new work: it is not open yet, it is shutting down, or closed."""


class RunnerFullError(CtxkitError, RuntimeError):
    """The runner's ``limit`` running and ``pending_limit`` waiting tasks are all taken."""


class NoRunnerError(CtxkitError, RuntimeError):
    """No runner can serve ``ctxkit.spawn`` here (no event loop, or trio without an open runner)."""


class TaskNotDoneError(CtxkitError, RuntimeError, asyncio.InvalidStateError):
    """``result()`` or ``exception()`` of a background task that has not ended yet."""


class TaskTimeoutError(CtxkitError, TimeoutError):
    """The awaited background task ended because its ``timeout`` passed."""


class TaskCancelledError(CtxkitError, asyncio.CancelledError):
    """The awaited background task was cancelled (``cancel()``, shutdown, or from outside)."""


def exception_text(exc: BaseException) -> str:
    """Return ``str(exc)``, or a stand-in when the exception's own ``__str__`` raises.

    The text goes into log lines and span statuses that must be made whatever the task raised:
    logging would drop a record whose argument cannot be formatted.
    """
    try:
        return str(exc)
    except Exception:
        return f"<str() of the {type(exc).__qualname__} raised>"
