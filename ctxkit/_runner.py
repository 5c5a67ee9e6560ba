"""``BackgroundRunner``, the runner's public face, and ``submit``, the path of every spawn.

The face holds the options and delegates: its state and the mechanisms that change it are
the core's (``_core.py``: admission and the queue, finishing a task), spawns from other
threads go through ``_handover.py``, opening, drain and shutdown through ``_lifecycle.py``,
and what the runner says about its tasks through ``_reporting.py``. ``submit`` validates a
spawn, clones the caller's context, starts the task's span and makes the handle, then hands
the task to the core (on the loop) or to the handover (from another thread).

This module also makes the registries of runners (``loops``: each event loop's,
``process_runners``: the whole process's), which ``ctxkit.spawn`` picks a runner from.
"""

from __future__ import annotations

from time import perf_counter
from types import CoroutineType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from opentelemetry import context as otel_context
from opentelemetry import trace

from ._backends._base import current_handle
from ._clone import build_clone, plan_for
from ._core import RunnerCore
from ._dump import install_from_environment
from ._handle import BackgroundTask
from ._handover import hand_over, reserve, unreserve
from ._lifecycle import (
    begin_shutdown,
    check_accepting,
    drain,
    end_shutdown,
    open_core,
    refusal,
)
from ._metrics import instruments_for
from ._options import (
    check_hook,
    check_limit,
    check_seconds,
    default_name,
    prepare_coroutine,
    validate_options,
)
from ._registry import LoopRegistry, ProcessRunners
from ._trace import fake_trace_id_var, get_tracer, start_span

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Iterable
    from contextvars import ContextVar
    from types import TracebackType

    from opentelemetry.metrics import MeterProvider

    from ._handle import TaskFailure
    from ._task import RunnerStatistics, TaskInfo
    from ._trace import Propagation

__all__ = [
    "BackgroundRunner",
    "current_task",
    "loops",
    "open_implicit_runner",
    "own_runner",
    "process_runners",
    "submit",
]

T = TypeVar("T")


def current_task() -> BackgroundTask[Any] | None:
    """Return the handle of the background task running this code, or None outside one.

    A plain task started by a background task (``asyncio.create_task``, a nursery) is not
    the background task: there this returns None. It looks the handle up in the running loop
    task's coroutine, so spawning and finishing pay nothing for it and each call pays instead
    (``python -m benchmarks.calls`` measures it). Under a task factory that wraps each
    coroutine it looks past the factory's wrapper on the task's own stack, which costs more
    the deeper the call is made.
    """
    return current_handle()  # type: ignore[return-value]


