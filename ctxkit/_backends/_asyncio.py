"""The asyncio backend: each background task is a plain ``asyncio.Task``.

``start`` returns the ``asyncio.Task`` as the task's cancel handle. Its wrapper coroutine
(``_run``) awaits the coroutine, under ``asyncio.timeout`` when it has a timeout, and reports
how it ended; it never calls the core's ``started`` (the core has the cancel handle once
``start`` returns, and a ``cancel()`` made during an eager first step, before that, is applied
by the core then). A task cancelled before its first step never runs its wrapper (asyncio
throws the cancellation in before the wrapper's first line): ``cancel`` adds a done-callback
that reports the end then (a task that did run has reported it already, and the second report
is ignored). The wrapper never starts another task itself: the core does that,
without recursing, whatever the loop's task factory.

A loop's task factory is called in the shape it accepts, read from its signature once per
factory object (``_caller_for``): ``name`` and ``context`` as keywords (asyncio's protocol
from Python 3.14; before, asyncio passes ``context`` and names the task itself), ``context``
only, or the old ``(loop, coro)`` called inside the task's context, so the task copies it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from asyncio import current_task
from functools import partial
from types import FunctionType
from typing import TYPE_CHECKING, Final

from .._task import CANCELLED as _CANCELLED
from .._task import ERROR as _ERROR
from .._task import OK as _OK
from .._task import TIMEOUT as _TIMEOUT
from ._base import without_wrapper_frame, wrapper

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from contextvars import Context
    from types import TracebackType
    from typing import TypeAlias

    from .._task import TaskOutcome

    #: How ``start`` has the loop make a task: ``(loop, wrapper, name, context) -> task``.
    _Create: TypeAlias = Callable[
        [asyncio.AbstractEventLoop, Coroutine[object, object, None], str, Context],
        asyncio.Task[None],
    ]

__all__ = ["AsyncioBackend"]


class AsyncioBackend:
    """Start and cancel the tasks of one runner on one asyncio event loop."""

    __slots__ = ("_factory", "_factory_call", "_finished", "_loop", "_plain_create_task", "_watch")

    name: Final = "asyncio"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        started: Callable[[object, object], bool],
        finished: Callable[[object, TaskOutcome, object], None],
        watch_unstarted: bool,
    ) -> None:
        del started  # ``start`` returns the cancel handle: its tasks never report a start
        self._loop = loop
        self._finished = finished
        self._watch = watch_unstarted
        # Whether the loop creates its tasks as asyncio's own base loop does; then, while no
        # task factory is set, ``start`` builds the ``asyncio.Task`` itself (one Python call
        # less per task). A loop class with its own ``create_task`` (uvloop's), a loop whose
        # ``create_task`` was replaced on it, and a patched ``BaseEventLoop.create_task`` (an
        # APM agent's) are always asked. Decided here, when the runner opens, not on every
        # spawn (benchmarks/RESULTS.md, "Decisions measured outside the suite").
        self._plain_create_task = (
            _BASE_CREATE_TASK is not None
            and type(loop).create_task is _BASE_CREATE_TASK
            and "create_task" not in vars(loop)
        )
        # The task factory seen last and how to call it: decided once per factory object (its
        # signature is read once), not on every spawn.
        self._factory: object = None
        self._factory_call: _Create = _create_with_keywords

    def is_current(self) -> bool:
        return asyncio._get_running_loop() is self._loop

    @property
    def owner(self) -> object:
        return self._loop

    @property
    def current_owner(self) -> Callable[[], object]:
        return asyncio._get_running_loop

    def start(
        self,
        task: object,
        coro: Coroutine[object, object, object],
        context: Context,
        name: str,
        timeout: float | None,
    ) -> object:
        wrapper = (
            _run(self, task, coro) if timeout is None else _run_timed(self, task, coro, timeout)
        )
        loop = self._loop
        if self._plain_create_task and loop.get_task_factory() is None:
            # What BaseEventLoop.create_task does then (the loop is running, so not closed).
            impl = asyncio.Task(wrapper, loop=loop, name=name, context=context)
            if self._watch:
                self._report_if_never_run(impl, task, coro, wrapper)
            return impl
        factory = loop.get_task_factory()
        if factory is not self._factory:
            self._factory_call = _caller_for(factory)
            self._factory = factory
        try:
            impl = self._factory_call(loop, wrapper, name, context)
        except BaseException:
            wrapper.close()  # refused (a task factory raised): it never runs, nor warns
            raise
        if self._watch or (not impl.done() and impl.get_coro() is not wrapper):
            # Watched from the start: the implicit runner's loop may cancel it before it runs
            # (asyncio.run's end), and a task factory that wraps the coroutine (Sentry's does)
            # hides the wrapper from cancel(). (A task that ended in an eager first step needs
            # no watching, and Python 3.12.1's get_coro() crashes on it.)
            self._report_if_never_run(impl, task, coro, wrapper)
        return impl

    def _report_if_never_run(
        self,
        impl: asyncio.Task[None],
        task: object,
        coro: Coroutine[object, object, object],
        wrapper: Coroutine[object, object, None],
    ) -> None:
        """Report ``task`` cancelled if asyncio cancels ``impl`` before its wrapper ran.

        The wrapper then never runs: both coroutines are closed, never left un-awaited
        (``finished()`` ignores a second report of a task that did run).
        """
        finished = self._finished

        def unstarted(impl: asyncio.Task[None]) -> None:
            if impl.cancelled():
                wrapper.close()
                coro.close()
                finished(task, _CANCELLED, None)

        impl.add_done_callback(unstarted)

    def abandoned(self, native: object) -> bool:
        impl: asyncio.Task[None] = native  # type: ignore[assignment]
        # Ended without being reported (so its wrapper never ran), or cancelled from outside
        # before its first step.
        return impl.done() or (impl.cancelling() > 0 and _not_run(impl))

    def cancel(self, native: object, task: object, coro: Coroutine[object, object, object]) -> None:
        impl: asyncio.Task[None] = native  # type: ignore[assignment]
        wrapper = impl.get_coro()
        if not self._watch and getattr(wrapper, "cr_code", None) in _WRAPPERS:
            # If its wrapper has not run yet it never will: the callback reports the end then
            # (a task watched from its start has that callback already).
            self._report_if_never_run(impl, task, coro, wrapper)  # type: ignore[arg-type]
        impl.cancel()

    def run_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        # In an empty context, not a copy of the calling thread's (asyncio's default): ctxkit's
        # work handed to the loop must see and keep nothing of a request (trio runs these
        # calls in its system context).
        self._loop.call_soon_threadsafe(fn, context=contextvars.Context())

    def is_cancellation(self, exc_type: type[BaseException]) -> bool:
        return issubclass(exc_type, asyncio.CancelledError)

    def tearing_down(self) -> bool:
        """Tell whether every task of the loop is being cancelled, as ``asyncio.run`` does last.

        A single task cancelled from outside is not that: the loop's other tasks still run.
        """
        tasks = asyncio.all_tasks(self._loop)
        return bool(tasks) and all(task.done() or task.cancelling() for task in tasks)

    def exit(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        return False  # a task's KeyboardInterrupt/SystemExit already left the loop as itself


def _caller_for(factory: object) -> _Create:
    """Return how ``start`` has the loop make a task while ``factory`` is its task factory.

    From Python 3.14 ``loop.create_task`` passes its keywords (``name``, ``context``) on to the
    factory; before, it passes ``context`` alone and then names the task. A factory written
    for either protocol is called in a shape it accepts, and each task still runs in its
    clone and carries its name. A factory with no readable signature (a C callable) is called
    as asyncio calls it.
    """
    if factory is None:
        return _create_with_keywords  # a loop with its own create_task, no factory set
    try:
        signature = inspect.signature(factory)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return _create_with_keywords

    def accepts(**keywords: object) -> bool:
        try:
            signature.bind(None, None, **keywords)
        except TypeError:
            return False
        return True

    if accepts(name="", context=None):
        return _create_with_keywords
    if accepts(context=None):
        return _create_with_context
    if accepts():
        return _create_in_context
    return partial(_refuse, factory)


def _create_with_keywords(
    loop: asyncio.AbstractEventLoop,
    wrapper: Coroutine[object, object, None],
    name: str,
    context: Context,
) -> asyncio.Task[None]:
    """Ask the loop for the task as asyncio's own callers do (its factory takes ``**kwargs``)."""
    return loop.create_task(wrapper, name=name, context=context)


