"""The bottom layer of the runner: the plain values it reports with, and its read-only view.

``TaskOutcome``, ``RunnerStatistics`` and ``TaskInfo`` are values; ``RunnerView`` is the small
protocol through which the modules below the runner (the registry, the metrics, the signal
dump) look at a runner without knowing its class. The handle (``BackgroundTask``) and
``TaskFailure`` live in ``_handle.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal, Protocol

__all__ = ["RunnerStatistics", "RunnerView", "TaskInfo", "TaskOutcome"]


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


class RunnerView(Protocol):
    """What the lower layers may ask of a runner: whether it takes work, and snapshots.

    Each member may be called from any thread (see ``BackgroundRunner``).
    """

    @property
    def accepting(self) -> bool:
        """True while the runner takes work from outside its own tasks."""

    @property
    def closed(self) -> bool:
        """True once the runner has shut down."""

    def statistics(self) -> RunnerStatistics:
        """Return a snapshot of the runner's counters."""

    def tasks(self) -> list[TaskInfo]:
        """Return a snapshot of the runner's running and pending tasks."""
