"""Which runner ``ctxkit.spawn`` uses: the open runners of each event loop, in opening order.

On asyncio the runners of a loop are kept in a weak mapping keyed by the loop (plus the
loop's implicit runner, made on first use when no runner was ever opened there); on other
backends (trio) in an anyio ``RunVar``, which lives exactly as long as the run.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING

from anyio.lowlevel import RunVar

from ._errors import NoRunnerError

if TYPE_CHECKING:
    from ._runner import BackgroundRunner

__all__ = ["LoopRunners", "hot", "loop_runners"]

#: The runner ``ctxkit.spawn`` picked last on asyncio, with (a weak reference to) its loop:
#: while that runner stays open and no runner is added to or removed from any loop, it is
#: still the answer for that loop outside background tasks (see ``_spawn.current_runner``).
hot: tuple[weakref.ref[asyncio.AbstractEventLoop], BackgroundRunner] | None = None


class LoopRunners:
    """The runners of one event loop."""

    __slots__ = ("__weakref__", "asyncio", "ever_opened", "implicit", "runners")

    def __init__(self, is_asyncio: bool) -> None:
        self.runners: list[BackgroundRunner] = []
        self.implicit: BackgroundRunner | None = None
        self.ever_opened = False
        self.asyncio = is_asyncio

    def add(self, runner: BackgroundRunner) -> None:
        """Record an entered runner."""
        global hot
        self.runners.append(runner)
        self.ever_opened = True
        hot = None  # it may replace an implicit runner

    def remove(self, runner: BackgroundRunner) -> None:
        """Forget a closed runner."""
        global hot
        if runner in self.runners:
            self.runners.remove(runner)
        hot = None


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopRunners] = (
    weakref.WeakKeyDictionary()
)
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], LoopRunners] | None = None
_run_var: RunVar[LoopRunners] = RunVar("ctxkit.runners")


def loop_runners() -> LoopRunners:
    """Return the runners of the running event loop.

    Raises:
        NoRunnerError: No event loop runs in this thread.
    """
    global _last
    loop = asyncio._get_running_loop()
    if loop is not None:
        last = _last
        if last is not None and last[0]() is loop:
            return last[1]
        try:
            state = _by_loop[loop]
        except KeyError:
            state = _by_loop[loop] = LoopRunners(is_asyncio=True)
        _last = (weakref.ref(loop), state)
        return state
    try:
        return _run_var.get()
    except LookupError:
        state = LoopRunners(is_asyncio=False)
        _run_var.set(state)
        return state
    except RuntimeError as exc:  # no async library is running in this thread
        raise NoRunnerError(
            "no async event loop is running in this thread; call ctxkit.spawn from async "
            "code (from another thread, hand the call to the loop with "
            "anyio.from_thread.run_sync or loop.call_soon_threadsafe)"
        ) from exc
