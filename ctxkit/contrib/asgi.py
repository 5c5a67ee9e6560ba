"""ASGI integration: one fake trace id per request, so a request's logs and its tasks' logs join.

Pure ASGI, with no dependency beyond ctxkit itself: it wraps any ASGI 3 application (FastAPI,
Starlette, Quart, a bare ``async def app(scope, receive, send)``)::

    from fastapi import FastAPI
    from ctxkit.contrib.asgi import TraceIdMiddleware

    app = FastAPI()
    app.add_middleware(TraceIdMiddleware)  # or: app = TraceIdMiddleware(app)

Without tracing (no OpenTelemetry SDK, or no server span for the request), a request's own log
lines carry no trace id and each task it spawns gets a fake trace id of its own, so nothing joins
them. With the middleware the request gets one fake trace id, which its log lines and every task
it spawns share.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Final

from opentelemetry import trace

from .._trace import fake_trace_id_var, new_fake_trace_id

__all__ = ["TraceIdMiddleware"]

# The ASGI 3 callables' types, structurally (no dependency on Starlette or asgiref).
#: An ASGI connection scope.
Scope = MutableMapping[str, object]
#: The ASGI ``receive`` callable.
Receive = Callable[[], Awaitable[MutableMapping[str, object]]]
#: The ASGI ``send`` callable.
Send = Callable[[MutableMapping[str, object]], Awaitable[None]]
#: An ASGI 3 application.
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_SCOPES: Final = frozenset({"http", "websocket"})


class TraceIdMiddleware:
    """Give each HTTP request and WebSocket connection with no valid span a fake trace id.

    Semantics:
        For an ``http`` or ``websocket`` scope, when no valid OpenTelemetry span is current as
        the request enters the middleware, the request runs with a new fake trace id (32
        lowercase hex characters, see ``ctxkit.current_trace_id``): ``current_trace_id()``,
        ``ctxkit.TraceIdFilter`` and ``ctxkit.contrib.structlog.add_trace_ids`` report it in
        the request, and every task the request spawns (``ctxkit.spawn``, ``clone``) carries
        it, so the request's log lines and its tasks' log lines share it. A task that gets a
        span of its own from a configured SDK logs that span's trace id instead: the fake id
        is for log correlation only and never enters a span. Each request gets its own id, also
        when the server's context had one; the id is reset when the request ends.

        When a valid span is current (an OpenTelemetry server middleware wraps this one, or
        the server is instrumented), the middleware does nothing: the real trace id wins. A
        server span started *inside* it wins as well, since a valid span always beats the fake
        id. ``lifespan`` and other scopes pass through untouched. The middleware starts no
        work, cancels nothing and never changes messages.

    Args:
        app: The ASGI application to wrap.
    """

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        if not callable(app):
            raise TypeError(f"TraceIdMiddleware needs an ASGI application, got {app!r}")
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the wrapped application for one connection, with a fake trace id if needed."""
        if (
            scope.get("type") not in _REQUEST_SCOPES
            or trace.get_current_span().get_span_context().is_valid
        ):
            await self.app(scope, receive, send)
            return
        token = fake_trace_id_var.set(new_fake_trace_id())
        try:
            await self.app(scope, receive, send)
        finally:
            fake_trace_id_var.reset(token)
