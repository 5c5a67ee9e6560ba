"""An arq app for a real worker process: ``python -m arq tests.arq_app.app.WorkerSettings``.

Configured by environment variables, so one module serves several workers:

- ``CTXKIT_TEST_REDIS_URL``: the Redis arq uses, and where jobs write what they saw;
- ``CTXKIT_TEST_QUEUE``: the queue this worker takes jobs from;
- ``CTXKIT_TEST_PROPAGATION``: ``child``, ``link`` or ``none``;
- ``CTXKIT_TEST_OUT``: a directory; finished spans are appended to ``spans.jsonl`` there.

Each job takes a Redis key and pushes there, as JSON, what it observed (trace, span, vars). The
worker allows ``request_id`` and ``tenant`` only: a ``secret`` var sent by the producer must
never be restored here.
"""

from __future__ import annotations

import asyncio
import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from arq.connections import RedisSettings
from arq.worker import Retry, func
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import ctxkit
from ctxkit.contrib.arq import CtxkitArq
from tests._spans import JsonlSpanExporter

request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[object] = ContextVar("tenant")
secret: ContextVar[str] = ContextVar("secret")

REDIS_URL = os.environ.get("CTXKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("CTXKIT_TEST_QUEUE", "ctxkit-test")
OUT_DIR = os.environ.get("CTXKIT_TEST_OUT")


def _propagation() -> Literal["child", "link", "none"]:
    value = os.environ.get("CTXKIT_TEST_PROPAGATION", "child")
    if value == "link":
        return "link"
    if value == "none":
        return "none"
    return "child"


provider = TracerProvider()
if OUT_DIR is not None:
    exporter = JsonlSpanExporter(Path(OUT_DIR) / "spans.jsonl")
    provider.add_span_processor(SimpleSpanProcessor(exporter))


async def observe_into(ctx: dict[str, Any], key: str) -> None:
    span = trace.get_current_span()
    context = span.get_span_context()
    seen = {
        "trace_id": ctxkit.current_trace_id(),
        "span_id": f"{context.span_id:016x}" if context.is_valid else None,
        "request_id": request_id.get(None),
        "tenant": tenant.get(None),
        "secret": secret.get(None),
        "job_id": ctx["job_id"],
        "pid": os.getpid(),
    }
    await ctx["redis"].rpush(key, json.dumps(seen))


async def observe(ctx: dict[str, Any], key: str) -> None:
    """Write what the job sees."""
    await observe_into(ctx, key)


async def slow_observe(ctx: dict[str, Any], key: str, value: str) -> None:
    """Set ``request_id`` itself, wait beside other jobs, then write what it sees."""
    request_id.set(value)
    await asyncio.sleep(0.2)
    await observe_into(ctx, key)


async def fail(ctx: dict[str, Any], key: str) -> None:
    """Write what it sees, then raise: the consumer span is ERROR, the worker carries on."""
    await observe_into(ctx, key)
    raise RuntimeError(f"job failed for {request_id.get('?')}")


async def flaky(ctx: dict[str, Any], key: str) -> None:
    """Ask for a retry on the first two tries, then write what it sees."""
    if ctx["job_try"] < 3:
        raise Retry(defer=0.05)
    await observe_into(ctx, key)


ctxkit_arq = CtxkitArq(
    vars=(request_id, tenant), propagation=_propagation(), tracer_provider=provider
)


class WorkerSettings:
    """What ``arq`` reads: the wrapped functions, the Redis, the queue."""

    functions = ctxkit_arq.functions(observe, slow_observe, fail, func(flaky, max_tries=5))
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    queue_name = QUEUE
    poll_delay = 0.05
    max_jobs = 4
    keep_result = 60
