"""FastAPI + ctxkit: background work that outlives its request, keeps its trace, and is drained.

Run it (spans and JSON logs go to stderr unless CTXKIT_EXAMPLE_SPANS / _LOGS name files):

    uvicorn --app-dir examples fastapi_app:app --timeout-graceful-shutdown 1
    curl -X POST 'localhost:8000/signup?address=ada@example.com' \
        -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
    curl -m 1 'localhost:8000/report?seconds=3'     # give up after 1 s: the report still finishes

Stop it with Ctrl+C or SIGTERM: the lifespan drains the work in flight and logs a summary.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from _telemetry import setup_telemetry
from fastapi import FastAPI, Request
from opentelemetry import propagate, trace

import ctxkit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from fastapi import Response

setup_telemetry("fastapi-example")
log = logging.getLogger("example")
tracer = trace.get_tracer("example")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Opened at startup; at shutdown it drains its tasks, cancels what is left, logs a summary.
    async with ctxkit.BackgroundRunner(drain_timeout=float(os.environ.get("DRAIN_TIMEOUT", 20))):
        yield


# Recent FastAPI versions trace requests themselves; this example makes its own server span
# (below) so that it works the same on every version.
app = FastAPI(lifespan=lifespan, telemetry={"tracing": False})


@app.middleware("http")
async def server_span(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    # Continue the caller's trace (W3C traceparent), with no instrumentation package needed.
    name = f"{request.method} {request.url.path}"
    parent = propagate.extract(request.headers)
    with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER):
        return await call_next(request)


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


@app.post("/signup")
async def signup(address: str) -> dict[str, str | None]:
    task = ctxkit.spawn(send_welcome_email, address)  # a child span of this request
    audit(f"signup {address}")  # each call spawns
    return {"task": task.name, "trace_id": task.trace_id}


@app.get("/report")
async def report(seconds: float) -> dict[str, str]:
    ctxkit.spawn(build_report, seconds)
    await asyncio.sleep(30)  # a slow upstream: the client gives up long before this returns
    return {"status": "done"}