def own_runner() -> BackgroundRunner | None:
    """Return the runner of the background task running this code, if it has not closed."""
    task = current_task()
    if task is None:
        return None
    runner = task._owner.runner
    if not isinstance(runner, BackgroundRunner) or runner.closed:
        return None
    return runner


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

        *Threads.* ``spawn`` and the handles' methods may be called from any thread (see
        docs/threads.md), and so may ``statistics()``, ``tasks()``, ``closed`` and
        ``accepting``; ``drain()`` and the ``async with`` block run on the runner's own
        loop. The runner keeps only its options, set once in ``__init__``; its state is its
        core's (``ctxkit._core.RunnerCore``), whose docstring says who may touch each field.

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
        limit = check_limit("limit", limit, 1)
        pending_limit = check_limit("pending_limit", pending_limit, 0)
        self._drain_timeout = check_seconds("drain_timeout", drain_timeout)
        self._cancel_timeout = check_seconds("cancel_timeout", cancel_timeout)
        check_hook(on_error)
        self._core = RunnerCore(
            self,
            limit=limit,
            pending_limit=pending_limit,
            tracer=get_tracer(tracer_provider),
            metrics=instruments_for(meter_provider),
            on_error=on_error,
        )

    def __repr__(self) -> str:
        core = self._core
        return (
            f"<BackgroundRunner {core.state} running={len(core.running)} "
            f"pending={core.pending_count} limit={core.limit} "
            f"pending_limit={core.pending_limit}>"
        )

    async def __aenter__(self) -> BackgroundRunner:
        if self._core.state != "new":
            raise RuntimeError(f"{self!r} was already entered; make a new BackgroundRunner")
        open_core(self._core, implicit=False)
        loops.current().add(self)
        process_runners.add(self)
        install_from_environment(process_runners.snapshot)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        core = self._core
        backend = core.backend
        assert backend is not None
        try:
            begin_shutdown(core)
            loops.current().refresh()  # ctxkit.spawn picks another runner of the loop now
            await end_shutdown(
                core,
                skip_drain=exc_type is not None and backend.is_cancellation(exc_type),
                drain_timeout=self._drain_timeout,
                cancel_timeout=self._cancel_timeout,
            )
        finally:
            with core.lock:
                core.state = "closed"
            loops.current().remove(self)
            process_runners.remove(self)
            absorbed = backend.exit(exc_type, exc_val, exc_tb)
        return absorbed or None

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
        await drain(self._core, check_seconds("timeout", timeout))

    def statistics(self) -> RunnerStatistics:
        """Return a snapshot of the counters (see ``RunnerStatistics``); from any thread.

        Read on the runner's own loop it is exact. Read from another thread it counts every
        spawn that has returned (one on its way from another thread to the loop counts as
        pending), and may miss a task that ends at that very instant.
        """
        return self._core.statistics()

    def tasks(self) -> list[TaskInfo]:
        """Return a snapshot of the running tasks, oldest start first, then the pending ones.

        Each ``TaskInfo`` has the task's name, state, seconds since spawn, seconds running and
        trace id. It copies no more than that, one ``TaskInfo`` per task, and may be called
        from any thread.
        """
        return self._core.tasks()

    @property
    def closed(self) -> bool:
        """True once the runner has shut down (``spawn`` then raises ``RunnerClosedError``)."""
        return self._core.state == "closed"

    @property
    def accepting(self) -> bool:
        """True while the runner takes work from outside its own tasks."""
        return self._core.state == "open"

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
            Exception: The event loop refused to start the task (a task factory of the app
                raised this). The task has ended then with that error, reported as any failed
                task is (``on_error``, the log, its span), and its coroutine is closed. A task
                that waited for a slot, or was spawned from another thread, ends the same way
                when its start is refused, with nobody to raise to. An exception of the app's
                sampler or span processor as the task's span starts is raised as it is, and
                leaves nothing of the task: its coroutine is closed, and it is not counted.
        """
        return submit(self, coro_or_fn, args, vars, name, propagation, span, timeout)


#: The runners of each event loop, and of the whole process (see ``ctxkit._registry``).
loops: LoopRegistry[BackgroundRunner] = LoopRegistry()
process_runners: ProcessRunners[BackgroundRunner] = ProcessRunners()


def open_implicit_runner() -> BackgroundRunner:
    """Return a new, open runner for a loop where none was opened (asyncio, default limits).

    Nobody drains it: at its loop's end (``asyncio.run``) what still runs is cancelled, and
    one summary line says what.
    """
    runner = BackgroundRunner()
    open_core(runner._core, implicit=True)
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

    The hot path of ctxkit: the common case (a coroutine, default options, an open runner
    with room, called on its loop) runs straight through; every other case detours.
    ``on_its_loop``: the caller knows that this code runs on the runner's loop (``ctxkit.spawn``
    found the runner among that loop's), so that is not checked again.
    """
    if type(coro_or_fn) is CoroutineType and not args:
        coro: Coroutine[Any, Any, Any] = coro_or_fn
    else:
        coro = prepare_coroutine(coro_or_fn, args, "spawn")
    core = runner._core
    from_thread = False
    try:
        if (
            propagation != "child"
            or timeout is not None
            or name is not None
            or (span is not True and span is not False)
        ):
            timeout = validate_options(propagation, span, timeout, name)
        plan = plan_for(vars, "spawn")
        if core.state != "open":
            check_accepting(core)
        elif not on_its_loop and core.current_owner() is not core.owner:
            reserve(core, lambda: refusal(core))
            from_thread = True
        else:
            limit, pending_limit = core.limit, core.pending_limit
            if (
                pending_limit is not None
                and core.pending_count >= pending_limit
                and limit is not None
                and len(core.running) >= limit
            ):
                core.check_room()  # raises before the span: a refused spawn starts none
    except BaseException:
        coro.close()
        raise
    task_span: trace.Span | None = None
    try:  # code of the app runs here too: a sampler, span processors
        if name is None:
            name = coro.__qualname__ if coro is coro_or_fn else default_name(coro_or_fn, coro)
        if span:
            task_span = start_span(
                core.tracer,
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
        # What the handle keeps for its trace id: the span context if valid, else the fake id.
        trace_ref = (
            span_context
            if span_context is plan.valid_span_context or span_context.is_valid
            else context.get(fake_trace_id_var)
        )
        task = BackgroundTask(
            core, coro, name, context, task_span, trace_ref, timeout, perf_counter()
        )
    except BaseException:  # admitted, not counted yet: nothing of it is left behind
        coro.close()
        if task_span is not None:
            task_span.end()
        if from_thread:
            unreserve(core)
        raise
    if from_thread:
        hand_over(core, task)
    else:
        refused = core.launch(task) if core.enter(task) else None
        if refused is not None:  # the loop refused it: it has ended as an error; say so here too
            raise refused
    return task