def _create_with_context(
    loop: asyncio.AbstractEventLoop,
    wrapper: Coroutine[object, object, None],
    name: str,
    context: Context,
) -> asyncio.Task[None]:
    """Give a factory ``(loop, coro, context=None)`` the context alone, then name the task.

    What ``loop.create_task`` does with any factory before Python 3.14.
    """
    impl = loop.create_task(wrapper, context=context)
    impl.set_name(name)
    return impl


def _create_in_context(
    loop: asyncio.AbstractEventLoop,
    wrapper: Coroutine[object, object, None],
    name: str,
    context: Context,
) -> asyncio.Task[None]:
    """Call a factory ``(loop, coro)`` inside ``context``, then name the task.

    A task made without a context copies the current one: the task runs in a copy of its
    clone (the same values; the clone is ctxkit's own, never entered elsewhere), and the
    factory's own code runs in the clone too, as it would run in the task.
    """
    impl = context.run(loop.create_task, wrapper)
    impl.set_name(name)
    return impl


def _refuse(
    factory: object,
    loop: asyncio.AbstractEventLoop,
    wrapper: Coroutine[object, object, None],
    name: str,
    context: Context,
) -> asyncio.Task[None]:
    """Refuse to start a task: the loop's task factory cannot be called as asyncio calls it."""
    raise TypeError(
        f"the loop's task factory {factory!r} cannot be called as factory(loop, coro); "
        "give it the signature (loop, coro, **kwargs) and pass the keywords on to the task"
    )


