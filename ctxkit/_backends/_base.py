"""The backend interface (``Backend``) and what every backend shares: its wrapper's frame.

The runner core (``ctxkit._core``) decides *what* happens to a task: admission, limits,
counting, finishing, drain and shutdown. A backend does only what differs between event
loops: start a task in a given context, cancel it, tell whether the calling code runs on the
backend's own loop (and thread), hand a call to that loop from another thread, and report how
each task ended through the two callbacks the core gives it:

- ``started(task, native) -> bool``: called first thing inside the task, in the task's own
  context, with the backend's cancel handle for it, by a backend that has no cancel handle
  before the task runs (trio; asyncio's ``start`` returns one); False means "cancelled before
  it ran": the backend then closes the coroutine and reports it cancelled without running it.
- ``finished(task, outcome, value)``: called once when the task's coroutine has ended, with
  the ``TaskOutcome`` the backend saw and the result (OK) or exception (ERROR).

``_asyncio.py`` runs each task as a plain ``asyncio.Task``; ``_trio.py`` as a trio system task
inside a cancel scope (so that leaving a runner's block never waits for a task that ignores its
cancellation). Nothing outside this package tests which backend it has; ``open_backend``
(the package's ``__init__``) is the one place that picks one.
"""

from __future__ import annotations

import sys
from asyncio import _get_running_loop
from asyncio import current_task as _asyncio_current_task
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from contextvars import Context
    from types import CodeType, FrameType, TracebackType


_F = TypeVar("_F", bound="Callable[..., Any]")

__all__ = ["Backend", "current_handle", "without_wrapper_frame", "wrapper"]


class Backend(Protocol):
    """What the runner core needs from an event loop."""

    @property
    def name(self) -> str:
        """``"asyncio"`` or ``"trio"``, for messages only."""

    def is_current(self) -> bool:
        """Tell whether the calling code runs on this backend's loop, in its thread."""

    @property
    def owner(self) -> object:
        """The loop's identity: ``current_owner()`` returns it exactly when ``is_current()``."""

    @property
    def current_owner(self) -> Callable[[], object]:
        """A cheap function returning the identity of the loop running in the calling thread.

        ``current_owner() is owner`` is ``is_current()``, for the core's hot path (on asyncio
        it is ``asyncio._get_running_loop``, a C function).
        """

    def start(
        self,
        task: object,
        coro: Coroutine[object, object, object],
        context: Context,
        name: str,
        timeout: float | None,
    ) -> object:
        """Start running ``coro`` as a new task in ``context`` (called on the loop's thread).

        Returns:
            The task's cancel handle when the backend has one before the task runs (the
            backend then never calls ``started``), else None (it calls ``started`` with it).
        """

    def cancel(self, native: object, task: object, coro: Coroutine[object, object, object]) -> None:
        """Cancel ``task`` (cancel handle ``native``, coroutine ``coro``), run yet or not.

        A task cancelled before its first step is still reported (``finished``, CANCELLED).
        """

    def abandoned(self, native: object) -> bool:
        """Tell whether a task not yet run (``native``: what ``start`` returned) never will.

        True when something else than the runner cancelled it before its first step (on
        asyncio the wrapper then never runs, so the core accounts for the task itself).
        """

    def run_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Make the loop call ``fn()`` soon; callable from any thread.

        Raises:
            RuntimeError: The loop is closed or its run has ended.
        """

    def is_cancellation(self, exc_type: type[BaseException]) -> bool:
        """Tell whether ``exc_type`` is this loop's cancellation exception."""

    def tearing_down(self) -> bool:
        """Tell whether the loop is cancelling all its tasks for good (``asyncio.run``'s end)."""

    def exit(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        """Undo what opening did; True if the block's exception (``exc_val``) was absorbed.

        Raises:
            BaseException: A ``KeyboardInterrupt`` or ``SystemExit`` a task raised, which ends
                the runner's block as itself.
        """


#: The code of each backend's wrapper coroutine: the coroutine of every background task's
#: loop task, with the core's handle in its local ``task`` (see ``current_handle``).
_wrappers: set[CodeType] = set()


def wrapper(fn: _F) -> _F:
    """Mark ``fn`` as a backend's wrapper coroutine function: its local ``task`` is the handle."""
    code = getattr(fn, "__code__", None)
    assert code is not None
    assert "task" in code.co_varnames
    _wrappers.add(code)
    return fn


def without_wrapper_frame(exc: BaseException) -> BaseException:
    """Drop a backend wrapper's own frame from the top of ``exc``'s traceback; return ``exc``.

    The handle keeps the exception; through that frame it would reach the handle again (a
    cycle that only the cyclic GC frees, keeping the task's values alive until then).
    """
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in _wrappers:
        exc.__traceback__ = tb.tb_next
    return exc


def current_handle() -> object | None:
    """Return the core's handle of the background task running this code, or None.

    The loop's current task runs a backend's wrapper coroutine exactly when it is a background
    task, and the wrapper's frame holds the handle; a plain task that a background task started
    (``asyncio.create_task``, a nursery) runs a coroutine of its own. Reading the handle from
    there, rather than keeping a map from loop tasks to handles, costs each spawn nothing and
    holds nothing once the task has ended (its frame is gone then).
    """
    loop = _get_running_loop()
    if loop is not None:
        native = _asyncio_current_task(loop)
        if native is None:
            return None
        coro = native.get_coro()
        if getattr(coro, "cr_code", None) not in _wrappers:
            # A task factory may wrap the coroutine it is given (Sentry's does): the wrapper
            # then runs inside the loop task's coroutine, on this call's stack.
            return _handle_on_stack(coro) if loop.get_task_factory() else None
    else:
        trio = sys.modules.get("trio")
        if trio is None:
            return None
        try:
            coro = trio.lowlevel.current_task().coro
        except RuntimeError:
            return None
        if getattr(coro, "cr_code", None) not in _wrappers:
            return None
    frame = coro.cr_frame  # type: ignore[union-attr]
    return None if frame is None else frame.f_locals.get("task")


def _handle_on_stack(top: object) -> object | None:
    """Find a backend's wrapper among the calling frames up to the loop task's own (``top``)."""
    top_frame = getattr(top, "cr_frame", None)
    if top_frame is None:
        return None
    frame: FrameType | None = sys._getframe(2)  # the caller of current_handle()'s caller
    while frame is not None:
        if frame.f_code in _wrappers:
            return frame.f_locals.get("task")
        if frame is top_frame:
            return None  # the frames above are the loop's, not this task's
        frame = frame.f_back
    return None
