"""aiohttp + ctxkit: background work that survives a cancelled handler and is drained at exit.

Run it (spans and JSON logs go to stderr unless CTXKIT_EXAMPLE_SPANS / _LOGS name files):

    python examples/aiohttp_app.py --port 8080
    curl -X POST 'localhost:8080/signup?address=ada@example.com' \
        -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
    curl -m 1 'localhost:8080/report?seconds=3'   # the handler is cancelled, the report goes on

Stop it with Ctrl+C or SIGTERM: the cleanup context drains the work in flight and logs a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import TYPE_CHECKING

from _telemetry import setup_telemetry
from aiohttp import web
from opentelemetry import propagate, trace

import ctxkit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from aiohttp.typedefs import Handler

log = logging.getLogger("example")
tracer = trace.get_tracer("example")


async def background_runner(app: web.Application) -> AsyncIterator[None]:
    # Opened at startup; at cleanup it drains its tasks, cancels what is left, logs a summary.
    async with ctxkit.BackgroundRunner(drain_timeout=float(os.environ.get("DRAIN_TIMEOUT", 20))):
        yield


@web.middleware
async def server_span(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Continue the caller's trace (W3C traceparent), with no instrumentation package needed.
    parent = propagate.extract(request.headers)
    name = f"{request.method} {request.path}"
    with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER):
        try:
            return await handler(request)
        except asyncio.CancelledError:
            log.info("%s cancelled: the client went away", name)
            raise


async def send_welcome_email(address: str) -> None:
    with tracer.start_as_current_span("smtp.send"):
        await asyncio.sleep(0.05)
        if address.endswith("@invalid"):
            raise ValueError(f"cannot deliver to {address}")  # reported, never lost
        log.info("welcome email sent to %s", address)


@ctxkit.fire_and_forget
async def audit(event: str) -> None:
    log.info("audit: %s", event)


async def build_report(seconds: float) -> None:
    log.info("report started (%ss)", seconds)
    await asyncio.sleep(seconds)
    log.info("report finished (%ss)", seconds)


async def signup(request: web.Request) -> web.Response:
    address = request.query["address"]
    task = ctxkit.spawn(send_welcome_email, address)  # a child span of this request
    audit(f"signup {address}")  # each call spawns
    return web.json_response({"task": task.name, "trace_id": task.trace_id})


async def report(request: web.Request) -> web.Response:
    ctxkit.spawn(build_report, float(request.query["seconds"]))
    await asyncio.sleep(30)  # a slow upstream: the client gives up long before this returns
    return web.json_response({"status": "done"})


def make_app() -> web.Application:
    app = web.Application(middlewares=[server_span])
    app.cleanup_ctx.append(background_runner)
    app.router.add_post("/signup", signup)
    app.router.add_get("/report", report)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    setup_telemetry("aiohttp-example")
    # handler_cancellation: a client that disconnects cancels its handler (and all it awaits).
    web.run_app(
        make_app(),
        host="127.0.0.1",
        port=parser.parse_args().port,
        handler_cancellation=True,
        shutdown_timeout=1,
    )
