"""Spawns from other threads: admitted in the calling thread, handed to the runner's loop.

A spawn made in another thread than the runner's loop (a sync endpoint, a worker thread, a
``RunnerThread``'s runner used from the app) is admitted there, under the core's ``lock``:
``reserve`` counts it as on its way (``inbound``) if the runner is open and has
room for the tasks running, pending and on their way; the clone and span are made in the
calling thread; ``hand_over`` sends the task to the loop, where it enters the core's one
admission path. The spawn never waits for the loop, so a handler that the loop
itself is awaiting cannot deadlock. A spawn counted here is in ``statistics()`` as soon as the
call has returned (as pending until it reaches the loop).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ._logging import logger

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._core import RunnerCore
    from ._handle import BackgroundTask

__all__ = ["hand_over", "reserve", "unreserve"]


def reserve(core: RunnerCore, refused: Callable[[], BaseException]) -> None:
    """Admit a spawn made in another thread than the loop's, or raise why not.

    ``refused`` makes the error for a runner that is not open (the lifecycle knows why).

    Raises:
        RunnerClosedError: The runner is not open.
        RunnerFullError: The runner has no room for one more task.
    """
    with core.lock:
        if core.state == "open":
            limit, pending_limit = core.limit, core.pending_limit
            if (
                limit is None
                or pending_limit is None
                or core.busy() < limit + pending_limit
                or len(core.running) + core.inbound < limit
            ):
                core.inbound += 1
                return
            error = core.full()
        else:
            error = None
    raise refused() if error is None else error


def unreserve(core: RunnerCore) -> None:
    """Give back what ``reserve`` took for a task that will not arrive (in the spawning thread).

    A drain waiting on the loop for that task is woken: it looks again at what is left.
    """
    with core.lock:
        core.inbound -= 1
    assert core.backend is not None  # reserved while open
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits there
        core.backend.run_soon_threadsafe(core.wake_waiters)


def hand_over(core: RunnerCore, task: BackgroundTask[Any]) -> None:
    """Send a task spawned in another thread to the loop (``reserve`` admitted it)."""
    assert core.backend is not None
    try:
        core.backend.run_soon_threadsafe(lambda: _arrive(core, task))
    except BaseException:
        unreserve(core)
        assert task._coro is not None
        task._coro.close()
        if task._span is not None:
            task._span.end()
        raise


def _arrive(core: RunnerCore, task: BackgroundTask[Any]) -> None:
    """Count in, and start or queue, a task spawned in another thread (on the loop)."""
    with core.lock:  # from on its way to counted in, in one step for other threads' snapshots
        core.inbound -= 1
        accepted = core.state == "open" or core.state == "draining"
        if accepted:
            start = core.enter(task)
        else:
            # Admitted in its thread just before the shutdown's cancelling began: it never
            # runs (cancelled below, as a pending task), and says so.
            core.spawned += 1
            core.pending_count += 1
            core.pending.append(task)
    if accepted:
        if start:
            core.launch(task)  # if the loop refuses it, it has ended as an error, reported
        return
    task.cancel()
    logger.warning(
        "background task %r, spawned from another thread, reached %r after its shutdown had "
        "begun and was cancelled [trace_id=%s]",
        task.name,
        core.runner,
        task.trace_id,
    )
