"""The runner's core: its state, admission and the queue, and finishing a task.

``RunnerCore`` holds everything a runner keeps about its tasks and is the one implementation
of the mechanisms every path shares:

- *Admission* (``enter`` then ``launch``): count a task in and start it, or queue it while
  ``limit`` tasks run. ``spawn`` on the loop, a task handed over from another thread
  (``_handover.py``) and the end of a task (``start_queued``) all go through it.
- *Finishing* (``finish``), in two phases. First the bookkeeping, which runs no user code and
  cannot fail half-way: the outcome and result on the handle, the counters and metrics, the
  handle's done events, waking drains, starting queued tasks while there is room. Starting is a
  loop guarded by a flag, never a recursion: a task that ends during its own start (Python
  3.12's eager task factory runs the first step inside ``create_task``) is finished by the
  same bookkeeping, and the outer loop goes on starting the next one. Then the reports
  (``_reporting.py``): span, done-callbacks, log line, ``on_error``.
- *Cancelling* a task, pending or running (``cancel``, the handle's ``TaskOwner`` side).

The layers above it use it: ``_handover.py`` (spawns from other threads), ``_lifecycle.py``
(open, drain, shutdown) and the public face, ``BackgroundRunner`` (``_runner.py``). The core
knows that face only as a ``RunnerView``.

Thread rules (who may touch each mutable field):

- ``lock`` guards ``inbound`` and ``rejected`` (other threads change them),
  and every change of ``state`` away from ``"open"`` (a thread admits only while it is open).
- Every other mutable field (``running``, ``pending``, ``pending_count``, ``waiters``, the
  outcome counters, ``spawned``, ``starting``, ``torn_down``, the metric ``counts``) and every
  handle's fields are
  touched on the runner's loop only, in its thread. Other threads only read them, for the
  snapshots of ``statistics()`` and ``tasks()``, copying a container before iterating it.
- ``backend``, ``owner``, ``current_owner`` and ``implicit`` are written once, when the runner
  opens, before any other thread can reach it.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio

from ._errors import RunnerFullError
from ._handle import CANCEL_REQUESTED, BackgroundTask
from ._metrics import Counts
from ._reporting import OUTCOME_VALUES, log_teardown, report
from ._task import CANCELLED, ERROR, OK, TIMEOUT, RunnerStatistics, TaskInfo, TaskOutcome

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry import trace

    from ._backends._base import Backend
    from ._handle import TaskFailure
    from ._metrics import Instruments
    from ._task import RunnerView

__all__ = ["RunnerCore", "State"]

State = Literal["new", "open", "draining", "cancelling", "closed"]
_CANCEL_REQUESTED: Final = CANCEL_REQUESTED


class RunnerCore:
    """The state of one runner and the mechanisms that change it; see the module docstring."""

    def __init__(
        self,
        runner: RunnerView,
        *,
        limit: int | None,
        pending_limit: int | None,
        tracer: trace.Tracer,
        metrics: Instruments,
        on_error: Callable[[TaskFailure], object] | None,
    ) -> None:
        # The public face, weakly: the face holds the core, and the tasks hold the core, so a
        # face the app has dropped is freed at once, not by the cyclic collector.
        self._runner: Final = weakref.ref(runner)
        self.limit: Final = limit
        self.pending_limit: Final = pending_limit
        self.tracer: Final = tracer
        self.metrics: Final = metrics
        #: This runner's counts of finished tasks, by outcome and name (the loop's only).
        self.counts: Final = Counts(metrics)
        self._tallies: Final = self.counts.by_outcome
        self.on_error: Final = on_error
        self.state: State = "new"
        self.backend: Backend | None = None
        #: The backend's loop identity and how to read the caller's (see ``Backend.owner``).
        self.owner: object = None
        self.current_owner: Callable[[], object] = _no_owner
        self.implicit = False
        #: Running tasks in start order (a dict, not a set): the summary names the oldest first.
        self.running: dict[BackgroundTask[Any], bool] = {}
        #: Waiting tasks in spawn order; a cancelled one stays until popped (cancel is O(1)),
        #: so the live count is kept apart.
        self.pending: deque[BackgroundTask[Any]] = deque()
        self.pending_count = 0
        #: Events of drains waiting for the runner to go idle.
        self.waiters: list[anyio.Event] = []
        #: Tasks counted in by ``enter``; the outcome counters.
        self.spawned = self.ok = self.error = self.timeouts = self.cancelled = 0
        #: Whether ``start_queued`` is running (it never re-enters itself).
        self.starting = False
        #: The implicit runner, once its loop tears down: the names the teardown cancelled.
        self.torn_down: list[str] | None = None
        self.lock: Final = threading.Lock()
        #: Spawns accepted in other threads that have not reached the loop yet (counted as
        #: spawned and pending by ``statistics()``; ``enter`` counts them once they arrive).
        self.inbound = 0
        #: Spawns refused because the runner was full.
        self.rejected = 0

    # -- what a handle asks of its owner (TaskOwner) ----------------------------------------

    @property
    def runner(self) -> RunnerView | None:
        """The public face (what ``own_runner()`` returns), None once the app has dropped it."""
        return self._runner()

    def on_its_loop(self) -> bool:
        """Tell whether the calling code runs on this runner's event loop."""
        return self.backend is not None and self.backend.is_current()

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` soon on the runner's loop; at once if that loop has gone."""
        if self.backend is not None:
            try:
                self.backend.run_soon_threadsafe(fn)
            except RuntimeError:  # the loop is closed, or its run ended
                pass
            else:
                return
        fn()

    def cancel(self, task: BackgroundTask[Any]) -> None:
        """Cancel ``task``, which has not ended (on the loop)."""
        task._flags |= _CANCEL_REQUESTED
        if task in self.running:
            assert self.backend is not None
            assert task._coro is not None
            native = task._native
            if native is None:
                return  # its cancel handle is not known yet: hold() or started() sees the flag
            if self.backend.abandoned(native):
                # Cancelled by something else before it ran: it never will, so end it here.
                task._coro.close()
                self.finish(task, CANCELLED, None)
            else:
                self.backend.cancel(native, task, task._coro)
            return
        # Pending: it never ran. It stays in the queue until popped (see start_queued).
        self.pending_count -= 1
        assert task._coro is not None
        task._coro.close()
        self.finish(task, CANCELLED, None)
        pending = self.pending
        if len(pending) > 2 * self.pending_count + 64:
            live = self.live_pending()
            pending.clear()  # in place: a start_queued under way holds it
            pending.extend(live)

    # -- snapshots (any thread) ----------------------------------------------------------------

    def busy(self) -> int:
        """Count the tasks that keep a drain waiting: running, pending, or on their way here."""
        return len(self.running) + self.pending_count + self.inbound

    def live_pending(self) -> list[BackgroundTask[Any]]:
        """The queued tasks not cancelled yet, in spawn order."""
        return [task for task in list(self.pending) if task._outcome is None]

    def statistics(self) -> RunnerStatistics:
        """A snapshot of the counters; a task on its way from a thread counts as pending.

        ``spawned``, ``pending_count`` and ``running`` are read under ``lock`` with
        ``inbound``: a handed-over task moves from one to the others under that lock
        (``_handover._arrive``), so a snapshot sees it in exactly one place, and no counter of
        a later snapshot reads lower.
        """
        with self.lock:
            inbound, rejected = self.inbound, self.rejected
            spawned, pending, running = self.spawned, self.pending_count, len(self.running)
        return RunnerStatistics(
            spawned=spawned + inbound,
            running=running,
            pending=pending + inbound,
            ok=self.ok,
            error=self.error,
            timeout=self.timeouts,
            cancelled=self.cancelled,
            rejected=rejected,
        )

    def tasks(self) -> list[TaskInfo]:
        """A snapshot of the running tasks, oldest start first, then the pending ones."""
        now = perf_counter()
        running = [
            TaskInfo(t.name, "running", now - t._spawned_at, now - t._started_at, t.trace_id)
            for t in list(self.running)
        ]
        pending = [
            TaskInfo(t.name, "pending", now - t._spawned_at, None, t.trace_id)
            for t in self.live_pending()
        ]
        return running + pending

    # -- admission ---------------------------------------------------------------------------

    def full(self) -> RunnerFullError:
        """Count a refused spawn (the caller holds ``lock``); return the error that says why."""
        self.rejected += 1
        self.metrics.rejected.add(1)
        return RunnerFullError(
            f"{self.runner!r} is full: {self.limit} tasks running and {self.pending_limit} "
            "pending; raise limit/pending_limit, or slow the producer down"
        )

    def check_room(self) -> None:
        """Raise ``RunnerFullError`` if ``limit`` tasks run and ``pending_limit`` wait (loop)."""
        limit = self.limit
        if limit is None or len(self.running) < limit:
            return
        pending_limit = self.pending_limit
        if pending_limit is None or self.pending_count < pending_limit:
            return
        with self.lock:
            error = self.full()
        raise error

    def enter(self, task: BackgroundTask[Any]) -> bool:
        """Count a task in, as running (True: ``launch`` it now) or queued while ``limit`` run.

        On the loop; ``_handover`` calls it under ``lock``, so a snapshot taken in another
        thread sees the task either on its way or here.
        """
        self.spawned += 1
        limit = self.limit
        if limit is not None and len(self.running) >= limit:
            self.pending.append(task)
            self.pending_count += 1
            return False
        self.running[task] = True
        self.metrics.wait.record(0.0)
        return True

    def launch(self, task: BackgroundTask[Any]) -> Exception | None:
        """Start a task counted as running, through the backend; keep its cancel handle.

        A start that the loop refuses (a task factory of the app raised) ends the task as an
        ERROR with that exception, as any failed task ends (counted, logged, ``on_error``, its
        span), its coroutine closed: so the runner never counts a task that will not run.

        Returns:
            None, or the exception the loop refused the task with (the task has ended).
        """
        assert self.backend is not None
        coro = task._coro
        assert coro is not None
        try:
            native = self.backend.start(task, coro, task._context, task.name, task._timeout)  # type: ignore[arg-type]
        except Exception as exc:
            coro.close()
            self.finish(task, ERROR, exc)
            return exc
        if native is not None and task._outcome is None:
            # The backend had the cancel handle before the task ran (else it gives it to
            # started()); a cancel made during an eager first step is applied now.
            task._native = native
            if task._flags & _CANCEL_REQUESTED:
                self.backend.cancel(native, task, coro)
        return None

    def start_queued(self, now: float | None = None) -> None:
        """Start queued tasks while there is room (on the loop; never re-enters itself).

        Called when a running task's end has made room (so the first start needs no check).
        ``now``: ``perf_counter()`` read just before, the start time of the first task. A task
        that ends during a start (its first step run eagerly) finds ``starting`` set and starts
        none; the room it left is seen after that start. What leaves ``"open"`` and
        ``"draining"`` during a start cancels every queued task, so the count drops to 0.
        """
        self.starting = True
        try:
            pending = self.pending
            limit = self.limit or sys.maxsize  # set: tasks queue only under a limit
            while True:
                task = pending.popleft()  # the live count is above 0: a live one is left
                if task._outcome is not None:
                    continue  # cancelled while it waited
                self.pending_count -= 1
                if now is None:
                    now = perf_counter()
                waited = now - task._started_at  # until now, the time of its spawn
                task._started_at = now
                if task._span is not None:
                    task._span.add_event("ctxkit.task.started", {"ctxkit.task.wait_s": waited})
                self.running[task] = True
                self.metrics.wait.record(waited)
                self.launch(task)  # if the loop refuses it, it has ended: go on
                if not self.pending_count or len(self.running) >= limit:
                    break
                now = None  # the start may have run its first step (an eager task factory)
        finally:
            self.starting = False

    # -- the backend's callbacks -----------------------------------------------------------------

    def task_started(self, task: Any, native: object) -> bool:
        """First thing in a task, in its context: False if it was cancelled before it ran.

        Called by a backend that has the task's cancel handle (``native``) only once it runs.
        """
        if task._flags & _CANCEL_REQUESTED:
            return False
        task._native = native
        return True

    def finish(self, task: Any, outcome: TaskOutcome, value: object) -> None:
        """Finish a task: all bookkeeping first (no user code), then its reports.

        The backend calls it when a task's coroutine has ended (``value`` is the result, or for
        ERROR the exception); the core when it ends a task that never ran.
        """
        if task._outcome is not None:
            return  # reported twice (an implicit runner's done-callback): the first counts
        flags = task._flags
        if flags & _CANCEL_REQUESTED and outcome is OK:
            outcome, value = CANCELLED, None  # it returned although it was cancelled
        ran = self.running.pop(task, False)  # False: it was pending
        task._outcome = outcome
        task._result = value
        task._coro = None
        task._context = None
        if outcome is OK:
            self.ok += 1
            value_name = "ok"
        else:
            if outcome is ERROR:
                self.error += 1
            elif outcome is TIMEOUT:
                self.timeouts += 1
            else:
                self.cancelled += 1
            value_name = OUTCOME_VALUES[id(outcome)]
        name = task.name
        tally = self._tallies[value_name].get(name) or self.counts.tally(name, value_name)
        tally.finished += 1
        now = None
        if ran:
            now = perf_counter()
            self.metrics.duration.record(now - task._started_at, tally.attributes)
        if task._on_done is not None:
            for waiter in task._on_done:
                if isinstance(waiter, anyio.Event):
                    waiter.set()
        if self.waiters and self.busy() <= 1:
            self.wake_waiters()
        if (
            outcome is CANCELLED
            and self.implicit
            and self.torn_down is None
            and not flags & _CANCEL_REQUESTED
        ):
            self._check_teardown(task)
        if (
            ran
            and self.pending_count
            and not self.starting
            and (self.state == "open" or self.state == "draining")
        ):
            # Its slot is free and tasks wait. Tasks queue only while the runner is full, so
            # only a running task's end makes room.
            self.start_queued(now)
        task._native = None  # the loop's task object: let it (and its context) go
        torn_down = self.torn_down is not None
        if outcome is not OK or task._span is not None or task._on_done is not None or torn_down:
            report(task, outcome, value, self.on_error, torn_down=torn_down)
            if torn_down and not self.running:
                names, self.torn_down = self.torn_down or [], []
                if names:
                    log_teardown(names, self.statistics())

    def wake_waiters(self) -> None:
        """Wake every drain waiting for the runner to go idle (each checks again)."""
        waiters, self.waiters = self.waiters, []
        for event in waiters:
            event.set()

    def _check_teardown(self, first: BackgroundTask[Any]) -> None:
        """Close the implicit runner if its loop is going away (``asyncio.run``'s end).

        Tasks started from then on would never run or be cancelled: take no more work, drop
        what waits, and say once, when the last task has ended, what the teardown cancelled.
        """
        assert self.backend is not None
        if not self.backend.tearing_down():
            return
        waiting = self.live_pending()
        # Named longest-running first (the tasks still running are in start order).
        self.torn_down = [first.name, *(task.name for task in (*self.running, *waiting))]
        with self.lock:
            self.state = "closed"
        for task in waiting:
            task._cancel_on_loop()


def _no_owner() -> object:
    return _no_owner  # never a loop: a runner that was not opened owns none
