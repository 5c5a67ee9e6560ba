"""Starlette and FastAPI: the app's background tasks become detached ctxkit tasks, by one line.

Call it once where the app is made::

    from fastapi import FastAPI
    from ctxkit.contrib.starlette import detach_background_tasks

    app = FastAPI(lifespan=lifespan)  # the lifespan opens a ctxkit.BackgroundRunner
    detach_background_tasks(app)

The endpoints do not change: FastAPI's injected ``BackgroundTasks``, and a ``BackgroundTask`` or
``BackgroundTasks`` passed to any response, keep being written as before. Needs the
``starlette`` extra (FastAPI brings Starlette). See docs/frameworks.md.
"""

from __future__ import annotations

from contextvars import Context
from typing import TYPE_CHECKING, Any, Final

from starlette import background
from starlette.applications import Starlette

from .._runner import BackgroundRunner, loops
from ._detach import Detach, capture, make_detach, start, switch

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextvars import ContextVar

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from .._trace import Propagation

__all__ = ["detach_background_tasks"]

#: Where a ``starlette.background.BackgroundTask`` made in a set-up app keeps its context.
_CONTEXT: Final = "_ctxkit_context"
#: Where a set-up application keeps its switch (the middleware that sets ``switch``).
_APP_ATTRIBUTE: Final = "_ctxkit_detach"


def detach_background_tasks(
    app: object,
    *,
    vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
    propagation: Propagation = "child",
    span: bool = True,
    timeout: float | None = None,
) -> None:
    """Make every background task of a Starlette or FastAPI app a detached ctxkit task.

    Call it once where the app is made, before it serves (it adds a middleware). The options
    are ``ctxkit.spawn``'s and apply to every task.

    Semantics:
        Each background task of the app (FastAPI's injected ``BackgroundTasks``, a
        ``BackgroundTasks`` or ``BackgroundTask`` passed to any response; ``async def`` or
        plain functions) becomes one ctxkit task, started when the response has been sent,
        on the current runner and named after its function. The current runner is the one
        the app's lifespan opened; if it opened none, one with the default options that the
        middleware opens when the app's startup completes and drains when the server sends
        the lifespan's shutdown, before the app's own shutdown (with the lifespan off, as
        ``uvicorn --lifespan off``: ``ctxkit.spawn``'s choice). A task runs in a clone of
        the context of its ``add_task`` call (or of ``BackgroundTask(...)``): the ``vars``
        given plus the registered ones and the request's trace (``propagation``), so a
        ``def`` endpoint's vars arrive and nothing else of the request does. A plain
        function runs in a worker thread, as ``ctxkit.spawn`` runs one.

        The request's ASGI call returns once the response has been sent; the keep-alive
        connection never waits for the tasks. Each task is on its own: one that fails, times
        out or is cancelled does not stop the others, and its error is reported as every
        ctxkit task's is (its span, a log line with the trace id, ``on_error``, metrics). A
        client that hangs up and the request's own cancellation do not cancel them; only the
        runner does (its ``cancel()``, ``timeout``, the end of its shutdown drain). A spawn
        the runner refuses (full, closed, none on trio) is logged on the ``ctxkit`` logger
        and never reaches the server.

        Only requests that pass through this app are affected, sub-applications mounted in
        it included; other apps in the process, and an app that mounts this one, keep
        Starlette's behaviour. Calling it again on the same app replaces the options.

    Args:
        app: A ``starlette.applications.Starlette`` or ``fastapi.FastAPI`` instance.
        vars: ContextVars the tasks carry, beside the registered ones.
        propagation: How each task's span relates to the request's trace (as ``spawn``).
        span: Whether each task gets a span of its own.
        timeout: Seconds after which a task is cancelled; None for no limit.

    Raises:
        TypeError: ``app`` is not a Starlette application, or an option has a bad type.
        ValueError: An option has a bad value.
        RuntimeError: The app has already started serving, or the installed Starlette's
            background tasks do not have the shape ctxkit knows.
    """
    if not isinstance(app, Starlette):
        raise TypeError(
            f"detach_background_tasks() needs a Starlette or FastAPI application, got {app!r}; "
            "for Litestar add ctxkit.contrib.litestar.CtxkitPlugin() to its plugins"
        )
    existing = getattr(app, _APP_ATTRIBUTE, None)
    holder = existing if isinstance(existing, _Switch) else _Switch()
    holder.config = make_detach(
        "detach_background_tasks", vars, propagation, span, timeout, holder.lifespan_runner
    )
    _patch()
    if holder is not existing:
        app.add_middleware(_SwitchMiddleware, switch=holder)
        setattr(app, _APP_ATTRIBUTE, holder)


