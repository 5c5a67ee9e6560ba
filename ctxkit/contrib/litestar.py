"""Litestar: a runner for the app's lifetime, and its background tasks detached, by one plugin.

Add the plugin to the app::

    from litestar import Litestar
    from ctxkit.contrib.litestar import CtxkitPlugin

    app = Litestar(route_handlers=[...], plugins=[CtxkitPlugin(drain_timeout=20)])

The handlers do not change: a ``BackgroundTask`` or ``BackgroundTasks`` on a response is
written as before. Needs the ``litestar`` extra. See docs/frameworks.md.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

from litestar import background_tasks
from litestar.middleware.base import DefineMiddleware

from .._runner import BackgroundRunner
from ._detach import Detach, capture, make_detach, start, switch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from contextvars import Context, ContextVar

    from litestar import Litestar
    from litestar.config.app import AppConfig
    from litestar.types import ASGIApp, Receive, Scope, Send
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from .._handle import TaskFailure
    from .._trace import Propagation

__all__ = ["CtxkitPlugin"]


class CtxkitPlugin:
    """Open a ``BackgroundRunner`` for the app's lifetime and detach its background tasks.

    A Litestar ``InitPluginProtocol`` plugin (the protocol is structural, so the class does not
    name it as a base). ``vars``, ``propagation``, ``span`` and ``timeout`` are
    ``ctxkit.spawn``'s options, for
    every background task of the app; the other arguments are ``BackgroundRunner``'s.

    Semantics:
        The app's lifespan opens a ``BackgroundRunner`` with the runner options (entered after
        the lifespan managers the app already has, so it drains before they close) and closes
        it at shutdown: it drains its tasks for ``drain_timeout`` seconds, then cancels what
        is left and logs the summary line. ``ctxkit.spawn`` in the app's handlers finds it too.

        Each background task of the app (a ``BackgroundTask``, or each task of a
        ``BackgroundTasks``, on any response; ``async def`` or plain functions) becomes one
        ctxkit task of that runner (``ctxkit.spawn``'s choice if the server ran no lifespan),
        started when the response has been sent and named after its function. It runs in a
        clone of the context of its ``BackgroundTask(...)`` call: the ``vars`` given plus the
        registered ones and the request's trace (``propagation``), so a sync handler's vars
        arrive and nothing else of the request does. A plain function runs in a worker
        thread, as ``ctxkit.spawn`` runs one.

        The request's ASGI call returns once the response has been sent; the keep-alive
        connection never waits for the tasks. Each task is on its own: one that fails, times
        out or is cancelled does not stop the others (``run_in_task_group`` makes no
        difference), and its error is reported as every ctxkit task's is (its span, a log
        line with the trace id, ``on_error``, metrics). A client that hangs up and the
        request's own cancellation do not cancel them; only the runner does. A spawn the
        runner refuses (full, shutting down) is logged on the ``ctxkit`` logger and never
        reaches the server.

        Only apps that list the plugin are affected; other apps in the process keep
        Litestar's behaviour. Listing it twice is harmless: the first one listed is used.

    Args:
        vars: ContextVars the tasks carry, beside the registered ones.
        propagation: How each task's span relates to the request's trace (as ``spawn``).
        span: Whether each task gets a span of its own.
        timeout: Seconds after which a task is cancelled; None for no limit.
        limit: The runner's ``limit``.
        pending_limit: The runner's ``pending_limit``.
        drain_timeout: The runner's ``drain_timeout``.
        on_error: The runner's ``on_error``.
        tracer_provider: The runner's ``tracer_provider``.
        meter_provider: The runner's ``meter_provider``.
        cancel_timeout: The runner's ``cancel_timeout``.

    Raises:
        TypeError: An option has a bad type.
        ValueError: An option has a bad value.
        RuntimeError: The installed Litestar's background tasks do not have the shape ctxkit
            knows.
    """

    __slots__ = ("_config", "_runner", "_runner_options")

    def __init__(
        self,
        *,
        vars: tuple[ContextVar[Any], ...] | list[ContextVar[Any]] = (),
        propagation: Propagation = "child",
        span: bool = True,
        timeout: float | None = None,
        limit: int | None = 100,
        pending_limit: int | None = 10_000,
        drain_timeout: float | None = 30.0,
        on_error: Callable[[TaskFailure], object] | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        cancel_timeout: float | None = 5.0,
    ) -> None:
        self._config = make_detach(
            "CtxkitPlugin", vars, propagation, span, timeout, runner=self._current_runner
        )
        self._runner_options: dict[str, Any] = {
            "limit": limit,
            "pending_limit": pending_limit,
            "drain_timeout": drain_timeout,
            "on_error": on_error,
            "tracer_provider": tracer_provider,
            "meter_provider": meter_provider,
            "cancel_timeout": cancel_timeout,
        }
        BackgroundRunner(**self._runner_options)  # validate the runner's options now
        self._runner: BackgroundRunner | None = None
        _patch()

    def __repr__(self) -> str:
        return f"CtxkitPlugin(runner={self._runner!r})"

    @property
    def runner(self) -> BackgroundRunner | None:
        """The runner the app's lifespan opened, while it is open; None otherwise."""
        return self._runner

    def _current_runner(self) -> BackgroundRunner | None:
        return self._runner

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the runner to the app's lifespan and the switch to its middleware."""
        if any(_is_switch(middleware) for middleware in app_config.middleware):
            return app_config  # set up already (the plugin is listed twice)
        app_config.lifespan.append(self._lifespan)
        app_config.middleware.insert(0, DefineMiddleware(_SwitchMiddleware, config=self._config))
        return app_config

    @asynccontextmanager
    async def _lifespan(self, app: Litestar) -> AsyncIterator[None]:
        async with BackgroundRunner(**self._runner_options) as runner:
            self._runner = runner
            try:
                yield
            finally:
                self._runner = None


