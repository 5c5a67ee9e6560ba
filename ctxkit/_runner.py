"""The supervising background runner: owns tasks, limits them, reports them, drains them.

``BackgroundRunner`` keeps a strong reference to every task it accepted until the task ends,
starts at most ``limit`` at once (the rest wait in FIFO order, at most ``pending_limit`` of
them), gives each a span and metrics, turns every failure into a report (span status, one log
line, ``on_error``), and at shutdown drains, then cancels what is left and says so. On asyncio
each task is a plain ``asyncio.Task`` (the cheapest thing that works); on any other backend
(trio) the tasks live in an anyio task group owned by the runner's ``async with`` block.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from asyncio import _get_running_loop
from collections import deque
from contextvars import ContextVar
from time import perf_counter
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ._clone import build_clone, check_propagation, plan_for
from ._errors import RunnerClosedError, RunnerFullError
from ._logging import logger
from ._metrics import instruments_for
from ._registry import loop_runners
from ._task import (
    CANCEL_REQUESTED,
    STARTED,
    TIMED_OUT,
    BackgroundTask,
    RunnerStatistics,
    TaskFailure,
    TaskOutcome,
)
from ._trace import get_tracer, start_span

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Iterable
    from types import TracebackType

    from opentelemetry.metrics import MeterProvider

    from ._trace import Propagation

__all__ = ["BackgroundRunner", "current_task", "prepare_coroutine", "validate_options"]

T = TypeVar("T")

_State = Literal["new", "open", "draining", "cancelling", "closed"]
_SUMMARY_NAMES: Final = 10

#: The background task whose code is running now (set inside each task's own context).
_current_task: ContextVar[BackgroundTask[Any]] = ContextVar("ctxkit.current_task")


def current_task() -> BackgroundTask[Any] | None:
    """Return the handle of the background task running this code, or None outside one."""
    return _current_task.get(None)


def _is_coroutine(obj: object) -> bool:
    return asyncio.iscoroutine(obj) and hasattr(obj, "close")


def prepare_coroutine(
    coro_or_fn: object, args: tuple[object, ...], caller: str
) -> Coroutine[Any, Any, Any]:
    """Return the coroutine to run: ``coro_or_fn`` itself, or ``coro_or_fn(*args)``.

    Raises:
        TypeError: Anything but a coroutine object or an async function (with its args).
    """
    if _is_coroutine(coro_or_fn):
        if args:
            coro_or_fn.close()  # type: ignore[attr-defined]
            raise TypeError(
                f"{caller}() got a coroutine object and positional arguments {args!r}; pass "
                "either a coroutine, or an async function followed by its arguments"
            )
        return coro_or_fn  # type: ignore[return-value]
    if callable(coro_or_fn) and _is_async_callable(coro_or_fn):
        coro = coro_or_fn(*args)
        if _is_coroutine(coro):
            return coro  # type: ignore[no-any-return]
        raise TypeError(f"{caller}(): {coro_or_fn!r} returned {coro!r}, not a coroutine")
    raise TypeError(
        f"{caller}() takes a coroutine object or an async function, got {coro_or_fn!r}; "
        "a plain function would run at once in the caller: make it `async def`, or run it "
        "in a thread with anyio.to_thread.run_sync inside an async function"
    )


def _is_async_callable(fn: object) -> bool:
    while hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
        fn = fn.func
    import inspect

    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
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


def _check_limit(name: str, value: object, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum} (or None for no limit), got {value!r}")
    return value


def _check_seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 seconds (or None to wait forever), got {value!r}")
    return float(value)


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
        cancelled, or its cancel scope or task group ending never reaches the task. On
        trio the tasks live in the runner's own task group, so cancelling the scope that
        encloses the ``async with`` block cancels them (a host shutdown, not a drain).

        *Errors.* A task that raises ends with outcome ``"error"``: its span gets status
        ERROR with the exception recorded and ``error.type``; the ``ctxkit`` logger logs it
        once at ERROR with the traceback and the trace id; ``on_error(TaskFailure)`` is
        called if given (an exception in the hook is logged, never propagated). The event
        loop never sees the exception, so "Task exception was never retrieved" cannot
        happen. ``KeyboardInterrupt`` and ``SystemExit`` are reported the same way and then
        propagate; cancellation is never swallowed.

        *Shutdown.* Leaving the ``async with`` block stops taking work from outside (tasks of
        this runner may still spawn), then drains: waits until no task is running or
        pending, including tasks spawned during the drain, or until ``drain_timeout``
        passes. Then it cancels what is left (pending tasks end at once, running ones are
        cancelled and awaited for at most ``cancel_timeout`` seconds; from then on not even
        its own tasks may spawn) and logs one summary
        line on the ``ctxkit`` logger: INFO when everything finished, WARNING naming what
        was cancelled. Leaving the block by an exception skips nothing; leaving it because
        the enclosing task was cancelled skips the drain and cancels at once.

    Args:
        limit: At most this many tasks run at once; None for no limit.
        pending_limit: At most this many accepted tasks wait for a slot; past that ``spawn``
            raises ``RunnerFullError``. None for no limit (memory then grows with the queue).
        drain_timeout: Seconds the shutdown waits for tasks to finish before cancelling them;
            None waits forever.
        on_error: Called with a ``TaskFailure`` for each task that raised, in the task's
            context (so ``current_trace_id()`` is the task's).
        tracer_provider: Where task spans are created; None means the global provider.
        meter_provider: Where the ``ctxkit`` meter lives; None means the global provider.
        cancel_timeout: Seconds the shutdown waits for cancelled tasks to finish.
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
        cancel_timeout: float = 5.0,
    ) -> None:
        self._limit = _check_limit("limit", limit, 1)
        self._pending_limit = _check_limit("pending_limit", pending_limit, 0)
        self._drain_timeout = _check_seconds("drain_timeout", drain_timeout)
        self._cancel_timeout = _check_seconds("cancel_timeout", cancel_timeout) or 0.0
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be a callable taking a TaskFailure, got {on_error!r}")
        self._on_error = on_error
        self._tracer = get_tracer(tracer_provider)
        self._metrics = instruments_for(meter_provider)
        self._state: _State = "new"
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        # Running tasks in start order (a dict, not a set): shutdown cancels them in that
        # order, which keeps waiters of one shared event cheap to wake.
        self._running: dict[BackgroundTask[Any], None] = {}
        self._pending: deque[BackgroundTask[Any]] = deque()
        self._idle: anyio.Event | None = None
        self._spawned = self._ok = self._error = self._timeout = self._cancelled = 0
        self._rejected = 0
        self._implicit = False

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<BackgroundRunner {self._state} running={s.running} pending={s.pending} "
            f"limit={self._limit} pending_limit={self._pending_limit}>"
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> BackgroundRunner:
        if self._state != "new":
            raise RuntimeError(f"{self!r} was already entered; make a new BackgroundRunner")
        self._open()
        loop_runners().add(self)
        if self._loop is None:
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
            self._task_group = task_group
        return self

    def _open(self) -> None:
        """Start taking work, bound to the running event loop (no task group needed here)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        else:
            self._loop = weakref.ref(loop)
        self._state = "open"
        self._metrics.watch(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        try:
            await self._shutdown(
                skip_drain=exc_type is not None and issubclass(exc_type, _cancelled_types())
            )
        finally:
            self._state = "closed"
            loop_runners().remove(self)
            if self._task_group is not None:
                # Every task has ended (or ignored its cancellation): close the group without
                # the body's exception, so that it propagates as it is, not in a group.
                task_group, self._task_group = self._task_group, None
                try:
                    await task_group.__aexit__(None, None, None)
                except BaseExceptionGroup as group:
                    # Tasks report and keep every Exception, so only a KeyboardInterrupt or
                    # SystemExit of a task gets here: raise it as itself, as on asyncio, not
                    # wrapped in a group the caller never made.
                    if len(group.exceptions) == 1 and not isinstance(
                        group.exceptions[0], BaseExceptionGroup
                    ):
                        raise group.exceptions[0] from None
                    raise
        return None

    async def _shutdown(self, *, skip_drain: bool) -> None:
        self._state = "draining"
        reason = "the task holding the runner was cancelled"
        try:
            if not skip_drain:
                reason = "its shutdown was cancelled"
                try:
                    await self.drain(self._drain_timeout)
                except TimeoutError:
                    reason = f"drain_timeout={self._drain_timeout}s passed"
        finally:
            # From here on not even the runner's own tasks may spawn (say, from a finally
            # block run by the cancellation): that work would escape the cancellation.
            self._state = "cancelling"
            running = list(self._running)
            pending = list(self._pending)
            for task in (*pending, *running):
                task.cancel()
            if running:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._cancel_timeout):
                    await self.drain()
            self._log_summary(reason, running, pending)

    def _log_summary(
        self, reason: str, running: list[BackgroundTask[Any]], pending: list[BackgroundTask[Any]]
    ) -> None:
        stats = self.statistics()
        counts = (
            f"spawned={stats.spawned} ok={stats.ok} error={stats.error} "
            f"timeout={stats.timeout} cancelled={stats.cancelled} rejected={stats.rejected}"
        )
        if not running and not pending:
            logger.info("ctxkit runner shut down, every task finished: %s", counts)
            return
        names = [task.name for task in (*running, *pending)]
        shown = ", ".join(names[:_SUMMARY_NAMES])
        if len(names) > _SUMMARY_NAMES:
            shown += f", and {len(names) - _SUMMARY_NAMES} more"
        stuck = len(self._running)
        logger.warning(
            "ctxkit runner shut down, %s: cancelled %d running and %d pending tasks (%s)%s; %s",
            reason,
            len(running),
            len(pending),
            shown,
            f"; {stuck} ignored cancellation and are still running" if stuck else "",
            counts,
        )

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until no task is running or pending, including tasks spawned meanwhile.

        The runner keeps taking work; this only waits. Cancelling the waiter cancels no task.

        Args:
            timeout: Give up after this many seconds; None waits as long as it takes.

        Raises:
            TimeoutError: ``timeout`` passed with tasks still running or pending (they go on).
        """
        timeout = _check_seconds("timeout", timeout)
        with anyio.fail_after(timeout):
            while self._running or self._pending:
                if self._idle is None:
                    self._idle = anyio.Event()
                await self._idle.wait()

    def statistics(self) -> RunnerStatistics:
        """Return a snapshot of the counters (see ``RunnerStatistics``)."""
        return RunnerStatistics(
            spawned=self._spawned,
            running=len(self._running),
            pending=len(self._pending),
            ok=self._ok,
            error=self._error,
            timeout=self._timeout,
            cancelled=self._cancelled,
            rejected=self._rejected,
        )

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
            nest under it. ``propagation="child"`` makes it a child of the caller's current
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
        """
        return self._submit(coro_or_fn, args, vars, name, propagation, span, timeout)

    def _submit(
        self,
        coro_or_fn: Any,
        args: tuple[object, ...],
        vars: Iterable[ContextVar[Any]],
        name: str | None,
        propagation: Propagation,
        span: bool,
        timeout: float | None,
    ) -> BackgroundTask[Any]:
        """``spawn`` with its arguments as given (``ctxkit.spawn`` calls it directly).

        This is the hot path of ctxkit: the common case (a coroutine, default options, an
        open runner with room) runs straight through, every other case takes a detour.
        """
        if type(coro_or_fn) is CoroutineType and not args:
            coro: Coroutine[Any, Any, Any] = coro_or_fn
        else:
            coro = prepare_coroutine(coro_or_fn, args, "spawn")
        try:
            if (
                propagation != "child"
                or timeout is not None
                or name is not None
                or (span is not True and span is not False)
            ):
                timeout = validate_options(propagation, span, timeout, name)
            plan = plan_for(vars, "spawn")
            loop = _get_running_loop()
            if self._state != "open" or (self._loop is not None and loop is not self._loop()):
                self._check_accepting()
            else:
                limit = self._limit
                if limit is not None and len(self._running) >= limit:
                    pending_limit = self._pending_limit
                    if pending_limit is not None and len(self._pending) >= pending_limit:
                        self._check_room()  # raises RunnerFullError
        except BaseException:
            coro.close()
            raise
        if name is None:
            name = (
                coro.__qualname__
                if type(coro) is CoroutineType
                else getattr(coro, "__qualname__", None) or repr(coro)
            )
        if span:
            task_span: trace.Span | None = start_span(
                self._tracer,
                name,
                otel_context.get_current(),
                propagation,
                attributes={"ctxkit.async": True, "ctxkit.task.name": name},
            )
            context, span_context = build_clone(plan, None, task_span, propagation)
        else:
            task_span = None
            context, span_context = plan.current()
        task = BackgroundTask(
            self, coro, name, context, task_span, span_context, timeout, perf_counter()
        )
        self._spawned += 1
        limit = self._limit
        if limit is not None and len(self._running) >= limit:
            self._pending.append(task)
        elif self._loop is not None:  # asyncio: the loop is the running one, checked above
            self._running[task] = None
            self._metrics.wait.record(0.0)
            impl = loop.create_task(_run_asyncio(task), name=name, context=context)  # type: ignore[union-attr]
            if self._implicit:
                # Only the implicit runner needs this: asyncio.run may cancel its tasks before
                # their first step, with no shutdown of ours to account for them. An entered
                # runner's shutdown finds such tasks itself (see _cancel).
                impl.add_done_callback(task._impl_done_callback)
            task._impl = impl
        else:
            self._start_in_group(task, 0.0)
        return task

    def _check_accepting(self) -> None:
        """Raise why a spawn is refused (``_submit`` calls this only off its fast path).

        The one spawn let through here is one from a task of this runner while it drains.
        """
        state = self._state
        if state == "open":  # so the spawn came from another event loop or thread
            raise RuntimeError(
                f"{self!r} belongs to another event loop or thread; spawn from its own loop "
                "(from other threads use loop.call_soon_threadsafe or anyio.from_thread)"
            )
        if state == "draining":
            task = _current_task.get(None)
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
        if pending_limit is None or len(self._pending) < pending_limit:
            return
        self._rejected += 1
        self._metrics.rejected.add(1)
        raise RunnerFullError(
            f"{self!r} is full: {limit} tasks running and {pending_limit} pending; "
            "raise limit/pending_limit, or slow the producer down"
        )

    def _start_in_group(self, task: BackgroundTask[Any], waited: float) -> None:
        """Start ``task`` in the runner's task group (not asyncio), after ``waited`` seconds.

        On asyncio ``_submit`` and ``_start_next`` start tasks themselves (inlined: it is the
        hot path).
        """
        assert self._task_group is not None
        self._running[task] = None
        self._metrics.wait.record(waited)
        self._task_group.create_task(self._run_anyio(task), name=task.name, context=task._context)

    # -- running ---------------------------------------------------------------------------

    def _failed(self, task: BackgroundTask[Any], exc: BaseException) -> bool:
        """Account for an asyncio task whose coroutine raised ``exc``; True: re-raise it."""
        if isinstance(exc, asyncio.CancelledError):
            self._finish(task, _CANCELLED)
            return True
        if isinstance(exc, Exception):
            if isinstance(exc, TimeoutError) and task._flags & TIMED_OUT:
                self._finish(task, _TIMEOUT)
            else:
                self._finish(task, _ERROR, exc)
            return False
        # KeyboardInterrupt, SystemExit: report, then let the loop re-raise it; retrieve it
        # from the task afterwards, so asyncio does not also log "exception was never
        # retrieved" for what was reported already.
        self._finish(task, _ERROR, exc)
        impl = task._impl
        if isinstance(impl, asyncio.Task):
            impl.add_done_callback(_retrieve)
        return True

    async def _run_anyio(self, task: BackgroundTask[Any]) -> None:
        coro = task._coro
        assert coro is not None
        if task._flags & CANCEL_REQUESTED:  # cancelled between spawn and its first step
            coro.close()
            self._finish(task, _CANCELLED)
            return
        task._flags |= STARTED
        _current_task.set(task)
        deadline = math.inf if task._timeout is None else anyio.current_time() + task._timeout
        cancelled = anyio.get_cancelled_exc_class()
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                task._impl = scope
                result = await coro
        except cancelled:
            self._finish(task, _CANCELLED)
            raise
        except Exception as exc:
            self._finish(task, _ERROR, exc)
        except BaseException as exc:
            self._finish(task, _ERROR, exc)
            raise
        else:
            if scope.cancelled_caught:
                timed_out = not task._flags & CANCEL_REQUESTED and anyio.current_time() >= deadline
                self._finish(task, _TIMEOUT if timed_out else _CANCELLED)
            else:
                self._finish(task, _OK, result)

    def _account_unstarted(self, task: BackgroundTask[Any]) -> None:
        """Account for an asyncio task that was cancelled before its first step.

        ``asyncio.run`` (and anything else that cancels every task) may cancel a task before
        it ever ran; its wrapper coroutine then never executes, so its outcome is recorded
        here, from the asyncio task's done-callback.
        """
        coro = task._coro
        if coro is not None:
            coro.close()
        self._finish(task, _CANCELLED)

    def _cancel(self, task: BackgroundTask[Any]) -> None:
        """Cancel ``task`` (called by ``BackgroundTask.cancel`` for a task not yet ended)."""
        task._flags |= CANCEL_REQUESTED
        if (
            not task._flags & STARTED
            and task in self._running
            and isinstance(task._impl, asyncio.Task)
        ):
            # Started on asyncio but not stepped yet: its wrapper coroutine will never run, so
            # account for it here; the done-callback sees the outcome and does nothing more.
            assert task._coro is not None
            task._coro.close()
            self._finish(task, _CANCELLED)
            task._impl.cancel()
        elif task in self._running:
            if task._impl is not None:
                task._impl.cancel()
        else:  # pending: it never ran
            self._pending.remove(task)
            assert task._coro is not None
            task._coro.close()
            self._finish(task, _CANCELLED, None, True)

    def _finish(
        self,
        task: BackgroundTask[Any],
        outcome: TaskOutcome,
        result: object = None,
        was_pending: bool = False,
    ) -> None:
        """Record how ``task`` ended; ``result`` is its return value, or for ERROR its exception."""
        task._outcome = outcome
        task._result = result
        task._coro = None
        metrics = self._metrics
        if outcome is _OK:
            self._ok += 1
            value = "ok"
        else:
            value = self._count(outcome)
        attributes = metrics.by_outcome[value].get(task.name) or metrics.attributes(
            task.name, value
        )
        metrics.finished.add(1, attributes)
        if not was_pending:
            del self._running[task]
            metrics.duration.record(perf_counter() - task._started_at, attributes)
        exception = result if outcome is _ERROR else None
        if task._span is not None:
            _end_span(task, task._span, outcome, value, exception)  # type: ignore[arg-type]
        if outcome is not _OK:
            self._report(task, outcome, exception)  # type: ignore[arg-type]
        if task._done_event is not None:
            task._done_event.set()
        if self._pending or self._idle is not None:
            self._start_next()

    def _count(self, outcome: TaskOutcome) -> str:
        """Count a task that did not end OK; return the outcome's string."""
        if outcome is _ERROR:
            self._error += 1
        elif outcome is _TIMEOUT:
            self._timeout += 1
        else:
            self._cancelled += 1
        return _OUTCOME_VALUES[outcome]  # Enum.value is a slow property on Python 3.11

    def _report(
        self, task: BackgroundTask[Any], outcome: TaskOutcome, exception: BaseException | None
    ) -> None:
        """Log a task that did not end OK (and call ``on_error`` for an error)."""
        if exception is not None:
            self._report_error(task, exception)
        elif outcome is _TIMEOUT:
            logger.warning(
                "background task %r timed out after %ss and was cancelled [trace_id=%s]",
                task.name,
                task._timeout,
                task.trace_id,
            )
        elif not task._flags & CANCEL_REQUESTED:
            logger.warning(
                "background task %r was cancelled from outside its runner before it finished "
                "[trace_id=%s]",
                task.name,
                task.trace_id,
            )
            if self._implicit and self._loop_tearing_down():
                self._close_implicit()

    def _report_error(self, task: BackgroundTask[Any], exception: BaseException) -> None:
        logger.error(
            "background task %r failed: %s: %s [trace_id=%s]",
            task.name,
            type(exception).__qualname__,
            exception,
            task.trace_id,
            exc_info=exception,
        )
        if self._on_error is not None:
            try:
                self._on_error(TaskFailure(task, exception))
            except Exception:
                logger.exception("the on_error hook of %r raised", self)

    def _loop_tearing_down(self) -> bool:
        """Tell whether every task of the loop is being cancelled, as ``asyncio.run`` does last.

        That is the sign, for the implicit runner (which no ``async with`` shuts down), that
        its loop is going away: tasks started from now on would never be cancelled or run. A
        single task cancelled from outside is not: other tasks of the loop still run.
        """
        if self._loop is None or (loop := self._loop()) is None:
            return False
        return all(task.done() or task.cancelling() for task in asyncio.all_tasks(loop))

    def _close_implicit(self) -> None:
        """Close the implicit runner at its loop's teardown: take no work, drop what waits."""
        self._state = "closed"
        for task in list(self._pending):
            task.cancel()

    def _start_next(self) -> None:
        """Start waiting tasks while there is room; wake ``drain`` when nothing is left."""
        pending = self._pending
        running = self._running
        limit = self._limit
        if pending and self._state in ("open", "draining"):
            loop = None if self._loop is None else self._loop()
            wait = self._metrics.wait
            while pending and (limit is None or len(running) < limit):
                task = pending.popleft()
                now = perf_counter()
                waited = now - task._started_at  # until now, the time of its spawn
                task._started_at = now
                if task._span is not None:
                    task._span.add_event("ctxkit.task.started", {"ctxkit.task.wait_s": waited})
                if loop is None:
                    self._start_in_group(task, waited)
                    continue
                running[task] = None  # as in _submit
                wait.record(waited)
                impl = loop.create_task(_run_asyncio(task), name=task.name, context=task._context)
                if self._implicit:
                    impl.add_done_callback(task._impl_done_callback)
                task._impl = impl
        if not pending and not running and self._idle is not None:
            self._idle.set()
            self._idle = None


