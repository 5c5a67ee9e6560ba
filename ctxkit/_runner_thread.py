"""``RunnerThread``: a ``BackgroundRunner`` on an event loop of its own, for code with no loop.

A WSGI app (Flask, Django), a CLI or a Celery task body has no event loop, yet has the same
need: work that outlives the request, keeps its trace, inherits nothing else and is drained at
shutdown. This module runs one asyncio loop in a daemon thread, opens a runner in it, and
shuts it down exactly as ``async with`` would, when asked or at interpreter exit.

The exit-time drain runs as a ``threading`` exit hook (``threading._register_atexit``), not an
``atexit`` one: those hooks run when the main thread ends, in reverse order of registration,
before ``concurrent.futures`` shuts its pools down from a hook of the same kind, and long before
``atexit``. So tasks drained at exit can still use ``loop.run_in_executor``,
``asyncio.to_thread`` and ``loop.getaddrinfo``. The hook is registered at the first ``start()``,
after importing ``concurrent.futures``' pool modules, so that it is registered after theirs and
runs before them whatever the import order of the application.

Threads: ``_alive`` and ``_exit_hook`` are module state touched by ``start()`` and ``stop()`` in
any thread and by the exit hook; only with ``_alive_lock`` held. A ``RunnerThread``'s
``_thread`` is set under its ``_lock`` by ``start()``; ``_loop``, ``_stop_event`` and
``_error`` are written once by its own thread before it sets ``ready``, and read after that.

Context: the runner thread starts detached, in an empty ``contextvars.Context`` that ctxkit
passes, whatever the interpreter's default (``sys.flags.thread_inherit_context``, on in
free-threaded builds, makes a plain ``Thread`` start in a copy of the context of the caller of
``start()``). So no var of the code that started it (a request's, sniffio's "current async
library" of a trio run) reaches its event loop, its serving task or its shutdown log lines, and
the ``Thread`` object keeps no object of that code alive.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import importlib
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from ._logging import logger
from ._runner import BackgroundRunner

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["RunnerThread", "detached_thread"]

T = TypeVar("T")

#: Started and not yet stopped; stopped (drained) at interpreter exit. Only under _alive_lock.
_alive: weakref.WeakSet[RunnerThread] = weakref.WeakSet()
#: Which exit hook ``_stop_all`` is registered as, once it is. Only under _alive_lock.
_exit_hook: str | None = None
_alive_lock = threading.Lock()

#: The modules that shut their pools down from a ``threading`` exit hook registered at import.
_POOL_MODULES = ("concurrent.futures.thread", "concurrent.futures.process")


class RunnerThread:
    """Run a ``BackgroundRunner`` on its own asyncio event loop, in a daemon thread.

    ``with ctxkit.RunnerThread(limit=..., drain_timeout=...) as runner:`` starts the thread
    and returns its runner; ``start()`` / ``stop()`` do the same for apps without a block
    (Django's ``AppConfig.ready``, a Flask app factory, gunicorn's ``post_fork``).

    Semantics:
        The options are ``BackgroundRunner``'s, checked at once. ``runner.spawn(...)``,
        ``ctxkit.spawn(...)`` (from any thread with no event loop of its own: this is the
        process's first-opened runner unless another was opened before) and decorated calls
        clone the *calling* thread's context and hand the task to the runner's loop. Leaving
        the block (or ``stop()``) drains and shuts the runner down exactly as leaving
        ``async with BackgroundRunner()`` does (``drain_timeout``, ``cancel_timeout``, the
        summary line, the statistics), then joins the thread. A runner thread never stopped is
        stopped when the main thread ends, before ``concurrent.futures`` shuts its pools down
        (and before non-daemon threads are joined), so its tasks are drained then and can still
        use ``asyncio.to_thread``, ``loop.run_in_executor`` and ``loop.getaddrinfo``; a spawn
        made after that (from a non-daemon thread) is refused as by any closed runner. In a
        forking server, start it in each worker process after the fork (gunicorn's
        ``post_fork``), never in the master: a thread does not survive ``fork()``. The thread
        starts in an empty context whatever ``sys.flags.thread_inherit_context`` says, so
        nothing of the code that starts it (a request's vars and trace, a trio run's "current
        async library") reaches its loop or its log lines, or stays alive with it.

    Args:
        **options: ``BackgroundRunner``'s keyword options.

    Raises:
        TypeError: A bad option type (as ``BackgroundRunner``).
        ValueError: A bad option value.
    """

    def __init__(self, **options: Any) -> None:
        self._runner = BackgroundRunner(**options)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "running" if self._thread is not None and self._thread.is_alive() else "stopped"
        return f"<RunnerThread {state} {self._runner!r}>"

    @property
    def runner(self) -> BackgroundRunner:
        """The runner this thread serves."""
        return self._runner

    def start(self) -> BackgroundRunner:
        """Start the thread, open the runner in it and return the runner.

        Raises:
            RuntimeError: Started before (a runner thread runs once).
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"{self!r} was started already; make a new RunnerThread")
            with _alive_lock:
                _install_exit_hook()
            ready = threading.Event()
            self._thread = detached_thread(self._main, ready, name="ctxkit-runner")
            self._thread.start()
        ready.wait()
        if self._error is not None:
            raise RuntimeError(f"{self!r} failed to start") from self._error
        with _alive_lock:
            _alive.add(self)
        return self._runner

    def stop(self, timeout: float | None = None) -> None:
        """Drain and shut the runner down as ``async with`` does, then join the thread.

        Waits for the whole shutdown (at most ``drain_timeout + cancel_timeout``) and the
        thread; with ``timeout``, waits at most that many seconds for both. Stopping a thread
        that is not running does nothing.
        """
        loop, stop_event, thread = self._loop, self._stop_event, self._thread
        with _alive_lock:
            _alive.discard(self)
        if loop is None or stop_event is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(stop_event.set)
        except RuntimeError:  # its loop has closed: nothing left to stop
            return
        if thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> BackgroundRunner:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:
            if not ready.is_set():
                self._error = exc
                ready.set()
            else:  # pragma: no cover - the runner's shutdown logs its own troubles
                raise

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        async with self._runner:
            ready.set()
            await self._stop_event.wait()


def detached_thread(target: Callable[[T], object], arg: T, *, name: str) -> threading.Thread:
    """Return a daemon thread (not started) that runs ``target(arg)`` in an empty context.

    From 3.14 the empty ``Context`` is the thread's own (``Thread(context=...)``), so the
    ``Thread`` object holds nothing of its starter's context and the interpreter's
    ``thread_inherit_context`` flag is never consulted. Before 3.14 threads always start in an
    empty context; the target still runs inside a fresh ``Context().run`` so that the rule holds
    by construction, not by that default.
    """
    if sys.version_info >= (3, 14):  # pragma: no cover - one branch per interpreter
        return threading.Thread(
            target=target, args=(arg,), name=name, daemon=True, context=contextvars.Context()
        )
    return threading.Thread(  # pragma: no cover - one branch per interpreter
        target=contextvars.Context().run, args=(target, arg), name=name, daemon=True
    )


def _install_exit_hook() -> None:
    """Register ``_stop_all`` to run at exit before ``concurrent.futures`` shuts down (once).

    ``threading._shutdown`` calls the hooks of ``threading._register_atexit`` in reverse order
    of registration (CPython 3.9 to 3.14), and each ``concurrent.futures`` pool module
    registers its own when first imported. Importing them here first puts ``_stop_all`` after
    them in the list, so it runs before them even when the application imports them later.
    Where that hook is missing (another Python) or refused (the first ``start()`` came after
    the main thread ended, from a non-daemon thread), ``atexit`` is the fallback: the drain
    still happens, after the pools have shut down (no later hook is left). Called with
    ``_alive_lock`` held.
    """
    global _exit_hook
    if _exit_hook is not None:
        return
    for name in _POOL_MODULES:
        try:
            importlib.import_module(name)
        except RuntimeError:  # first imported during shutdown: it refuses to register its hook
            pass
        except ImportError:  # pragma: no cover - a Python without multiprocessing
            pass
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_stop_all)
        except RuntimeError:  # threading's shutdown has begun: too late for its hooks
            pass
        else:
            _exit_hook = "threading"
            return
    atexit.register(_stop_all)
    _exit_hook = "atexit"


def _stop_all() -> None:
    """Drain every runner thread nobody stopped (when the main thread ends)."""
    with _alive_lock:
        unstopped = list(_alive)
    for runner_thread in unstopped:
        try:
            runner_thread.stop()
        except Exception:  # pragma: no cover - stop() reports its runner's own troubles
            # Raised here, it would skip the other exit hooks (concurrent.futures' among them).
            logger.exception("ctxkit: stopping %r at exit failed", runner_thread)