def _is_switch(middleware: object) -> bool:
    return isinstance(middleware, DefineMiddleware) and middleware.middleware is _SwitchMiddleware


class _SwitchMiddleware:
    """Set ``switch`` for the requests of the route handlers it wraps (HTTP and WebSocket)."""

    __slots__ = ("app", "config")

    def __init__(self, app: ASGIApp, config: Detach) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = switch.set(self.config)
        try:
            await self.app(scope, receive, send)
        finally:
            switch.reset(token)


class _Captured:
    """A task function made in a set-up app: the original, its context, the framework's wrapper.

    Litestar's ``BackgroundTask`` has ``__slots__``, so the context travels in its ``fn``;
    called, this does exactly what the framework's wrapper does.
    """

    __slots__ = ("context", "original", "wrapped")

    def __init__(self, wrapped: Any, original: Callable[..., object], context: Context) -> None:
        self.wrapped, self.original, self.context = wrapped, original, context

    async def __call__(self, *args: object, **kwargs: object) -> object:
        return await self.wrapped(*args, **kwargs)


_PATCHED: Final = "_ctxkit"


def _patch() -> None:
    """Teach ``litestar.background_tasks.BackgroundTask`` the switch, once per process.

    Raises:
        RuntimeError: The class does not have the shape this module knows.
    """
    task_class: Any = background_tasks.BackgroundTask
    if getattr(task_class.__call__, _PATCHED, False):
        return
    _check_shape()
    original_init: Callable[..., None] = task_class.__init__
    original_call: Callable[[Any], Any] = task_class.__call__

    def __init__(self: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        original_init(self, fn, *args, **kwargs)
        context = capture()
        if context is not None:
            self.fn = _Captured(self.fn, fn, context)

    async def __call__(self: Any) -> None:
        config = switch.get()
        if config is None:
            await original_call(self)
            return
        fn = self.fn
        if isinstance(fn, _Captured):
            start(config, fn.context, fn.original, self.args, self.kwargs)
        else:  # made outside a set-up app's request: in the context of the response
            start(config, None, _unwrapped(fn), self.args, self.kwargs)

    __init__.__doc__ = original_init.__doc__
    __call__.__doc__ = original_call.__doc__
    setattr(__call__, _PATCHED, True)
    task_class.__init__ = __init__
    task_class.__call__ = __call__


def _unwrapped(fn: Any) -> Callable[..., object]:
    """Return the function Litestar's sync-to-thread wrapper holds, or ``fn`` itself."""
    inner = getattr(fn, "func", None) if type(fn).__name__ == "AsyncCallable" else None
    return inner if callable(inner) else fn  # type: ignore[no-any-return]


def _check_shape() -> None:
    """Fail now, at setup, if Litestar's background tasks are not what ctxkit expects."""

    async def probe(*args: object, **kwargs: object) -> None:
        """Stand in for a task's function."""

    try:
        task: Any = background_tasks.BackgroundTask(probe, 1, key=2)
        task.fn = task.fn  # where a captured context will travel: must be settable
        known = (
            callable(task.fn)
            and task.args == (1,)
            and task.kwargs == {"key": 2}
            and "__call__" in vars(background_tasks.BackgroundTasks)
        )
    except Exception as exc:
        raise RuntimeError(_UNKNOWN) from exc
    if not known:
        raise RuntimeError(_UNKNOWN)


_UNKNOWN: Final = (
    "CtxkitPlugin: this Litestar's litestar.background_tasks.BackgroundTask does not have the "
    "shape ctxkit knows (fn, args, kwargs and an async __call__); install a litestar version "
    "that ctxkit's litestar extra admits, or report this version"
)
