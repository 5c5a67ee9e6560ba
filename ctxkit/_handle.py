"""The handle of a background task (``BackgroundTask``), what ``on_error`` gets, and their owner.

A handle is how the app looks at a task, cancels it or waits for it; the runner core is the only
code that changes its state. The handle knows its runner only through ``TaskOwner``, the three
things it asks of it (is this its loop, call this on its loop, cancel this task), so it sits
below the runner in the layers and never names the runner's class.

Thread rules: a handle's fields are written on its runner's loop only (by the core); its
public methods may be called from any thread, and those that act hand their work to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

import anyio
from opentelemetry import trace

from ._errors import TaskCancelledError, TaskNotDoneError, TaskTimeoutError
from ._logging import logger
from ._task import CANCELLED as _CANCELLED
from ._task import ERROR as _ERROR
from ._task import OK as _OK
from ._task import TIMEOUT as _TIMEOUT
from ._task import RunnerView, TaskOutcome

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Generator
    from contextvars import Context

__all__ = ["CANCEL_REQUESTED", "BackgroundTask", "TaskFailure", "TaskOwner", "run_callback"]

T = TypeVar("T")

#: A bit of ``BackgroundTask._flags``: cancel() was called (by the app or the runner's shutdown).
CANCEL_REQUESTED: Final = 2
_CANCEL_REQUESTED: Final = CANCEL_REQUESTED


class TaskOwner(Protocol):
    """What a handle asks of the runner that owns its task."""

    @property
    def runner(self) -> RunnerView | None:
        """The runner the app sees (what ``own_runner()`` returns), None once dropped."""

    def on_its_loop(self) -> bool:
        """Tell whether the calling code runs on the runner's event loop, in its thread."""

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` soon on the runner's loop (at once if that loop has gone)."""

    def cancel(self, task: BackgroundTask[Any]) -> None:
        """Cancel ``task``, which has not ended (called on the runner's loop)."""


class BackgroundTask(Generic[T]):
    """The handle of a task started by ``spawn``; dropping it never affects the task.

    The runner keeps the task alive until it ends; the handle is only for looking at it,
    cancelling it or waiting for it. Once the task has ended the handle keeps its outcome,
    result or exception and trace id, but no longer its context, so the values the task
    carried are freed with the task.
    """

    # Few slots on purpose: a runner may hold a great many of these at once (the memory case
    # of benchmarks/).
    __slots__ = (
        "_context",
        "_coro",
        "_flags",
        "_native",
        "_on_done",
        "_outcome",
        "_owner",
        "_result",
        "_span",
        "_span_context",
        "_spawned_at",
        "_started_at",
        "_timeout",
        "name",
    )

    def __init__(
        self,
        owner: TaskOwner,
        coro: Coroutine[object, object, T],
        name: str,
        context: Context,
        span: trace.Span | None,
        trace_ref: trace.SpanContext | str | None,
        timeout: float | None,
        started_at: float,
    ) -> None:
        self.name: str = name
        """The task's name (``name=`` of ``spawn``, else the coroutine's ``__qualname__``)."""
        self._owner = owner
        self._coro: Coroutine[object, object, T] | None = coro
        self._context: Context | None = context
        self._span = span
        # For its trace id (``trace_ref``): the valid span context current in the task (the
        # task span's, or the spawner's with span=False), else the task's fake trace id (kept
        # here, not read from the context, which is dropped at the end).
        self._span_context = trace_ref
        self._timeout = timeout
        # When it was spawned, and when it started (the same unless it waited for a slot).
        self._spawned_at = self._started_at = started_at
        self._flags = 0
        self._outcome: TaskOutcome | None = None
        # What the coroutine returned (outcome OK) or the exception it raised (ERROR).
        self._result: T | BaseException | None = None
        # What waits for its end: events of awaiters (set in bookkeeping) and done-callbacks
        # (called with the reports).
        self._on_done: list[anyio.Event | Callable[[BackgroundTask[T]], object]] | None = None
        # The backend's cancel handle for the started task (its asyncio.Task; on trio its
        # cancel scope), from start's return or the backend's started(); None while pending
        # and once ended.
        self._native: object = None

    def __repr__(self) -> str:
        state = self._outcome or ("running" if self._native is not None else "pending")
        return f"<BackgroundTask {self.name!r} {state} trace_id={self.trace_id}>"

    @property
    def trace_id(self) -> str | None:
        """The trace id the task's spans and log lines carry (32 hex chars), or a fake one.

        With a task span this is the span's trace id (for ``propagation="link"`` or
        ``"none"`` a new one); without, the spawner's trace id, or the fake trace id of the
        task's context when no valid span was current.
        """
        span_context = self._span_context
        if span_context is None or type(span_context) is str:
            return span_context
        return f"{span_context.trace_id:032x}"  # type: ignore[union-attr]

    @property
    def span_context(self) -> trace.SpanContext:
        """The task span's context; invalid when the task has no span of its own.

        That is with ``span=False``, when tracing is a no-op, and when the sampler dropped the
        span as it did the caller's span, which then stands in for it in the task.
        """
        if self._span is None:
            return trace.INVALID_SPAN_CONTEXT
        return self._span.get_span_context()

    @property
    def outcome(self) -> TaskOutcome | None:
        """How the task ended, or None while it is pending or running."""
        return self._outcome

    def done(self) -> bool:
        """Return True once the task has ended, whatever its outcome."""
        return self._outcome is not None

    def cancelled(self) -> bool:
        """Return True if the task ended cancelled (by ``cancel()``, shutdown or from outside).

        A task that timed out is not "cancelled": its outcome is ``"timeout"``.
        """
        return self._outcome is _CANCELLED

    def result(self) -> T:
        """Return what the task's coroutine returned, as ``asyncio.Task.result()`` does.

        Raises:
            TaskNotDoneError: The task has not ended yet.
            TaskCancelledError: The task was cancelled.
            TaskTimeoutError: The task's ``timeout`` passed.
            Exception: The task's own exception, when its outcome is ``"error"`` (it has
                been reported already; re-raising it here does not report it again).
        """
        if self._outcome is _OK:
            return self._result  # type: ignore[return-value]
        raise self._no_result()

    def exception(self) -> BaseException | None:
        """Return the exception the task raised, or None if it returned.

        Raises:
            TaskNotDoneError: The task has not ended yet.
            TaskCancelledError: The task was cancelled.
            TaskTimeoutError: The task's ``timeout`` passed.
        """
        if self._outcome is _OK:
            return None
        if self._outcome is _ERROR:
            return self._result  # type: ignore[return-value]
        raise self._no_result()

    def _no_result(self) -> BaseException:
        """The exception that ``result()`` raises for a task that did not return."""
        if self._outcome is _ERROR:
            assert isinstance(self._result, BaseException)
            return self._result
        if self._outcome is _CANCELLED:
            return TaskCancelledError(f"background task {self.name!r} was cancelled")
        if self._outcome is _TIMEOUT:
            return TaskTimeoutError(
                f"background task {self.name!r} timed out after {self._timeout}s"
            )
        return TaskNotDoneError(f"background task {self.name!r} has not ended yet")

    def add_done_callback(self, fn: Callable[[BackgroundTask[T]], object]) -> None:
        """Call ``fn(task)`` once the task has ended (soon, on the runner's loop, if it has).

        The callback runs after the runner's bookkeeping, with the task's reports, on the
        runner's loop; an exception it raises is logged on the ``ctxkit`` logger, never
        propagated. Callable from any thread: from another one, the callback is added on the
        loop, so a task that ends meanwhile still calls it.

        Raises:
            TypeError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise TypeError(f"add_done_callback() takes a callable, got {fn!r}")
        if not self._owner.on_its_loop():
            self._owner.call_soon(lambda: self._add_done_callback(fn))
            return
        self._add_done_callback(fn)

    def _add_done_callback(self, fn: Callable[[BackgroundTask[T]], object]) -> None:
        if self._outcome is None:
            if self._on_done is None:
                self._on_done = []
            self._on_done.append(fn)
            return
        self._owner.call_soon(lambda: run_callback(self, fn))

    def __await__(self) -> Generator[Any, None, T]:
        """``await task``: wait for the end, then return the result or raise as ``result()``.

        Awaiting cancels nothing: cancelling the awaiter leaves the task running. Await it
        on the runner's own event loop (from another thread or loop: ``RuntimeError``).
        """
        return self._result_when_done().__await__()

    async def _result_when_done(self) -> T:
        await self.wait()
        return self.result()

    def cancel(self) -> bool:
        """Ask the runner to cancel the task.

        A pending task ends at once with outcome ``"cancelled"`` and its coroutine is closed;
        a running one gets a cancellation at its next ``await`` and ends when its ``finally``
        blocks have run (a task that returns anyway still ends ``"cancelled"``). Cancelling
        a task that has ended does nothing.

        Callable from any thread: from another thread than the runner's loop the cancel is
        handed to that loop (neither asyncio's nor trio's cancel may be called from elsewhere)
        and takes effect there, soon after this returns.

        Returns:
            True if the task had not ended yet (from another thread: when it was called).
        """
        if self._outcome is not None:
            return False
        owner = self._owner
        if owner.on_its_loop():
            owner.cancel(self)
        else:
            owner.call_soon(self._cancel_on_loop)
        return True

    def _cancel_on_loop(self) -> None:
        """``cancel()`` on the runner's loop (the task may have ended since it was asked)."""
        if self._outcome is None:
            self._owner.cancel(self)

    async def wait(self) -> TaskOutcome:
        """Wait until the task has ended and return its outcome; never raises its exception.

        Cancelling the waiter does not cancel the task. ``await task`` waits the same way and
        returns the result instead.

        Raises:
            RuntimeError: Awaited from another event loop or thread than the runner's.
        """
        if self._outcome is None:
            if not self._owner.on_its_loop():
                raise RuntimeError(
                    f"{self!r} belongs to another event loop or thread; await it on its "
                    "runner's loop (or poll done() / add a done-callback)"
                )
            event = anyio.Event()
            if self._on_done is None:
                self._on_done = []
            self._on_done.append(event)
            await event.wait()
        assert self._outcome is not None
        return self._outcome


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """What ``on_error`` receives for a task that raised.

    Attributes:
        task: The task's handle (its ``name``, ``trace_id`` ...).
        exception: The exception the task raised.
    """

    task: BackgroundTask[object]
    exception: BaseException

    @property
    def name(self) -> str:
        """The failed task's name."""
        return self.task.name

    @property
    def trace_id(self) -> str | None:
        """The failed task's trace id (see ``BackgroundTask.trace_id``)."""
        return self.task.trace_id


def run_callback(task: BackgroundTask[Any], fn: Callable[[BackgroundTask[Any]], object]) -> None:
    """Call a done-callback; log what it raises on the ``ctxkit`` logger, never propagate it."""
    try:
        fn(task)
    except Exception:
        logger.exception("a done-callback of %r raised", task)
