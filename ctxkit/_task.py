"""The handle of one background task and the small value types around it.

``BackgroundTask`` is what ``spawn`` returns: it names the task, tells its trace id and, once it
has ended, its outcome; it can cancel the task and wait for it. ``TaskOutcome``,
``TaskFailure`` and ``RunnerStatistics`` are the plain values the runner reports with.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import anyio
from opentelemetry import trace

from ._trace import fake_trace_id_var

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Coroutine
    from contextvars import Context

    from ._runner import BackgroundRunner

__all__ = [
    "CANCEL_REQUESTED",
    "STARTED",
    "TIMED_OUT",
    "BackgroundTask",
    "RunnerStatistics",
    "TaskFailure",
    "TaskOutcome",
]

T = TypeVar("T")

#: Bits of ``BackgroundTask._flags``.
STARTED: Final = 1
CANCEL_REQUESTED: Final = 2
TIMED_OUT: Final = 4


class TaskOutcome(enum.StrEnum):
    """How a background task ended; compares equal to its string value (``"ok"``, ...)."""

    OK = "ok"
    """The coroutine returned."""
    ERROR = "error"
    """The coroutine raised an exception (reported on the span, the log and ``on_error``)."""
    TIMEOUT = "timeout"
    """Its ``timeout`` passed while it ran, and it was cancelled."""
    CANCELLED = "cancelled"
    """It was cancelled: by ``BackgroundTask.cancel()``, at shutdown, or from outside."""


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


@dataclass(frozen=True, slots=True)
class RunnerStatistics:
    """A snapshot of a runner's counters.

    At every moment ``spawned == running + pending + ok + error + timeout + cancelled``.

    Attributes:
        spawned: Tasks accepted by ``spawn`` since the runner was made.
        running: Tasks started and not ended.
        pending: Tasks accepted and waiting for a free slot (``limit``).
        ok: Tasks that returned.
        error: Tasks that raised.
        timeout: Tasks cancelled because their ``timeout`` passed.
        cancelled: Tasks cancelled by ``cancel()``, at shutdown or from outside.
        rejected: Spawns refused because the runner was full (``RunnerFullError``).
    """

    spawned: int
    running: int
    pending: int
    ok: int
    error: int
    timeout: int
    cancelled: int
    rejected: int


class BackgroundTask(Generic[T]):
    """The handle of a task started by ``spawn``; dropping it never affects the task.

    The runner keeps the task alive until it ends; the handle is only for looking at it,
    cancelling it or waiting for it.
    """

    # Few slots on purpose: a runner may hold 100,000 of these (benchmarks/, case 5).
    __slots__ = (
        "_context",
        "_coro",
        "_done_event",
        "_flags",
        "_impl",
        "_outcome",
        "_result",
        "_runner",
        "_span",
        "_span_context",
        "_started_at",
        "_timeout",
        "name",
    )

    def __init__(
        self,
        runner: BackgroundRunner,
        coro: Coroutine[object, object, T],
        name: str,
        context: Context,
        span: trace.Span | None,
        span_context: trace.SpanContext,
        timeout: float | None,
        started_at: float,
    ) -> None:
        self.name: str = name
        """The task's name (``name=`` of ``spawn``, else the coroutine's ``__qualname__``)."""
        self._runner = runner
        self._coro: Coroutine[object, object, T] | None = coro
        self._context = context
        self._span = span
        self._span_context = span_context
        self._timeout = timeout
        # When it was spawned, then (if it had to wait for a slot) when it started.
        self._started_at = started_at
        # STARTED once its first step ran, CANCEL_REQUESTED once ``cancel()`` was called (by
        # the user or the runner's shutdown), TIMED_OUT when its ``timeout`` cancelled it.
        self._flags = 0
        self._outcome: TaskOutcome | None = None
        # What the coroutine returned (outcome OK) or the exception it raised (ERROR).
        self._result: T | BaseException | None = None
        self._done_event: anyio.Event | None = None
        # The backend's object for the running task: an ``asyncio.Task`` or a cancel scope.
        self._impl: asyncio.Task[None] | anyio.CancelScope | None = None

    def __repr__(self) -> str:
        state = self._outcome or ("running" if self._flags & STARTED else "pending")
        return f"<BackgroundTask {self.name!r} {state} trace_id={self.trace_id}>"

    @property
    def trace_id(self) -> str | None:
        """The trace id the task's spans and log lines carry (32 hex chars), or a fake one.

        With a task span this is the span's trace id (for ``propagation="link"`` or
        ``"none"`` a new one); without, the spawner's trace id, or the fake trace id of the
        task's context when no valid span was current.
        """
        if self._span_context.is_valid:
            return f"{self._span_context.trace_id:032x}"
        return self._context.get(fake_trace_id_var)

    @property
    def span_context(self) -> trace.SpanContext:
        """The task span's context (invalid with ``span=False`` or when tracing is a no-op)."""
        if self._span is None:
            return trace.INVALID_SPAN_CONTEXT
        return self._span.get_span_context()

    @property
    def outcome(self) -> TaskOutcome | None:
        """How the task ended, or None while it is pending or running."""
        return self._outcome

    @property
    def exception(self) -> BaseException | None:
        """The exception the task raised (outcome ``"error"``), else None."""
        if self._outcome is TaskOutcome.ERROR:
            return self._result  # type: ignore[return-value]
        return None

    def done(self) -> bool:
        """Return True once the task has ended, whatever its outcome."""
        return self._outcome is not None

    def result(self) -> T:
        """Return what the task's coroutine returned.

        Raises:
            RuntimeError: The task has not ended, or it ended without a result (timeout or
                cancelled); the message says which.
            Exception: The task's own exception, when its outcome is ``"error"`` (it has
                been reported already; re-raising it here does not report it again).
        """
        if self._outcome is TaskOutcome.OK:
            return self._result  # type: ignore[return-value]
        if self._outcome is TaskOutcome.ERROR and isinstance(self._result, BaseException):
            raise self._result
        state = self._outcome or "still running"
        raise RuntimeError(f"background task {self.name!r} has no result: {state}")

    def _impl_done_callback(self, impl: object) -> None:
        """Done-callback of the task's ``asyncio.Task`` (internal)."""
        if self._outcome is None:
            self._runner._account_unstarted(self)

    def cancel(self) -> bool:
        """Ask the runner to cancel the task.

        A pending task ends at once with outcome ``"cancelled"`` and its coroutine is closed;
        a running one gets a cancellation at its next ``await`` and ends when its ``finally``
        blocks have run. Cancelling a task that has ended does nothing.

        Returns:
            True if the task had not ended yet.
        """
        if self._outcome is not None:
            return False
        self._runner._cancel(self)
        return True

    async def wait(self) -> TaskOutcome:
        """Wait until the task has ended and return its outcome; never raises its exception.

        Cancelling the waiter does not cancel the task.
        """
        if self._outcome is None:
            if self._done_event is None:
                self._done_event = anyio.Event()
            await self._done_event.wait()
        assert self._outcome is not None
        return self._outcome
