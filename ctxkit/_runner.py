"""The supervising runner's core: everything between ``spawn`` and a task's end, in one file.

``BackgroundRunner`` admits work (state, owning loop, ``limit`` and ``pending_limit``), clones
the caller's context for it, starts it through its backend (``ctxkit._backends``) or queues it,
and when the backend reports the end, finishes it in two phases:

1. *Bookkeeping*, which runs no user code and cannot fail half-way: the outcome and result on
   the handle, the counters and metrics, the handle's done event, waking ``drain`` waiters,
   and starting queued tasks while there is room. Starting is a loop guarded by a flag, never
   a recursion: a task that ends during its own start (Python 3.12's eager task factory runs
   the first step inside ``create_task``) is finished by the same bookkeeping, and the outer
   loop goes on starting the next one.
2. *Reporting*: ending the task's span, the log line, ``on_error``. An exception of any kind
   here leaves the runner consistent.

Shutdown (``__aexit__``) drains for ``drain_timeout``, cancels what is left and waits at most
``cancel_timeout`` more, then logs one summary. ``BackgroundTask``, the handle ``spawn``
returns, lives here too: the core is the only code that changes its state.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections import deque
from time import perf_counter
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar, overload

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ._backends import current_handle, open_backend
from ._clone import build_clone, plan_for, plans
from ._dump import install_from_environment
from ._errors import (
    RunnerClosedError,
    RunnerFullError,
    TaskCancelledError,
    TaskNotDoneError,
    TaskTimeoutError,
)
from ._logging import exception_text, logger
from ._metrics import instruments_for
from ._options import (
    check_hook,
    check_limit,
    check_seconds,
    default_name,
    prepare_coroutine,
    validate_options,
)
from ._registry import loop_runners, process_runners
from ._task import CANCELLED as _CANCELLED
from ._task import ERROR as _ERROR
from ._task import OK as _OK
from ._task import TIMEOUT as _TIMEOUT
from ._task import RunnerStatistics, TaskFailure, TaskInfo, TaskOutcome
from ._trace import fake_trace_id_var, get_tracer, start_span

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
    from contextvars import Context, ContextVar
    from types import TracebackType

    from opentelemetry.metrics import MeterProvider

    from ._backends import Backend
    from ._trace import Propagation

__all__ = [
    "BackgroundRunner",
    "BackgroundTask",
    "current_task",
    "open_implicit_runner",
    "own_runner",
    "submit",
]

T = TypeVar("T")

_State = Literal["new", "open", "draining", "cancelling", "closed"]
_SUMMARY_NAMES: Final = 10

#: By ``id()``: ``TaskOutcome`` members hash in Python code (``Enum.__hash__``), ids in C.
_OUTCOME_VALUES: Final = {id(outcome): outcome.value for outcome in TaskOutcome}

#: Bits of ``BackgroundTask._flags``.
_CANCEL_REQUESTED: Final = 2  # cancel() was called: by the user or the runner's shutdown


def current_task() -> BackgroundTask[Any] | None:
    """Return the handle of the background task running this code, or None outside one.

    A plain task started by a background task (``asyncio.create_task``, a nursery) is not
    the background task: there this returns None. It looks the handle up in the running loop
    task's coroutine, so spawning and finishing pay nothing for it and each call pays instead:
    1.7 us on the benchmark VM with Python 3.11, 4x ``asyncio.current_task()`` (``python -m
    benchmarks.calls``). Under a task factory that wraps each coroutine it looks past the
    factory's wrapper on the task's own stack: 3 us there, more the deeper the call is made.
    """
    return current_handle()  # type: ignore[return-value]


def own_runner() -> BackgroundRunner | None:
    """Return the runner of the background task running this code, if it has not closed."""
    task = current_task()
    if task is None or task._runner._state == "closed":
        return None
    return task._runner


class BackgroundTask(Generic[T]):
    """The handle of a task started by ``spawn``; dropping it never affects the task.

    The runner keeps the task alive until it ends; the handle is only for looking at it,
    cancelling it or waiting for it. Once the task has ended the handle keeps its outcome,
    result or exception and trace id, but no longer its context, so the values the task
    carried are freed with the task.
    """

    # Few slots on purpose: a runner may hold 100,000 of these (benchmarks/, case 5).
    __slots__ = (
        "_context",
        "_coro",
        "_flags",
        "_native",
        "_on_done",
        "_outcome",
        "_result",
        "_runner",
        "_span",
        "_span_context",
        "_spawned_at",
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
        trace_ref: trace.SpanContext | str | None,
        timeout: float | None,
        started_at: float,
    ) -> None:
        self.name: str = name
        """The task's name (``name=`` of ``spawn``, else the coroutine's ``__qualname__``)."""
        self._runner = runner
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
        if not self._runner._on_its_loop():
            self._runner._call_soon(lambda: self._add_done_callback(fn))
            return
        self._add_done_callback(fn)

    def _add_done_callback(self, fn: Callable[[BackgroundTask[T]], object]) -> None:
        if self._outcome is None:
            if self._on_done is None:
                self._on_done = []
            self._on_done.append(fn)
            return
        self._runner._call_soon(lambda: _run_callback(self, fn))

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
        runner = self._runner
        if runner._on_its_loop():
            runner._cancel(self)
        else:
            runner._call_soon(self._cancel_on_loop)
        return True

    def _cancel_on_loop(self) -> None:
        """``cancel()`` on the runner's loop (the task may have ended since it was asked)."""
        if self._outcome is None:
            self._runner._cancel(self)

    async def wait(self) -> TaskOutcome:
        """Wait until the task has ended and return its outcome; never raises its exception.

        Cancelling the waiter does not cancel the task. ``await task`` waits the same way and
        returns the result instead.

        Raises:
            RuntimeError: Awaited from another event loop or thread than the runner's.
        """
        if self._outcome is None:
            if not self._runner._on_its_loop():
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


