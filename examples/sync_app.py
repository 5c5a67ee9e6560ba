"""FastAPI ``def`` endpoints + ctxkit: sync code spawns background work like async code does.

FastAPI runs a ``def`` endpoint in a worker thread, with a copy of the request's context. There
``ctxkit.spawn`` clones that context (the selected vars and the request's trace), hands the task
to the app's runner on the event loop, and returns at once; a plain function is run in a worker
thread, a coroutine on the loop. Run it (spans and JSON logs go to stderr unless
CTXKIT_EXAMPLE_SPANS / _LOGS name files):

    uvicorn --app-dir examples sync_app:app --timeout-graceful-shutdown 1
    curl -X POST 'localhost:8000/order/42' -H 'x-request-id: r-1' \
        -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from _telemetry import setup_telemetry
from fastapi import FastAPI, Request
from opentelemetry import propagate, trace

import ctxkit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from fastapi import Response

setup_telemetry("sync-example")
log = logging.getLogger("example")
tracer = trace.get_tracer("example")

#: Carried into background tasks (registered); ``session`` is request state that must not be.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
session: contextvars.ContextVar[str] = contextvars.ContextVar("session")
ctxkit.register(request_id)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with ctxkit.BackgroundRunner(drain_timeout=float(os.environ.get("DRAIN_TIMEOUT", 20))):
        yield


app = FastAPI(lifespan=lifespan, telemetry={"tracing": False})


@app.middleware("http")
async def server_span(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    request_id.set(request.headers.get("x-request-id", "-"))
    session.set("db-session-of-this-request")
    parent = propagate.extract(request.headers)
    name = f"{request.method} {request.url.path}"
    with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER):
        return await call_next(request)


def seen() -> str:
    return f"request_id={request_id.get('unset')} session={session.get('unset')}"


async def notify(order: str) -> None:
    await asyncio.sleep(0.05)
    log.info("coroutine task for order %s: %s", order, seen())


def write_invoice(order: str) -> None:  # sync work: a sync DB driver, smtplib
    time.sleep(0.05)
    log.info("thread task for order %s: %s", order, seen())


def slow_export(seconds: float) -> None:
    log.info("export started (%ss)", seconds)
    time.sleep(seconds)
    log.info("export finished (%ss)", seconds)


@app.post("/order/{order}")
def create_order(order: str) -> dict[str, str | None]:  # a def endpoint: a worker thread
    coroutine_task = ctxkit.spawn(notify, order)
    thread_task = ctxkit.spawn(write_invoice, order)
    return {"trace_id": thread_task.trace_id, "tasks": f"{coroutine_task.name},{thread_task.name}"}


@app.get("/export")
def export(seconds: float) -> dict[str, str]:
    ctxkit.spawn(slow_export, seconds)
    time.sleep(30)  # a slow upstream: the client gives up long before this returns
    return {"status": "done"}
