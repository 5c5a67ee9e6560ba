"""Every exception ctxkit raises, in one place.

The hierarchy: each class also inherits the builtin a caller would already catch, so
``except RuntimeError`` keeps working for code that does not know ctxkit::

    CtxkitError (Exception)
    ├── RunnerClosedError (RuntimeError)   spawn on a runner that is closing, closed or not open
    ├── RunnerFullError (RuntimeError)     spawn past ``limit`` running + ``pending_limit`` waiting
    └── NoRunnerError (RuntimeError)       ctxkit.spawn with no runner to use (trio, no event loop)

Bad arguments raise the plain builtins ``TypeError`` and ``ValueError``.
"""

from __future__ import annotations

__all__ = ["CtxkitError", "NoRunnerError", "RunnerClosedError", "RunnerFullError"]


class CtxkitError(Exception):
    """Base class of every exception defined by ctxkit."""


class RunnerClosedError(CtxkitError, RuntimeError):
    """The runner does not take new work: it is not open yet, it is shutting down, or closed."""


class RunnerFullError(CtxkitError, RuntimeError):
    """The runner's ``limit`` running and ``pending_limit`` waiting tasks are all taken."""


class NoRunnerError(CtxkitError, RuntimeError):
    """No runner can serve ``ctxkit.spawn`` here (no event loop, or trio without an open runner)."""
