"""The trio backend: each background task is a trio system task inside its own cancel scope.

System tasks belong to the run, not to the runner's ``async with`` block, so leaving the block
waits only as long as the runner's shutdown policy says (``drain_timeout + cancel_timeout``):
a task that shields itself from cancellation longer goes on running (and is named in the
summary), and ``trio.run`` waits for it at the very end of the run, as trio waits for every
task. The block itself runs inside a cancel scope of the backend, cancelled when a task raises
``KeyboardInterrupt`` or ``SystemExit``: the block then ends by re-raising that exception, as
the loop does on asyncio. Native trio, not anyio: the benchmarks show anyio's task group
costing more per task than it gives here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

import trio

from .._task import CANCELLED as _CANCELLED
from .._task import ERROR as _ERROR
from .._task import OK as _OK
from .._task import TIMEOUT as _TIMEOUT
from ._base import without_wrapper_frame, wrapper

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from contextvars import Context
    from types import TracebackType

    from .._task import TaskOutcome

__all__ = ["TrioBackend"]


class TrioBackend:
    """Start and cancel the tasks of one runner in the current trio run."""

    __slots__ = ("_fatal", "_finished", "_host", "_started", "_token")

    name: Final = "trio"

    def __init__(
        self,
        started: Callable[[object, object], bool],
        finished: Callable[[object, TaskOutcome, object], None],
    ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._started = started
        self._finished = finished
        self._fatal: BaseException | None = None
        # Entered here, in the task entering the runner; exited by exit(), in the same task.
        self._host: trio.CancelScope | None = trio.CancelScope()
        self._host.__enter__()

    def is_current(self) -> bool:
        return _current_token() is self._token

    @property
    def owner(self) -> object:
        return self._token

    @property
    def current_owner(self) -> Callable[[], object]:
        return _current_token

    def start(
        self,
        task: object,
        coro: Coroutine[object, object, object],
        context: Context,
        name: str,
        timeout: float | None,
    ) -> object:
        trio.lowlevel.spawn_system_task(self._run, task, coro, timeout, name=name, context=context)
        return None  # its cancel handle, a cancel scope, exists once it runs

    def abandoned(self, native: object) -> bool:
        return False  # nothing but its runner can cancel a system task before it runs

    def cancel(self, native: object, task: object, coro: Coroutine[object, object, object]) -> None:
        scope: trio.CancelScope = native  # type: ignore[assignment]  # what _run gave started()
        scope.deadline = math.inf  # an explicit cancel, not the timeout (see _run)
        scope.cancel()

    def run_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        self._token.run_sync_soon(fn)

    def is_cancellation(self, exc_type: type[BaseException]) -> bool:
        return issubclass(exc_type, trio.Cancelled)

    def tearing_down(self) -> bool:
        return False

    def exit(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        host, self._host = self._host, None
        absorbed = False
        if host is not None:
            absorbed = bool(host.__exit__(exc_type, exc_val, exc_tb))
        fatal, self._fatal = self._fatal, None
        if fatal is not None:
            raise fatal
        return absorbed

    @wrapper
    async def _run(
        self, task: object, coro: Coroutine[object, object, object], timeout: float | None
    ) -> None:
        # The task's cancel scope is its cancel handle (the core's ``native``). No local holds
        # the trio task: this frame may outlive the run (a traceback of the task's exception
        # reaches it), and the trio task holds the task's context.
        finished = self._finished
        with trio.CancelScope() as scope:
            if timeout is not None:
                scope.deadline = trio.current_time() + timeout
            if not self._started(task, scope):
                coro.close()
                finished(task, _CANCELLED, None)
                return
            try:
                result = await coro
            except trio.Cancelled:
                finished(task, _TIMEOUT if _expired(scope) else _CANCELLED, None)
                raise
            except Exception as exc:
                finished(task, _ERROR, without_wrapper_frame(exc))
                return
            except BaseExceptionGroup as group:
                # A nursery in the task ends in a group (trio's strict_exception_groups): its
                # Cancelled leaves are the task's cancellation, the rest is how the task
                # failed. trio's cancel scopes absorb the Cancelled leaves of a group, so they
                # go on to trio as a group; the failure is reported, as above. (No local keeps
                # a raised group: its traceback holds this frame, a cycle.)
                cancelled, failure = group.split(trio.Cancelled)
                if failure is None:
                    cancelled = None  # it is ``group``
                    finished(task, _TIMEOUT if _expired(scope) else _CANCELLED, None)
                    raise
                finished(task, _ERROR, without_wrapper_frame(failure))
                if not isinstance(failure, Exception):
                    self._crash(failure)  # a KeyboardInterrupt or SystemExit in the group
                if cancelled is None:
                    return
                try:
                    raise cancelled
                finally:
                    cancelled = None
            except BaseException as exc:
                finished(task, _ERROR, without_wrapper_frame(exc))
                self._crash(exc)
                return
            # (No timeout: no deadline to have passed, and no need to ask trio the time.)
            finished(task, _OK if timeout is None or not _expired(scope) else _TIMEOUT, result)

    def _crash(self, exc: BaseException) -> None:
        """End the runner's block with ``exc`` (a task's KeyboardInterrupt or SystemExit)."""
        if self._host is None:  # the block has ended: end the run instead
            raise exc
        if self._fatal is None:
            self._fatal = exc
        self._host.cancel()


def _current_token() -> object:
    """The token of the trio run in this thread, or None."""
    try:
        return trio.lowlevel.current_trio_token()
    except RuntimeError:
        return None


def _expired(scope: trio.CancelScope) -> bool:
    return scope.cancel_called and trio.current_time() >= scope.deadline
