"""``ctxkit.spawn``, ``ctxkit.drain`` and the ``fire_and_forget`` decorator.

These find the runner to use (see ``current_runner``) and hand the work to it; everything
about how a task runs is the runner's business (``_runner.py`` and the modules below it).
"""

from __future__ import annotations

import functools
import inspect
from asyncio import _get_running_loop
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import anyio

from ._clone import selection
from ._errors import NoRunnerError, RunnerClosedError
from ._options import is_coroutine, validate_options
from ._runner import (
    BackgroundRunner,
    loops,
    open_implicit_runner,
    own_runner,
    process_runners,
    submit,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from contextvars import ContextVar

    from ._handle import BackgroundTask
    from ._registry import LoopRunners
    from ._trace import Propagation

__all__ = ["current_runner", "drain", "fire_and_forget", "spawn"]

P = ParamSpec("P")
T = TypeVar("T")


def current_runner() -> BackgroundRunner:
    """Return the runner that ``ctxkit.spawn`` would use here.

    In order: the runner of the background task running this code, if it still takes work
    from its tasks; else the *first-opened* runner of the current event loop that is still
    open (so request handlers find the runner their app opened at startup, in another task);
    else, on asyncio when no runner was ever opened in this loop, the loop's implicit runner
    (made on first use, default limits, drained by ``await ctxkit.drain()``). In a thread
    with no event loop (a sync endpoint's worker thread, a WSGI app, an executor's job): the
    first-opened runner of the process that still takes work, of any loop or a
    ``RunnerThread``.

    Raises:
        RunnerClosedError: Every runner opened in this loop has shut down or is shutting down.
        NoRunnerError: On trio no runner is open, or in a thread with no event loop no runner
            of the process takes work.
    """
    return _pick(loops.here())[0]


def _pick(state: LoopRunners[BackgroundRunner] | None) -> tuple[BackgroundRunner, bool]:
    """Return ``current_runner()`` and whether it runs on the calling code's own loop.

    ``state`` is the runners of the calling code's loop (``loops.here()``): None for code
    with no event loop in its thread.

    Every runner but the process-wide one of a thread with no loop was found among the runners
    of the calling code's loop: ``submit`` need not check that again (on Python 3.11 each
    look-up of the running loop is a ``getpid`` system call). Where the loop has one runner
    only (``LoopRunners.sole``), which background task is calling does not matter and is not
    looked up (that costs two more look-ups of the loop and one of its current task).
    """
    if state is None:
        return _process_runner(), False
    return state.sole or own_runner() or state.first_open or _fallback(state), True


def _process_runner() -> BackgroundRunner:
    """Return the runner for code with no event loop in its thread: the process's first."""
    runner = process_runners.first_accepting()
    if runner is None:
        raise NoRunnerError(
            "no event loop runs in this thread and no BackgroundRunner of the process takes "
            "work: open one around the app (`async with ctxkit.BackgroundRunner():` in its "
            "lifespan), or start a `ctxkit.RunnerThread()` for code with no event loop"
        )
    return runner


def _fallback(state: LoopRunners[BackgroundRunner]) -> BackgroundRunner:
    """Return the runner for a loop where no runner takes work from outside."""
    if state.runners:
        return state.runners[0]  # shutting down: its spawn() says so
    if state.ever_opened:
        raise RunnerClosedError(
            "the BackgroundRunner of this event loop has shut down; spawn work before the app's "
            "shutdown, or open a runner around this code"
        )
    if not state.implicit_allowed:
        raise NoRunnerError(
            "ctxkit.spawn on trio needs an open runner: wrap the program (or the nursery that "
            "serves requests) in `async with ctxkit.BackgroundRunner():`, or call "
            "runner.spawn(...) on one"
        )
    if state.implicit is None:
        state.set_implicit(open_implicit_runner())
    assert state.implicit is not None
    return state.implicit


@overload
def spawn(
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
    coro_or_fn: Callable[..., T],
    *args: object,
    vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
    name: str | None = None,
    propagation: Propagation = "child",
    span: bool = True,
    timeout: float | None = None,
) -> BackgroundTask[T]: ...


def spawn(
    coro_or_fn: Any,
    *args: object,
    vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
    name: str | None = None,
    propagation: Propagation = "child",
    span: bool = True,
    timeout: float | None = None,
) -> BackgroundTask[Any]:
    """Start ``coro_or_fn`` in the background, detached from the caller, and return its handle.

    Semantics:
        Exactly ``BackgroundRunner.spawn`` on the runner that ``current_runner()`` picks: the
        task runs in a clone of this call's context (``vars`` plus the registered vars, and
        the trace), only that runner can cancel it (its ``cancel()``, its ``timeout``, the
        end of the shutdown drain), its errors are recorded on its span, logged on the
        ``ctxkit`` logger and passed to the runner's ``on_error``, and the runner drains it
        at shutdown. See ``BackgroundRunner.spawn`` for every argument.

    Raises:
        TypeError: Not a coroutine or async function, or a bad option type.
        ValueError: A bad option value.
        RunnerClosedError: The runner is shutting down or has shut down.
        RunnerFullError: The runner is full.
        NoRunnerError: No event loop, or trio without an open runner.
    """
    try:
        # loops.here() and _pick()'s first case, inlined: the hot path of every spawn.
        loop, seen = _get_running_loop(), loops.last
        sole = seen[1].sole if loop is not None and seen is not None and seen[0]() is loop else None
        if sole is not None:
            runner, on_its_loop = sole, True
        else:
            runner, on_its_loop = _pick(loops.of(loop))  # trio's runners, when loop is None
    except BaseException:
        if is_coroutine(coro_or_fn):
            coro_or_fn.close()
        raise
    return submit(runner, coro_or_fn, args, vars, name, propagation, span, timeout, on_its_loop)


async def drain(timeout: float | None = None) -> None:
    """Wait until every runner of the current event loop has no task running or pending.

    This covers the runners opened in this loop and the implicit asyncio runner, including
    tasks spawned while waiting. It is how tests and scripts wait for fire-and-forget work.
    Called from a background task, it waits for every task but that one.

    Args:
        timeout: Give up after this many seconds; None waits as long as it takes.

    Raises:
        TimeoutError: ``timeout`` passed with tasks still running or pending (they go on).
        NoRunnerError: No event loop is running.
    """
    state = loops.current()
    with anyio.fail_after(timeout):
        while True:
            runners = [*state.runners, *([state.implicit] if state.implicit else [])]
            for runner in runners:
                await runner.drain()
            if all(_idle(runner) for runner in runners):
                return


def _idle(runner: BackgroundRunner) -> bool:
    stats = runner.statistics()
    own = own_runner() is runner
    return stats.running + stats.pending <= own


@overload
def fire_and_forget(
    fn: Callable[P, Coroutine[Any, Any, T]], /
) -> Callable[P, BackgroundTask[T]]: ...


@overload
def fire_and_forget(
    *,
    vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
    name: str | None = None,
    propagation: Propagation = "child",
    span: bool = True,
    timeout: float | None = None,
    runner: BackgroundRunner | None = None,
) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, BackgroundTask[T]]]: ...


