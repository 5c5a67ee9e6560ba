"""Which runner ``ctxkit.spawn`` uses: the open runners of each event loop, and of the process.

On asyncio the runners of a loop are kept in a weak mapping keyed by the loop (plus the
loop's implicit runner, made on first use when no runner was ever opened there); on trio in a
``trio.lowlevel.RunVar``, which lives exactly as long as the run. Every entered
runner is also in one process-wide list, in opening order, for code that runs in a thread with
no event loop (a sync endpoint, a WSGI app, an executor's worker).

The registry knows a runner only as a ``RunnerView`` (it asks whether one takes work): its
classes are generic in the runner type, and the runner's module makes the one instance of each.

Thread rules: a ``LoopRunners`` is touched only on its own loop; a ``LoopRegistry``'s mapping
and ``last`` are touched by every thread that runs a loop (each write is one dict or attribute
store, and a stale ``last`` is only a missed shortcut); ``ProcessRunners`` takes its lock to
change, and is read without it (a tuple, replaced whole).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Generic, TypeVar

from ._errors import NoRunnerError
from ._task import RunnerView

if TYPE_CHECKING:
    from trio.lowlevel import RunVar

__all__ = ["LoopRegistry", "LoopRunners", "ProcessRunners"]

R = TypeVar("R", bound=RunnerView)


class LoopRunners(Generic[R]):
    """The runners of one event loop."""

    __slots__ = (
        "__weakref__",
        "ever_opened",
        "first_open",
        "implicit",
        "implicit_allowed",
        "runners",
        "sole",
    )

    def __init__(self, implicit_allowed: bool) -> None:
        #: Entered runners not yet closed, in opening order.
        self.runners: list[R] = []
        #: The first of them still taking work from outside (``refresh`` keeps it so).
        self.first_open: R | None = None
        #: The loop's implicit runner, once made.
        self.implicit: R | None = None
        #: Whether a runner was ever entered here (then no implicit runner is made).
        self.ever_opened = False
        #: Whether this loop may get an implicit runner (asyncio; trio has none).
        self.implicit_allowed = implicit_allowed
        #: The runner ``ctxkit.spawn`` picks here whoever calls, background task or not, when
        #: there is only one it could pick (``refresh`` keeps it so); else None.
        self.sole: R | None = None

    def add(self, runner: R) -> None:
        """Record an entered runner."""
        self.runners.append(runner)
        self.ever_opened = True
        self.refresh()

    def remove(self, runner: R) -> None:
        """Forget a closed runner."""
        if runner in self.runners:
            self.runners.remove(runner)
        self.refresh()

    def set_implicit(self, runner: R) -> None:
        """Record the loop's implicit runner, just made."""
        self.implicit = runner
        self.refresh()

    def refresh(self) -> None:
        """Work out ``first_open`` and ``sole`` again (a runner came, went or stopped accepting).

        ``sole`` is the one runner of the loop when that is what ``current_runner()`` returns to
        every caller: the only entered runner while it takes work (a task of a runner of
        another loop cannot run here, and one of a closed runner falls back to the open one),
        or the implicit runner while no runner was ever entered. Then ``ctxkit.spawn`` need not
        find out which background task, if any, is calling.
        """
        runners = self.runners
        self.first_open = next((runner for runner in runners if runner.accepting), None)
        if self.implicit is not None:
            self.sole = None if self.ever_opened else self.implicit
        else:
            self.sole = self.first_open if len(runners) == 1 else None


