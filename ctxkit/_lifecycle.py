"""A runner's life: opening on a loop, which spawns each state takes, drain, and shutdown.

The states, in order: ``"new"`` (made, not entered), ``"open"`` (takes work from anywhere in
its loop and from other threads), ``"draining"`` (the shutdown waits; only the runner's own
tasks may spawn), ``"cancelling"`` (the shutdown cancels what is left; nobody may spawn) and
``"closed"``. The implicit runner of an asyncio loop goes from ``"open"`` to ``"closed"`` when
its loop tears down (the core sees that happen, see ``RunnerCore._check_teardown``).

Every function here runs on the runner's loop, except ``refusal``, which explains a refused
spawn wherever it was made.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import anyio

from ._backends import open_backend
from ._backends._base import current_handle
from ._errors import RunnerClosedError
from ._handle import BackgroundTask
from ._reporting import log_summary, seconds

if TYPE_CHECKING:
    from ._core import RunnerCore

__all__ = ["begin_shutdown", "check_accepting", "drain", "end_shutdown", "open_core", "refusal"]


def open_core(core: RunnerCore, *, implicit: bool) -> None:
    """Bind ``core`` to the event loop running in this thread and start taking work.

    Raises:
        RuntimeError: No asyncio loop or trio run is running in this thread.
    """
    core.backend = backend = open_backend(core.task_started, core.finish, watch_unstarted=implicit)
    core.owner = backend.owner
    core.current_owner = backend.current_owner
    core.implicit = implicit
    core.state = "open"
    runner = core.runner
    assert runner is not None  # opened by its face, or for it (the implicit runner)
    core.metrics.watch(runner, core.counts)


def own_task(core: RunnerCore) -> BackgroundTask[Any] | None:
    """Return the task of ``core`` running this code, or None."""
    handle = current_handle()
    if isinstance(handle, BackgroundTask) and handle._owner is core:
        return handle
    return None


def check_accepting(core: RunnerCore) -> None:
    """Let a spawn on the loop through while the runner is not open, or raise why not.

    The one spawn let through is one from a task of this runner while it drains (and has room).

    Raises:
        RunnerClosedError: The runner is not open, and the spawn is not that one.
        RunnerFullError: That one, but the runner is full.
    """
    if core.state == "draining" and own_task(core) is not None:
        core.check_room()
        return
    raise refusal(core)


def refusal(core: RunnerCore) -> BaseException:
    """Return the error for a spawn refused in the runner's present state."""
    runner, state = core.runner, core.state
    if state == "open":  # so the spawn came from another event loop or thread
        assert core.backend is not None
        return RuntimeError(
            f"{runner!r} belongs to another event loop or thread; spawn from its own "
            f"{core.backend.name} loop"
        )
    if state == "draining":
        return RunnerClosedError(
            f"{runner!r} is shutting down and takes no new work from outside its own tasks"
        )
    if state == "new":
        return RunnerClosedError(
            f"{runner!r} is not open yet; use `async with BackgroundRunner() as runner:`"
        )
    if state == "cancelling":
        return RunnerClosedError(
            f"{runner!r} is cancelling its remaining tasks at shutdown and takes no new "
            "work, not even from them"
        )
    return RunnerClosedError(f"{runner!r} is closed; spawn work before it shuts down")


async def drain(core: RunnerCore, timeout: float | None) -> None:
    """Wait until no task is running or pending, but the calling task if it is one of these.

    Raises:
        TimeoutError: ``timeout`` passed with tasks still running or pending.
        RuntimeError: Awaited off the open runner's loop (its wake-ups are made there).
    """
    if core.backend is not None and not core.backend.is_current():
        raise RuntimeError(
            f"{core.runner!r} belongs to another event loop or thread; await drain() on its "
            "loop, or poll statistics() (a RunnerThread: call its stop())"
        )
    with anyio.fail_after(math.inf if timeout is None else timeout):
        await _wait_idle(core, own_task(core))


async def _wait_idle(core: RunnerCore, me: BackgroundTask[Any] | None) -> None:
    while core.busy() > (me is not None and me in core.running):
        event = anyio.Event()
        core.waiters.append(event)
        await event.wait()


def begin_shutdown(core: RunnerCore) -> None:
    """Stop taking work from outside the runner's own tasks (the first step of a shutdown)."""
    with core.lock:  # from now on no other thread's spawn is accepted
        core.state = "draining"


async def end_shutdown(
    core: RunnerCore,
    *,
    skip_drain: bool,
    drain_timeout: float | None,
    cancel_timeout: float | None,
) -> None:
    """Drain for ``drain_timeout``, cancel what is left, wait ``cancel_timeout``, log a summary.

    ``skip_drain``: the task holding the runner was cancelled; cancel at once.
    """
    reason: str | None = "the task holding the runner was cancelled"
    try:
        if not skip_drain:
            reason = "its shutdown was cancelled"
            try:
                await drain(core, drain_timeout)
                reason = None
            except TimeoutError:
                reason = f"drain_timeout={seconds(drain_timeout)} passed"
    finally:
        # From here on not even the runner's own tasks may spawn (say, from a finally block
        # run by the cancellation): that work would escape the cancellation.
        with core.lock:
            core.state = "cancelling"
        running = list(core.running)
        pending = core.live_pending()
        for task in (*pending, *running):
            task._cancel_on_loop()  # cancel() without its thread check: this is the loop
        if running:
            timeout = math.inf if cancel_timeout is None else cancel_timeout
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                await _wait_idle(core, None)
        log_summary(reason, running, pending, list(core.running), core.statistics())