def fire_and_forget(
    fn: Callable[P, Coroutine[Any, Any, T]] | None = None,
    /,
    *,
    vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
    name: str | None = None,
    propagation: Propagation = "child",
    span: bool = True,
    timeout: float | None = None,
    runner: BackgroundRunner | None = None,
) -> (
    Callable[P, BackgroundTask[T]]
    | Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, BackgroundTask[T]]]
):
    """Make each call of an ``async def`` spawn it in the background and return the handle.

    Use it bare (``@fire_and_forget``) or with the options of ``spawn`` plus ``runner=``
    (``@fire_and_forget(name="audit", timeout=10)``). The decorated function keeps its name,
    docstring and parameters; calling it returns a ``BackgroundTask`` at once.

    Semantics:
        Each call is ``spawn(fn(*args, **kwargs), ...)``: the context is captured at call
        time, the task runs detached under ``runner`` (None: ``current_runner()`` at call
        time), and everything ``spawn`` says about cancellation, errors and shutdown holds.

    Raises:
        TypeError: At decoration, when ``fn`` is not an ``async def`` function, or an option
            has the wrong type. Calls raise what ``spawn`` raises.
        ValueError: At decoration, when an option has a bad value.
    """
    validate_options(propagation, span, timeout, name)
    carried = tuple(vars)
    selection(carried, "fire_and_forget")  # validate now; spawn adds the registered vars per call
    if runner is not None and not isinstance(runner, BackgroundRunner):
        raise TypeError(f"runner must be a BackgroundRunner or None, got {runner!r}")

    def decorate(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, BackgroundTask[T]]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"@fire_and_forget decorates `async def` functions, got {func!r}; a plain "
                "function would run in the caller"
            )
        task_name = name if name is not None else func.__qualname__

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> BackgroundTask[T]:
            target = runner if runner is not None else current_runner()
            return target.spawn(
                func(*args, **kwargs),
                vars=carried,
                name=task_name,
                propagation=propagation,
                span=span,
                timeout=timeout,
            )

        return wrapper

    if fn is None:
        return decorate
    return decorate(fn)