def _genuine_base_create_task() -> object | None:
    """Return asyncio's own ``BaseEventLoop.create_task``, or None if it was replaced already.

    A replacement (a wrapt proxy, a function with ``__wrapped__``, another module's function)
    must be called for every task, so ``start`` never builds the task itself then.
    """
    fn = asyncio.BaseEventLoop.create_task
    if (
        type(fn) is FunctionType
        and fn.__module__ == "asyncio.base_events"
        and fn.__qualname__ == "BaseEventLoop.create_task"
        and not hasattr(fn, "__wrapped__")
    ):
        return fn
    return None


_BASE_CREATE_TASK: Final = _genuine_base_create_task()


@wrapper
async def _run(
    backend: AsyncioBackend, task: object, coro: Coroutine[object, object, object]
) -> None:
    """The coroutine of a background task's ``asyncio.Task``: run ``coro``, report its end.

    Few locals on purpose: its frame is part of the memory each running task holds. The core
    learns the ``asyncio.Task`` from ``start``.
    """
    try:
        result = await coro
    except asyncio.CancelledError:
        backend._finished(task, _CANCELLED, None)
        raise
    except Exception as exc:
        backend._finished(task, _ERROR, without_wrapper_frame(exc))
    except BaseException as exc:
        _fatal(backend, task, exc)
        raise
    else:
        backend._finished(task, _OK, result)


@wrapper
async def _run_timed(
    backend: AsyncioBackend, task: object, coro: Coroutine[object, object, object], timeout: float
) -> None:
    """``_run`` under ``asyncio.timeout``: the outcome is ``TIMEOUT`` when the deadline hit."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            result = await coro
    except asyncio.CancelledError:
        backend._finished(task, _CANCELLED, None)
        raise
    except Exception as exc:
        if deadline.expired() and isinstance(exc, TimeoutError):
            backend._finished(task, _TIMEOUT, None)
        else:
            backend._finished(task, _ERROR, without_wrapper_frame(exc))
    except BaseException as exc:
        _fatal(backend, task, exc)
        raise
    else:
        backend._finished(task, _TIMEOUT if deadline.expired() else _OK, result)


def _not_run(impl: asyncio.Task[None]) -> bool:
    """Tell whether the task's wrapper has not begun to run (nor ever will, once it is done)."""
    return inspect.getcoroutinestate(impl.get_coro()) == inspect.CORO_CREATED  # type: ignore[arg-type]


def _fatal(backend: AsyncioBackend, task: object, exc: BaseException) -> None:
    """Report a task's KeyboardInterrupt/SystemExit before it is re-raised for the loop.

    The done-callback retrieves it, so asyncio does not log it again as never retrieved.
    """
    backend._finished(task, _ERROR, without_wrapper_frame(exc))
    impl = current_task()
    if impl is not None:
        impl.add_done_callback(_retrieve)


_WRAPPERS: Final = frozenset({_run.__code__, _run_timed.__code__})


def _retrieve(impl: asyncio.Task[None]) -> None:
    if not impl.cancelled():
        impl.exception()