class LoopRegistry(Generic[R]):
    """The runners of every event loop of the process: by asyncio loop, or per trio run."""

    __slots__ = ("_by_loop", "_trio_var", "_trio_var_lock", "last")

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopRunners[R]] = (
            weakref.WeakKeyDictionary()
        )
        #: The asyncio loop whose runners were looked up last (weakly), and its runners: the
        #: one look-up that ``here`` keeps. Read, never written, by ``ctxkit.spawn``'s hot path,
        #: which inlines ``here``'s first case. Cleared when that loop is garbage-collected, so
        #: it never keeps a finished loop's runners longer than the mapping does.
        self.last: tuple[weakref.ref[asyncio.AbstractEventLoop], LoopRunners[R]] | None = None
        #: The runners of each trio run, made when first needed with trio imported (trio is
        #: optional). trio's own RunVar, not anyio's: one dict look-up on every ctxkit.spawn.
        self._trio_var: RunVar[LoopRunners[R]] | None = None
        self._trio_var_lock = threading.Lock()

    def current(self) -> LoopRunners[R]:
        """Return the runners of the running event loop.

        Raises:
            NoRunnerError: No event loop runs in this thread.
        """
        state = self.here()
        if state is None:
            raise NoRunnerError(
                "no async event loop is running in this thread; call ctxkit.spawn from async "
                "code (from another thread, hand the call to the loop with "
                "anyio.from_thread.run_sync or loop.call_soon_threadsafe)"
            )
        return state

    def here(self) -> LoopRunners[R] | None:
        """Return the runners of the event loop running in this thread, or None if none runs."""
        return self.of(asyncio._get_running_loop())

    def of(self, loop: asyncio.AbstractEventLoop | None) -> LoopRunners[R] | None:
        """``here()`` for a caller that has looked up the running asyncio loop.

        ``loop``: ``asyncio._get_running_loop()`` in this thread; None under trio and with no
        loop (the trio run's runners are looked up then). Not looking the loop up twice matters
        on Python 3.11, where each look-up is a ``getpid()`` system call.
        """
        if loop is not None:
            seen = self.last
            if seen is not None and seen[0]() is loop:
                return seen[1]
            try:
                state = self._by_loop[loop]
            except KeyError:
                state = self._by_loop[loop] = LoopRunners(implicit_allowed=True)
            self.last = (weakref.ref(loop, self._forget), state)
            return state
        run_var = self._trio_var if self._trio_var is not None else self._make_trio_var()
        if run_var is not None:
            try:
                return run_var.get()
            except LookupError:
                state = LoopRunners(implicit_allowed=False)
                run_var.set(state)
                return state
            except RuntimeError:  # trio is imported but not running in this thread
                pass
        return None

    @property
    def trio_ready(self) -> bool:
        """Whether the trio ``RunVar`` was made (it is once trio is imported and asked for)."""
        return self._trio_var is not None

    def _forget(self, ref: weakref.ref[asyncio.AbstractEventLoop]) -> None:
        """Drop ``last`` if it is about the loop just collected (a weak reference's callback)."""
        seen = self.last
        if seen is not None and seen[0] is ref:
            self.last = None

    def _make_trio_var(self) -> RunVar[LoopRunners[R]] | None:
        """Make the trio ``RunVar`` of the runners once; None while trio is not imported.

        No trio run can be going on before trio is imported, so importing it here is never
        needed. The lock makes runs starting in two threads at once share the one var.
        """
        trio = sys.modules.get("trio")
        if trio is None:
            return None
        with self._trio_var_lock:
            if self._trio_var is None:
                self._trio_var = trio.lowlevel.RunVar("ctxkit.runners")
        return self._trio_var


class ProcessRunners(Generic[R]):
    """Every entered runner of the process that has not closed, in opening order (thread-safe)."""

    __slots__ = ("_lock", "_runners")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runners: tuple[R, ...] = ()

    def add(self, runner: R) -> None:
        """Record an entered runner."""
        with self._lock:
            self._runners = (*self._runners, runner)

    def remove(self, runner: R) -> None:
        """Forget a closed runner."""
        with self._lock:
            self._runners = tuple(other for other in self._runners if other is not runner)

    def snapshot(self) -> tuple[R, ...]:
        """Return the open runners, in opening order."""
        return self._runners

    def first_accepting(self) -> R | None:
        """Return the first-opened runner that still takes work from outside, or None."""
        for runner in self._runners:  # a tuple, replaced whole: safe to read without the lock
            if runner.accepting:
                return runner
        return None
