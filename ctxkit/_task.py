"""The plain values the runner reports with: ``TaskOutcome``, ``TaskFailure``, ``RunnerStatistics``.

The handle itself (``BackgroundTask``) lives with the runner core in ``_runner.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from ._runner import BackgroundTask

__all__ = ["RunnerStatistics", "TaskFailure", "TaskInfo", "TaskOutcome"]


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


# The members as module globals, for the runner's and the backends' hot paths (a global read,
# where ``TaskOutcome.OK`` is also an attribute look-up on an enum class).
OK: Final = TaskOutcome.OK
ERROR: Final = TaskOutcome.ERROR
TIMEOUT: Final = TaskOutcome.TIMEOUT
CANCELLED: Final = TaskOutcome.CANCELLED


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


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """One task of ``BackgroundRunner.tasks()``: a snapshot, safe to keep and to serialize.

    Attributes:
        name: The task's name.
        state: ``"running"`` (started) or ``"pending"`` (waiting for a slot).
        age: Seconds since it was spawned.
        running_for: Seconds since it started; None while it is pending.
        trace_id: The trace id its spans and log lines carry (see ``BackgroundTask.trace_id``).
    """

    name: str
    state: Literal["pending", "running"]
    age: float
    running_for: float | None
    trace_id: str | None