class BackgroundRunner:
    """Own background tasks: keep them alive, limit them, report them, drain them at shutdown.

    Use it as ``async with BackgroundRunner() as runner:`` around the life of the app (a
    FastAPI lifespan, an aiohttp cleanup context, the body of ``trio.run``), and start work
    with ``runner.spawn(...)`` or ``ctxkit.spawn(...)`` from anywhere in the same event loop.

    Semantics:
        *Context.* Each task runs in a clone of the context of the ``spawn`` call (see
        ``ctxkit.clone``), captured at ``spawn``: a task that waits for a free slot still
        sees its spawner's vars and trace, not whatever is current when it starts.

        *What cancels a task.* Only the runner: ``BackgroundTask.cancel()``, the task's own
        ``timeout``, or the end of the shutdown drain. The spawner returning, failing, being
        cancelled, or its cancel scope or task group ending never reaches the task, on
        asyncio and on trio alike (on trio each task is a system task of the run).

        *Errors.* A task that raises ends with outcome ``"error"``: its span gets status
        ERROR with the exception recorded and ``error.type``; the ``ctxkit`` logger logs it
        once at ERROR with the traceback and the trace id; ``on_error(TaskFailure)`` is
        called if given (an exception in the hook is logged, never propagated). The event
        loop never sees the exception, so "Task exception was never retrieved" cannot
        happen. ``KeyboardInterrupt`` and ``SystemExit`` are reported the same way and then
        end the program as themselves (on trio: the runner's ``async with`` block re-raises
        them); cancellation is never swallowed.

        *Shutdown.* Leaving the ``async with`` block stops taking work from outside (tasks of
        this runner may still spawn), then drains: waits until no task is running or
        pending, including tasks spawned during the drain, or until ``drain_timeout``
        passes. Then it cancels what is left (pending tasks end at once, running ones are
        cancelled and awaited for at most ``cancel_timeout`` seconds; from then on not even
        its own tasks may spawn) and logs one summary line on the ``ctxkit`` logger: INFO
        when nothing had to be cancelled, WARNING naming what was cancelled, longest-running
        first, and what ignored its cancellation and still runs. Leaving the block therefore
        takes at most ``drain_timeout + cancel_timeout`` on both backends; a task that
        ignores its cancellation goes on running after it (on trio, ``trio.run`` waits for it
        at the end of the run). Leaving the block by an exception skips nothing; leaving it
        because the enclosing task was cancelled skips the drain and cancels at once.

    Args:
        limit: At most this many tasks run at once; None for no limit.
        pending_limit: At most this many accepted tasks wait for a slot; past that ``spawn``
            raises ``RunnerFullError``. None for no limit (memory then grows with the queue).
        drain_timeout: Seconds the shutdown waits for tasks to finish before cancelling them;
            None waits forever.
        on_error: A plain function called with a ``TaskFailure`` for each task that raised,
            in the task's context (so ``current_trace_id()`` is the task's).
        tracer_provider: Where task spans are created; None means the global provider.
        meter_provider: Where the ``ctxkit`` meter lives; None means the global provider.
        cancel_timeout: Seconds the shutdown waits for cancelled tasks to finish; None waits
            forever.

    Raises:
        TypeError: An option has the wrong type (``on_error`` an ``async def`` included).
        ValueError: An option has a bad value.
    """

    def __init__(
        self,
        *,
        limit: int | None = 100,
        pending_limit: int | None = 10_000,
        drain_timeout: float | None = 30.0,
        on_error: Callable[[TaskFailure], object] | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        cancel_timeout: float | None = 5.0,
    ) -> None:
        self._limit = check_limit("limit", limit, 1)
        self._pending_limit = check_limit("pending_limit", pending_limit, 0)
        self._drain_timeout = check_seconds("drain_timeout", drain_timeout)
        self._cancel_timeout = check_seconds("cancel_timeout", cancel_timeout)
        check_hook(on_error)
        self._on_error = on_error
        self._tracer = get_tracer(tracer_provider)
        self._metrics = instruments_for(meter_provider)
        self._state: _State = "new"
        self._backend: Backend | None = None
        # The backend's loop identity and how to read the caller's (see Backend.owner).
        self._owner: object = None
        self._current_owner: Callable[[], object] = _no_owner
        # Running tasks in start order (a dict, not a set): the summary names the oldest first.
        self._running: dict[BackgroundTask[Any], bool] = {}
        # Waiting tasks in spawn order; a cancelled one stays until popped (cancel is O(1)),
        # so the live count is kept apart.
        self._pending: deque[BackgroundTask[Any]] = deque()
        self._pending_count = 0
        self._waiters: list[anyio.Event] = []
        self._spawned = self._ok = self._error = self._timeout = self._cancelled = 0
        self._rejected = 0
        self._starting = False
        self._implicit = False
        # Spawns from other threads: admission there and arrival here go through the lock,
        # and so does leaving "open"; ``_inbound`` counts the accepted ones not yet arrived.
        self._lock = threading.Lock()
        self._inbound = 0
        # The implicit runner, once its loop tears down: the names the teardown cancelled.
        self._torn_down: list[str] | None = None

    def __repr__(self) -> str:
        return (
            f"<BackgroundRunner {self._state} running={len(self._running)} "
            f"pending={self._pending_count} limit={self._limit} "
            f"pending_limit={self._pending_limit}>"
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> BackgroundRunner:
        if self._state != "new":
            raise RuntimeError(f"{self!r} was already entered; make a new BackgroundRunner")
        self._open(implicit=False)
        loop_runners().add(self)
        process_runners.add(self)
        install_from_environment(process_runners)
        return self

    def _open(self, *, implicit: bool) -> None:
        """Bind to the event loop running in this thread and start taking work."""
        self._backend = backend = open_backend(
            self._task_started, self._finish, watch_unstarted=implicit
        )
        self._owner = backend.owner
        self._current_owner = backend.current_owner
        self._implicit = implicit
        self._state = "open"
        self._metrics.watch(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        assert self._backend is not None
        try:
            await self._shutdown(
                skip_drain=exc_type is not None and self._backend.is_cancellation(exc_type)
            )
        finally:
            self._state = "closed"
            loop_runners().remove(self)
            process_runners.remove(self)
            absorbed = self._backend.exit(exc_type, exc_val, exc_tb)
        return absorbed or None

    async def _shutdown(self, *, skip_drain: bool) -> None:
        with self._lock:  # from now on no other thread's spawn is accepted
            self._state = "draining"
        if not self._implicit:
            loop_runners().refresh()  # ctxkit.spawn picks another runner of the loop now
        reason: str | None = "the task holding the runner was cancelled"
        try:
            if not skip_drain:
                reason = "its shutdown was cancelled"
                try:
                    await self.drain(self._drain_timeout)
                    reason = None
                except TimeoutError:
                    reason = f"drain_timeout={_seconds(self._drain_timeout)} passed"
        finally:
            # From here on not even the runner's own tasks may spawn (say, from a finally
            # block run by the cancellation): that work would escape the cancellation.
            self._state = "cancelling"
            running = list(self._running)
            pending = self._live_pending()
            for task in (*pending, *running):
                task._cancel_on_loop()  # cancel() without its thread check: this is the loop
            if running:
                timeout = math.inf if self._cancel_timeout is None else self._cancel_timeout
                with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                    await self._wait_idle(None)
            self._log_summary(reason, running, pending)

    def _live_pending(self) -> list[BackgroundTask[Any]]:
        return [task for task in self._pending if task._outcome is None]

    def _log_summary(
        self,
        reason: str | None,
        running: list[BackgroundTask[Any]],
        pending: list[BackgroundTask[Any]],
    ) -> None:
        stats = self.statistics()
        counts = (
            f"spawned={stats.spawned} ok={stats.ok} error={stats.error} "
            f"timeout={stats.timeout} cancelled={stats.cancelled} rejected={stats.rejected}"
        )
        if not running and not pending:
            if stats.error or stats.timeout or stats.cancelled:
                logger.info("ctxkit runner shut down, no task left to cancel: %s", counts)
            else:
                logger.info("ctxkit runner shut down, every task finished: %s", counts)
            return
        stuck = list(self._running)
        logger.warning(
            "ctxkit runner shut down, %s: cancelled %d running and %d pending tasks (%s)%s; %s",
            reason,
            len(running),
            len(pending),
            _names(running + pending),
            f"; {len(stuck)} ignored cancellation and are still running ({_names(stuck)})"
            if stuck
            else "",
            counts,
        )

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until no task is running or pending, including tasks spawned meanwhile.

        The runner keeps taking work; this only waits. Cancelling the waiter cancels no task.
        Called from one of this runner's own tasks, it waits for every *other* task (a task
        never waits for itself).

        Args:
            timeout: Give up after this many seconds; None waits as long as it takes.

        Raises:
            TimeoutError: ``timeout`` passed with tasks still running or pending (they go on).
            RuntimeError: Awaited from another event loop or thread than the open runner's
                (its wake-ups are made on its own loop).
        """
        timeout = check_seconds("timeout", timeout)
        if self._backend is not None and not self._backend.is_current():
            raise RuntimeError(
                f"{self!r} belongs to another event loop or thread; await drain() on its "
                "loop, or poll statistics() (a RunnerThread: call its stop())"
            )
        me = current_task()
        with anyio.fail_after(timeout):
            await self._wait_idle(me if me is not None and me._runner is self else None)

    async def _wait_idle(self, me: BackgroundTask[Any] | None) -> None:
        while self._busy() > (me is not None and me in self._running):
            event = anyio.Event()
            self._waiters.append(event)
            await event.wait()

    def _on_its_loop(self) -> bool:
        """Tell whether the calling code runs on this runner's event loop."""
        return self._backend is not None and self._backend.is_current()

    def _call_soon(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` soon on the runner's loop; at once if that loop has gone."""
        if self._backend is not None:
            try:
                self._backend.run_soon_threadsafe(fn)
            except RuntimeError:  # the loop is closed, or its run ended
                pass
            else:
                return
        fn()

    def _busy(self) -> int:
        """Count the tasks that keep a drain waiting: running, pending, or on their way here."""
        return len(self._running) + self._pending_count + self._inbound

    def statistics(self) -> RunnerStatistics:
        """Return a snapshot of the counters (see ``RunnerStatistics``).

        Read on the runner's own loop it is exact; read from another thread it may miss the
        tasks that end at that very instant (and it never counts spawns from other threads
        that have not reached the loop yet).
        """
        return RunnerStatistics(
            spawned=self._spawned,
            running=len(self._running),
            pending=self._pending_count,
            ok=self._ok,
            error=self._error,
            timeout=self._timeout,
            cancelled=self._cancelled,
            rejected=self._rejected,
        )

    def tasks(self) -> list[TaskInfo]:
        """Return a snapshot of the running tasks, oldest start first, then the pending ones.

        Each ``TaskInfo`` has the task's name, state, seconds since spawn, seconds running and
        trace id. It copies no more than that, one ``TaskInfo`` per task (meant to be cheap
        enough for a health endpoint; not benchmarked yet), and may be called from any thread.
        """
        now = perf_counter()
        running = [
            TaskInfo(t.name, "running", now - t._spawned_at, now - t._started_at, t.trace_id)
            for t in list(self._running)
        ]
        pending = [
            TaskInfo(t.name, "pending", now - t._spawned_at, None, t.trace_id)
            for t in list(self._pending)
            if t._outcome is None
        ]
        return running + pending

    @property
    def closed(self) -> bool:
        """True once the runner has shut down (``spawn`` then raises ``RunnerClosedError``)."""
        return self._state == "closed"

    @property
    def accepting(self) -> bool:
        """True while the runner takes work from outside its own tasks."""
        return self._state == "open"

    # -- spawning --------------------------------------------------------------------------

    @overload
    def spawn(
        self,
        coro_or_fn: Coroutine[Any, Any, T],
        *,
        vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
        name: str | None = None,
        propagation: Propagation = "child",
        span: bool = True,
        timeout: float | None = None,
    ) -> BackgroundTask[T]: ...

    @overload
    def spawn(
        self,
        coro_or_fn: Callable[..., Awaitable[T]],
        *args: object,
        vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
        name: str | None = None,
        propagation: Propagation = "child",
        span: bool = True,
        timeout: float | None = None,
    ) -> BackgroundTask[T]: ...

    @overload
    def spawn(
        self,
        coro_or_fn: Callable[..., T],
        *args: object,
        vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
        name: str | None = None,
        propagation: Propagation = "child",
        span: bool = True,
        timeout: float | None = None,
    ) -> BackgroundTask[T]: ...

    def spawn(
        self,
        coro_or_fn: object,
        *args: object,
        vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
        name: str | None = None,
        propagation: Propagation = "child",
        span: bool = True,
        timeout: float | None = None,
    ) -> BackgroundTask[Any]:
        """Start ``coro_or_fn`` in the background under this runner and return its handle.

        Semantics:
            The task runs in a clone of the calling context made now (``vars`` plus the
            registered vars, and the trace; see ``ctxkit.clone``). With ``span=True`` it runs
            inside a span named ``name`` (default: the coroutine's ``__qualname__``), kind
            INTERNAL, attributes ``ctxkit.async``, ``ctxkit.task.name`` and, at its end,
            ``ctxkit.task.outcome``; the span is current in the task, so the task's own spans
            nest under it (unless the sampler dropped it as it did the caller's span: then the
            caller's span stays current, under which they are sampled alike, see
            docs/background.md). ``propagation="child"`` makes it a child of the caller's current
            span, ``"link"`` a new trace linked to it, ``"none"`` a new trace. With
            ``span=False`` there is no task span and the task keeps the caller's trace id
            (or a fake one), as ``clone_without_span``.

            The span starts at ``spawn`` and ends with the task, so time spent waiting for a
            slot is inside it (for a task that had to wait, an event ``ctxkit.task.started``
            marks its start; the ``ctxkit.task.wait`` histogram records every task's wait,
            0.0 when it started at once); ``timeout`` counts from the start. Only the runner
            cancels the task (see the class docstring).

        Args:
            coro_or_fn: A coroutine object, or an async function followed by its ``args``.
            *args: Positional arguments for ``coro_or_fn`` when it is a function.
            vars: ContextVars to carry, besides the registered ones.
            name: The task's name, for its span, logs and metrics.
            propagation: ``"child"``, ``"link"`` or ``"none"``; see above.
            span: Whether the task gets a span of its own.
            timeout: Cancel the task if it runs longer than this many seconds (outcome
                ``"timeout"``).

        Returns:
            The task's handle.

        Raises:
            TypeError: ``coro_or_fn`` is neither a coroutine nor an async function, a var is
                not a ContextVar, or an option has the wrong type. A rejected coroutine is
                closed, never left un-awaited.
            ValueError: An option has a bad value.
            RunnerClosedError: The runner is not open, or is shutting down and the caller is
                not one of its tasks.
            RunnerFullError: ``limit`` tasks run and ``pending_limit`` wait already.
            RuntimeError: Called from another event loop or thread than the runner's.
            Exception: The event loop refused to start the task (a task factory of the app
                raised this). The task has ended then with that error, reported as any failed
                task is (``on_error``, the log, its span), and its coroutine is closed. A task
                that waited for a slot, or was spawned from another thread, ends the same way
                when its start is refused, with nobody to raise to. An exception of the app's
                sampler or span processor as the task's span starts is raised as it is, and
                leaves nothing of the task: its coroutine is closed, and it is not counted.
        """
        return submit(self, coro_or_fn, args, vars, name, propagation, span, timeout)

    def _check_accepting(self) -> None:
        """Raise why a spawn is refused (``submit`` calls this only off its fast path).

        The one spawn let through here is one from a task of this runner while it drains.
        """
        state = self._state
        if state == "open":  # so the spawn came from another event loop or thread
            assert self._backend is not None
            raise RuntimeError(
                f"{self!r} belongs to another event loop or thread; spawn from its own "
                f"{self._backend.name} loop"
            )
        if state == "draining":
            task = current_task()
            if task is not None and task._runner is self:
                self._check_room()
                return
            raise RunnerClosedError(
                f"{self!r} is shutting down and takes no new work from outside its own tasks"
            )
        if state == "new":
            raise RunnerClosedError(
                f"{self!r} is not open yet; use `async with BackgroundRunner() as runner:`"
            )
        if state == "cancelling":
            raise RunnerClosedError(
                f"{self!r} is cancelling its remaining tasks at shutdown and takes no new "
                "work, not even from them"
            )
        raise RunnerClosedError(f"{self!r} is closed; spawn work before it shuts down")

    def _check_room(self) -> None:
        limit = self._limit
        if limit is None or len(self._running) < limit:
            return
        pending_limit = self._pending_limit
        if pending_limit is None or self._pending_count < pending_limit:
            return
        self._rejected += 1
        raise self._full()

    def _full(self) -> RunnerFullError:
        """Count a rejected spawn in the metrics; return the error that says why."""
        self._metrics.rejected.add(1)
        return RunnerFullError(
            f"{self!r} is full: {self._limit} tasks running and {self._pending_limit} pending; "
            "raise limit/pending_limit, or slow the producer down"
        )

    def _count_in(self, task: BackgroundTask[Any]) -> bool:
        """Count an accepted task as running (True: start it now) or queue it (False)."""
        self._spawned += 1
        limit = self._limit
        if limit is not None and len(self._running) >= limit:
            self._pending.append(task)
            self._pending_count += 1
            return False
        self._running[task] = True
        return True

    def _launch(self, task: BackgroundTask[Any]) -> None:
        """Start a task counted as running, on the loop, as soon as it was counted."""
        self._metrics.wait.record(0.0)
        assert self._backend is not None
        assert task._coro is not None
        assert task._context is not None
        try:
            native = self._backend.start(task, task._coro, task._context, task.name, task._timeout)
        except Exception as exc:
            self._start_failed(task, exc)
        else:
            self._hold(task, native)

    def _start_failed(self, task: BackgroundTask[Any], exc: Exception) -> None:
        """End a task counted as running whose start raised ``exc``: an ERROR, never run.

        What raises is the event loop's own start of a task (a task factory of the app, a loop
        that refuses tasks), not the task. The task ends with that exception as any failed
        task does (counted, logged, ``on_error``, its span); its coroutine is closed. So the
        runner never counts a task that will not run, and drain and shutdown never wait for it.
        """
        if task._coro is not None:
            task._coro.close()
        self._finish(task, _ERROR, exc)

    def _hold(self, task: BackgroundTask[Any], native: object) -> None:
        """Keep what ``start`` returned as the task's cancel handle; apply an earlier cancel.

        A task may have ended during its start (an eager first step), or been cancelled then
        (by itself), before its cancel handle was known.
        """
        if native is None or task._outcome is not None:
            return  # the backend gives the handle to started() instead, or the task has ended
        task._native = native
        if task._flags & _CANCEL_REQUESTED:
            assert self._backend is not None
            assert task._coro is not None
            self._backend.cancel(native, task, task._coro)

    def _reserve_from_thread(self) -> None:
        """Admit a spawn made in another thread than the loop's, or raise why not.

        Runs in the calling thread, under the lock: the runner must be open and have room
        for the tasks running, pending and on their way. The task is counted once it
        arrives (``_arrive``).
        """
        with self._lock:
            if self._state != "open":
                pass  # raised below, outside the lock
            else:
                limit, pending_limit = self._limit, self._pending_limit
                if (
                    limit is None
                    or pending_limit is None
                    or self._busy() < limit + pending_limit
                    or len(self._running) + self._inbound < limit
                ):
                    self._inbound += 1
                    return
                self._rejected += 1
        if self._state != "open":
            self._check_accepting()  # raises RunnerClosedError
        raise self._full()

    def _unreserve(self) -> None:
        """Give back the slot ``_reserve_from_thread`` took for a task that will not arrive.

        Called in the spawning thread. A drain waiting on the loop for that task is woken: it
        looks again at what is left.
        """
        with self._lock:
            self._inbound -= 1
        assert self._backend is not None  # reserved while open
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits there
            self._backend.run_soon_threadsafe(self._wake_waiters)

    def _wake_waiters(self) -> None:
        """Wake every drain waiting for the runner to go idle (each checks again)."""
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    def _hand_over(self, task: BackgroundTask[Any]) -> None:
        """Send a task spawned in another thread to the loop (its slot is reserved)."""
        assert self._backend is not None
        try:
            self._backend.run_soon_threadsafe(lambda: self._arrive(task))
        except BaseException:
            self._unreserve()
            assert task._coro is not None
            task._coro.close()
            if task._span is not None:
                task._span.end()
            raise

    def _arrive(self, task: BackgroundTask[Any]) -> None:
        """Count, and start or queue, a task spawned in another thread (on the loop)."""
        with self._lock:
            self._inbound -= 1
            accepted = self._state in ("open", "draining")
            start = accepted and self._count_in(task)
        if start:
            self._launch(task)
        elif not accepted:
            # Admitted in its thread just before the shutdown's cancelling began: it never
            # runs, and says so.
            self._spawned += 1
            self._pending_count += 1
            self._pending.append(task)
            task.cancel()
            logger.warning(
                "background task %r, spawned from another thread, reached %r after its "
                "shutdown had begun and was cancelled [trace_id=%s]",
                task.name,
                self,
                task.trace_id,
            )

    # -- the backend's two callbacks ---------------------------------------------------------

    def _task_started(self, task: Any, native: object) -> bool:
        """First thing in a task, in its context: False if it was cancelled before it ran.

        Called by a backend that has the task's cancel handle (``native``) only once it runs.
        """
        if task._flags & _CANCEL_REQUESTED:
            return False
        task._native = native
        return True

    def _cancel(self, task: BackgroundTask[Any]) -> None:
        """Cancel ``task`` (called by ``BackgroundTask.cancel`` for a task not yet ended)."""
        task._flags |= _CANCEL_REQUESTED
        if task in self._running:
            assert self._backend is not None
            native = task._native
            if native is None:
                return  # its cancel handle is not known yet: _hold() or started() sees the flag
            if self._backend.abandoned(native):
                # Cancelled by something else before it ran: it never will, so end it here.
                assert task._coro is not None
                task._coro.close()
                self._finish(task, _CANCELLED, None)
            else:
                assert task._coro is not None
                self._backend.cancel(native, task, task._coro)
            return
        # Pending: it never ran. It stays in the queue until popped (see _finish).
        self._pending_count -= 1
        assert task._coro is not None
        task._coro.close()
        self._finish(task, _CANCELLED, None)
        pending = self._pending
        if len(pending) > 2 * self._pending_count + 64:
            live = self._live_pending()
            pending.clear()  # in place: a _finish that is starting queued tasks holds it
            pending.extend(live)

    # -- finishing ---------------------------------------------------------------------------

    def _finish(self, task: Any, outcome: TaskOutcome, value: object) -> None:
        """Finish a task: all bookkeeping first (no user code), then its reports.

        The backend calls it when a task's coroutine has ended (``value`` is the result, or
        for ERROR the exception); the core when it ends a task that never ran. Bookkeeping:
        the handle, the counters and metrics, waking awaiters and drains, starting queued
        tasks. Then ``_report``: the span, a log line, ``on_error``, done-callbacks.
        """
        if task._outcome is not None:
            return  # reported twice (an implicit runner's done-callback): the first counts
        flags = task._flags
        if flags & _CANCEL_REQUESTED and outcome is _OK:
            outcome, value = _CANCELLED, None  # it returned although it was cancelled
        ran = self._running.pop(task, False)  # False: it was pending
        task._outcome = outcome
        task._result = value
        task._coro = None
        task._context = None
        if outcome is _OK:
            self._ok += 1
            value_name = "ok"
        else:
            if outcome is _ERROR:
                self._error += 1
            elif outcome is _TIMEOUT:
                self._timeout += 1
            else:
                self._cancelled += 1
            value_name = _OUTCOME_VALUES[id(outcome)]
        metrics = self._metrics
        name = task.name
        series = metrics.by_outcome[value_name].get(name) or metrics.series(name, value_name)
        series.finished += 1
        now = None
        if ran:
            now = perf_counter()
            metrics.duration.record(now - task._started_at, series.attributes)
        if task._on_done is not None:
            for waiter in task._on_done:
                if isinstance(waiter, anyio.Event):
                    waiter.set()
        if self._waiters and self._busy() <= 1:
            self._wake_waiters()
        if (
            outcome is _CANCELLED
            and self._implicit
            and self._torn_down is None
            and not flags & _CANCEL_REQUESTED
        ):
            self._check_teardown(task)
        if (
            ran
            and self._pending_count
            and not self._starting
            and (self._state == "open" or self._state == "draining")
        ):
            # Its slot is free and tasks wait: start them while there is room. Tasks queue
            # only while the runner is full, so only a running task's end makes room (the
            # first start needs no check). This loop never re-enters itself: a task that ends
            # during a start (its first step run eagerly) finds _starting set and starts none;
            # the room it left is seen after that start. The state is not checked again: what
            # leaves "open" and "draining" during a start cancels every queued task, so the
            # count drops to 0.
            self._starting = True
            try:
                pending = self._pending
                limit = self._limit or sys.maxsize  # set: tasks queue only under a limit
                while True:
                    nxt = pending.popleft()  # the live count is above 0: a live one is left
                    if nxt._outcome is not None:
                        continue  # cancelled while it waited
                    self._pending_count -= 1
                    if now is None:
                        now = perf_counter()
                    waited = now - nxt._started_at  # until now, the time of its spawn
                    nxt._started_at = now
                    if nxt._span is not None:
                        nxt._span.add_event("ctxkit.task.started", {"ctxkit.task.wait_s": waited})
                    self._running[nxt] = True
                    metrics.wait.record(waited)
                    try:
                        native = self._backend.start(  # type: ignore[union-attr]  # set: it ran
                            nxt,
                            nxt._coro,  # type: ignore[arg-type]  # set until the task ends
                            nxt._context,  # type: ignore[arg-type]
                            nxt.name,
                            nxt._timeout,
                        )
                    except Exception as exc:  # the loop refused it: it ends, the next may start
                        self._start_failed(nxt, exc)
                    else:
                        if native is not None and nxt._outcome is None:  # self._hold(), inlined
                            nxt._native = native
                            if nxt._flags & _CANCEL_REQUESTED:  # cancelled during its start
                                self._backend.cancel(native, nxt, nxt._coro)  # type: ignore[union-attr,arg-type]
                    if not self._pending_count or len(self._running) >= limit:
                        break
                    now = None  # its start may have run its first step (an eager task factory)
            finally:
                self._starting = False
        task._native = None  # the loop's task object: let it (and its context) go
        if (
            outcome is not _OK
            or task._span is not None
            or task._on_done is not None
            or self._torn_down is not None
        ):
            self._report(task, outcome, value)  # current_task() is still the task here

    def _report(self, task: BackgroundTask[Any], outcome: TaskOutcome, value: object) -> None:
        """Tell the world how ``task`` ended: its span, a log line, ``on_error``.

        Each report is made even when an earlier one raised (a span processor's ``on_end``, a
        done-callback, ``on_error``): that is logged, and never escapes into the task, where
        it would end a trio run (a system task must not raise) or go unseen on asyncio.
        """
        exception = value if outcome is _ERROR else None
        if task._span is not None:
            try:
                _end_span(task, task._span, outcome, exception)  # type: ignore[arg-type]
            except Exception:  # a span processor of the app: the rest is reported all the same
                logger.exception(
                    "ending the span of background task %r raised [trace_id=%s]",
                    task.name,
                    task.trace_id,
                )
        if task._on_done is not None:
            waiters, task._on_done = task._on_done, None
            for waiter in waiters:
                if not isinstance(waiter, anyio.Event):
                    _run_callback(task, waiter)
        if outcome is _OK:
            pass
        elif exception is not None:
            self._report_error(task, exception)  # type: ignore[arg-type]
        elif outcome is _TIMEOUT:
            logger.warning(
                "background task %r timed out after %ss and was cancelled [trace_id=%s]",
                task.name,
                task._timeout,
                task.trace_id,
            )
        elif not task._flags & _CANCEL_REQUESTED:
            self._report_outside_cancel(task)
        if self._torn_down is not None and not self._running:
            self._log_teardown()

    def _report_error(self, task: BackgroundTask[Any], exception: BaseException) -> None:
        logger.error(
            "background task %r failed: %s: %s [trace_id=%s]",
            task.name,
            type(exception).__qualname__,
            exception_text(exception),
            task.trace_id,
            exc_info=exception,
        )
        if self._on_error is not None:
            try:
                self._on_error(TaskFailure(task, exception))
            except Exception:
                logger.exception("the on_error hook of %r raised", self)

    def _check_teardown(self, first: BackgroundTask[Any]) -> None:
        """Close the implicit runner if its loop is going away (``asyncio.run``'s end).

        Tasks started from then on would never run or be cancelled: take no more work, drop
        what waits, and say once, when the last task has ended, what the teardown cancelled.
        """
        assert self._backend is not None
        if not self._backend.tearing_down():
            return
        waiting = self._live_pending()
        # Named longest-running first (the tasks still running are in start order).
        self._torn_down = [first.name, *(task.name for task in (*self._running, *waiting))]
        self._state = "closed"
        for task in waiting:
            task._cancel_on_loop()

    def _report_outside_cancel(self, task: BackgroundTask[Any]) -> None:
        """Log a task cancelled by something else than its runner (once per loop teardown)."""
        if self._torn_down is not None:
            return  # named in the teardown's summary
        logger.warning(
            "background task %r was cancelled from outside its runner before it finished "
            "[trace_id=%s]",
            task.name,
            task.trace_id,
        )

    def _log_teardown(self) -> None:
        names, self._torn_down = self._torn_down or [], []
        stats = self.statistics()
        logger.warning(
            "ctxkit's implicit runner: the event loop shut down and cancelled %d background "
            "tasks (%s); open a BackgroundRunner around the app to drain them instead; "
            "spawned=%d ok=%d error=%d timeout=%d cancelled=%d",
            len(names),
            _names(names),
            stats.spawned,
            stats.ok,
            stats.error,
            stats.timeout,
            stats.cancelled,
        )


def open_implicit_runner() -> BackgroundRunner:
    """Return a new, open runner for a loop where none was opened (asyncio, default limits).

    Nobody drains it: at its loop's end (``asyncio.run``) what still runs is cancelled, and
    one summary line says what.
    """
    runner = BackgroundRunner()
    runner._open(implicit=True)
    return runner


def submit(
    runner: BackgroundRunner,
    coro_or_fn: Any,
    args: tuple[object, ...],
    vars: Iterable[ContextVar[Any]],
    name: str | None,
    propagation: Propagation,
    span: bool,
    timeout: float | None,
    on_its_loop: bool = False,
) -> BackgroundTask[Any]:
    """``runner.spawn`` with its arguments as given (``ctxkit.spawn`` calls it directly).

    This is the hot path of ctxkit: the common case (a coroutine, default options, an open
    runner with room, called on its loop) runs straight through; every other case detours.
    ``on_its_loop``: the caller knows that this code runs on the runner's loop (``ctxkit.spawn``
    found the runner among that loop's), so that is not checked again.
    """
    if type(coro_or_fn) is CoroutineType and not args:
        coro: Coroutine[Any, Any, Any] = coro_or_fn
    else:
        coro = prepare_coroutine(coro_or_fn, args, "spawn")
    from_thread = False
    # Whether the task waits for a slot; None: not known yet (decided at admission).
    queued: bool | None = False
    try:
        if (
            propagation != "child"
            or timeout is not None
            or name is not None
            or (span is not True and span is not False)
        ):
            timeout = validate_options(propagation, span, timeout, name)
        try:
            plan = plans[vars]  # type: ignore[index]  # plan_for's first case, inlined
        except (KeyError, TypeError):
            plan = plan_for(vars, "spawn")
        if runner._state != "open":
            runner._check_accepting()
            queued = None
        elif not on_its_loop and runner._current_owner() is not runner._owner:
            runner._reserve_from_thread()
            from_thread = True
        else:
            limit = runner._limit
            if limit is not None and len(runner._running) >= limit:
                queued = True
                pending_limit = runner._pending_limit
                if pending_limit is not None and runner._pending_count >= pending_limit:
                    runner._check_room()  # raises RunnerFullError
    except BaseException:
        coro.close()
        raise
    task_span: trace.Span | None = None
    try:  # code of the app runs here too: a sampler, span processors
        if name is None:
            name = coro.__qualname__ if coro is coro_or_fn else default_name(coro_or_fn, coro)
        if span:
            task_span = start_span(
                runner._tracer,
                name,
                otel_context.get_current(),
                propagation,
                attributes={"ctxkit.async": True, "ctxkit.task.name": name},
            )
            context, span_context = build_clone(plan, None, task_span, propagation)
            if (
                type(task_span) is trace.NonRecordingSpan
                and span_context != task_span.get_span_context()
            ):
                # Dropped like the caller's span, which stands in for it in the task (see
                # dropped_like): the task has no span of its own, as with span=False.
                task_span = None
        else:
            context, span_context = plan.current()
        trace_ref = (
            span_context
            if span_context is plan.valid_span_context
            else _trace_ref(span_context, context)
        )
        task = BackgroundTask(
            runner, coro, name, context, task_span, trace_ref, timeout, perf_counter()
        )
    except BaseException:  # admitted, not counted yet: nothing of it is left behind
        coro.close()
        if task_span is not None:
            task_span.end()
        if from_thread:
            runner._unreserve()
        raise
    if from_thread:
        runner._hand_over(task)
        return task
    # Admission on the runner's loop: ``_count_in`` then ``_launch``, inlined (the hot path).
    runner._spawned += 1
    if queued is None or span:
        # Not known yet, or the span's processors (code of the app) may have spawned since.
        limit = runner._limit
        queued = limit is not None and len(runner._running) >= limit
    if queued:
        runner._pending.append(task)
        runner._pending_count += 1
        return task
    runner._running[task] = True
    runner._metrics.wait.record(0.0)
    backend = runner._backend
    assert backend is not None
    try:
        native = backend.start(task, coro, context, name, timeout)
    except Exception as exc:  # the loop refused it (its task factory raised): say so twice
        runner._start_failed(task, exc)
        raise
    if native is not None and task._outcome is None:  # runner._hold(), inlined
        task._native = native
        if task._flags & _CANCEL_REQUESTED:
            backend.cancel(native, task, coro)  # cancelled during its start (an eager first step)
    return task


def _trace_ref(span_context: trace.SpanContext, context: Context) -> trace.SpanContext | str | None:
    """What a task's handle keeps for its trace id: the span context if valid, else the fake id."""
    return span_context if span_context.is_valid else context.get(fake_trace_id_var)


def _no_owner() -> object:
    return _no_owner  # never a loop: a runner that was not opened owns none


def _run_callback(task: BackgroundTask[Any], fn: Callable[[BackgroundTask[Any]], object]) -> None:
    try:
        fn(task)
    except Exception:
        logger.exception("a done-callback of %r raised", task)


def _end_span(
    task: BackgroundTask[Any],
    span: trace.Span,
    outcome: TaskOutcome,
    exception: BaseException | None,
) -> None:
    try:
        span.set_attribute("ctxkit.task.outcome", _OUTCOME_VALUES[id(outcome)])
        if exception is not None:
            text = exception_text(exception)
            span.set_status(Status(StatusCode.ERROR, f"{type(exception).__name__}: {text}"))
            span.set_attribute("error.type", type(exception).__qualname__)
            span.record_exception(exception)
        elif outcome is _TIMEOUT:
            span.set_status(Status(StatusCode.ERROR, f"timed out after {task._timeout}s"))
            span.set_attribute("error.type", "timeout")
    finally:
        span.end()  # whatever failed above: a span never ended is never exported


def _names(names: Iterable[BackgroundTask[Any] | str]) -> str:
    shown = [item if isinstance(item, str) else item.name for item in names]
    text = ", ".join(shown[:_SUMMARY_NAMES])
    if len(shown) > _SUMMARY_NAMES:
        text += f", and {len(shown) - _SUMMARY_NAMES} more"
    return text


def _seconds(value: float | None) -> str:
    if value is None:
        return "None"
    return f"{value!r}s"