_OUTCOME_VALUES: Final = {outcome: outcome.value for outcome in TaskOutcome}
_OK: Final = TaskOutcome.OK
_ERROR: Final = TaskOutcome.ERROR
_TIMEOUT: Final = TaskOutcome.TIMEOUT
_CANCELLED: Final = TaskOutcome.CANCELLED


def _end_span(
    task: BackgroundTask[Any],
    span: trace.Span,
    outcome: TaskOutcome,
    value: str,
    exception: BaseException | None,
) -> None:
    span.set_attribute("ctxkit.task.outcome", value)
    if exception is not None:
        span.set_status(Status(StatusCode.ERROR, f"{type(exception).__name__}: {exception}"))
        span.record_exception(exception)
        span.set_attribute("error.type", type(exception).__qualname__)
    elif outcome is _TIMEOUT:
        span.set_status(Status(StatusCode.ERROR, f"timed out after {task._timeout}s"))
        span.set_attribute("error.type", "timeout")
    span.end()


async def _run_asyncio(task: BackgroundTask[Any]) -> None:
    """The coroutine of a task's ``asyncio.Task``: run the task's coroutine, report its end.

    Few locals on purpose: its frame is part of the memory each pending task holds.
    """
    task._flags |= STARTED
    _current_task.set(task)
    try:
        result = await (task._coro if task._timeout is None else _run_timed(task))  # type: ignore[misc]
    except BaseException as exc:
        if task._runner._failed(task, exc):
            raise
    else:
        task._runner._finish(task, _OK, result)


async def _run_timed(task: BackgroundTask[Any]) -> object:
    """Await the task's coroutine under its ``timeout``; flag the task if the timeout hit."""
    assert task._coro is not None
    assert task._timeout is not None
    deadline = asyncio.timeout(task._timeout)
    try:
        async with deadline:
            return await task._coro
    except TimeoutError:
        if deadline.expired():
            task._flags |= TIMED_OUT
        raise


def _retrieve(impl: asyncio.Task[None]) -> None:
    if not impl.cancelled():
        impl.exception()


def _cancelled_types() -> tuple[type[BaseException], ...]:
    try:
        return (asyncio.CancelledError, anyio.get_cancelled_exc_class())
    except Exception:  # pragma: no cover - no async library running
        return (asyncio.CancelledError,)