class _Switch:
    """The options of one set-up app (a second set-up replaces them), and its own runner.

    ``own`` is the runner the middleware opened for the app's lifetime because the app's
    lifespan opened none; touched only in the lifespan's task, on the app's loop.
    """

    __slots__ = ("config", "own")

    def __init__(self) -> None:
        self.config: Detach | None = None
        self.own: BackgroundRunner | None = None

    def lifespan_runner(self) -> BackgroundRunner | None:
        """The runner the tasks go to: the app's own, if it has one, else spawn's choice."""
        own = self.own
        return own if own is not None and own.accepting else None

    async def open_own(self) -> None:
        """Open a runner for the app's lifetime, unless one is open on this loop already."""
        if self.own is None and not _runner_open_here():
            runner = BackgroundRunner()
            await runner.__aenter__()
            self.own = runner

    async def close_own(self, exc: BaseException | None = None) -> None:
        """Drain and close the app's own runner, if it opened one (a shutdown drain)."""
        runner, self.own = self.own, None
        if runner is not None:
            await runner.__aexit__(type(exc) if exc is not None else None, exc, None)


class _SwitchMiddleware:
    """Set ``switch`` for the HTTP requests of the app it wraps."""

    __slots__ = ("app", "switch")

    def __init__(self, app: ASGIApp, switch: _Switch) -> None:
        self.app, self.switch = app, switch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        token = switch.set(self.switch.config)
        try:
            await self.app(scope, receive, send)
        finally:
            switch.reset(token)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Give the app a runner for its lifetime if its lifespan opened none.

        Opened once the app's startup has completed (a runner its lifespan opened is open by
        then, and is used instead), and drained when the shutdown message arrives, before the
        app's own shutdown runs: the tasks finish while what they use is still there. All of
        it in the lifespan's one task, where a runner's ``async with`` would be.
        """
        holder = self.switch

        async def send_startup(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await holder.open_own()
            await send(message)

        async def receive_shutdown() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await holder.close_own()
            return message

        try:
            await self.app(scope, receive_shutdown, send_startup)
        except BaseException as exc:
            await holder.close_own(exc)
            raise
        await holder.close_own()


def _runner_open_here() -> bool:
    """Whether a runner was entered on the running loop and takes work."""
    here = loops.here()
    return here is not None and here.first_open is not None


def _patch() -> None:
    """Teach ``starlette.background.BackgroundTask`` the switch, once per process.

    Raises:
        RuntimeError: The class does not have the shape this module knows.
    """
    task_class = background.BackgroundTask
    if getattr(task_class.__call__, "_ctxkit", False):
        return
    _check_shape(background)
    original_init: Callable[..., None] = task_class.__init__
    original_call: Callable[[Any], Any] = task_class.__call__

    def __init__(self: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        original_init(self, func, *args, **kwargs)
        context = capture()
        if context is not None:
            setattr(self, _CONTEXT, context)

    async def __call__(self: Any) -> None:
        config = switch.get()
        if config is None:
            await original_call(self)
            return
        context = getattr(self, _CONTEXT, None)
        start(config, context if isinstance(context, Context) else None, *_parts(self))

    __init__.__doc__ = original_init.__doc__
    __call__.__doc__ = original_call.__doc__
    __call__._ctxkit = True  # type: ignore[attr-defined]
    task_class.__init__ = __init__  # type: ignore[method-assign]
    task_class.__call__ = __call__  # type: ignore[method-assign]


def _parts(task: Any) -> tuple[Callable[..., object], tuple[object, ...], dict[str, object]]:
    return task.func, task.args, task.kwargs


def _check_shape(background: Any) -> None:
    """Fail now, at setup, if Starlette's background tasks are not what ctxkit expects."""

    def probe(*args: object, **kwargs: object) -> None:
        """Stand in for a task's function."""

    try:
        task = background.BackgroundTask(probe, 1, key=2)
        tasks = background.BackgroundTasks()
        tasks.add_task(probe)
        known = (
            _parts(task) == (probe, (1,), {"key": 2})
            and isinstance(tasks, background.BackgroundTask)
            and isinstance(tasks.tasks[0], background.BackgroundTask)
            and "__call__" in vars(background.BackgroundTasks)
        )
    except Exception as exc:
        raise RuntimeError(_unknown(background)) from exc
    if not known:
        raise RuntimeError(_unknown(background))


def _unknown(background: Any) -> str:
    import starlette

    return (
        f"detach_background_tasks(): starlette {starlette.__version__}'s BackgroundTask does not "
        f"have the shape ctxkit knows (func, args, kwargs and an async __call__, in "
        f"{background.__name__}); install a starlette version that ctxkit's starlette extra "
        "admits, or report this version"
    )
