"""FastAPI + ctxkit without tracing: one fake trace id joins a request's logs and its tasks' logs.

No OpenTelemetry SDK is installed here (a service that only ships logs). ``TraceIdMiddleware``
gives each request a fake trace id, which ``TraceIdFilter`` writes on the request's log lines and
which every task spawned from the request carries onto its own lines.

Run it (JSON logs go to stderr unless CTXKIT_EXAMPLE_LOGS names a file):

    uvicorn --app-dir examples untraced_app:app
    curl -X POST 'localhost:8000/signup?address=ada@example.com'

and grep the logs for the ``trace_id`` the response shows: the request's line and both tasks'
lines have it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from _telemetry import setup_logging
from fastapi import FastAPI

import ctxkit
from ctxkit.contrib.asgi import TraceIdMiddleware

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

setup_logging()  # JSON lines with trace_id and span_id; no tracer provider at all
log = logging.getLogger("example")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with ctxkit.BackgroundRunner(drain_timeout=float(os.environ.get("DRAIN_TIMEOUT", 20))):
        yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(TraceIdMiddleware)  # one fake trace id per request without a valid span


async def send_welcome_email(address: str) -> None:
    await asyncio.sleep(0.05)
    log.info("welcome email sent to %s", address)


@ctxkit.fire_and_forget(span=False)
async def audit(event: str) -> None:
    log.info("audit: %s", event)


@app.post("/signup")
async def signup(address: str) -> dict[str, str | None]:
    log.info("signup of %s accepted", address)
    task = ctxkit.spawn(send_welcome_email, address)
    audit(f"signup {address}")
    return {"trace_id": ctxkit.current_trace_id(), "task_trace_id": task.trace_id}
