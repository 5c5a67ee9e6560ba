"""A taskiq app for a real worker process: ``python -m taskiq worker tests.taskiq_app.app:broker``.

Configured by environment variables, so one module serves several workers:

- ``CTXKIT_TEST_REDIS_URL``: the Redis the broker and the result backend use;
- ``CTXKIT_TEST_QUEUE``: the Redis list this worker consumes;
- ``CTXKIT_TEST_PROPAGATION``: ``child``, ``link`` or ``none``;
- ``CTXKIT_TEST_OUT``: a directory; finished spans are appended to ``spans.jsonl`` there.

The tasks return what they observed (trace, span, vars), so the test reads the worker's view
from the result backend. The worker allows ``request_id`` and ``tenant`` only: a ``secret`` var
sent by the producer must never be restored here.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

import redis.asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from taskiq import SimpleRetryMiddleware, TaskiqEvents, TaskiqState
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

import ctxkit
from ctxkit.contrib.taskiq import CtxkitMiddleware
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

broker = (
    ListQueueBroker(REDIS_URL, queue_name=QUEUE)
    .with_result_backend(RedisAsyncResultBackend(REDIS_URL))
    .with_middlewares(
        CtxkitMiddleware(
            vars=(request_id, tenant), propagation=_propagation(), tracer_provider=provider
        ),
        SimpleRetryMiddleware(default_retry_count=5),
    )
)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _export_spans(state: TaskiqState) -> None:
    if OUT_DIR is not None:
        exporter = JsonlSpanExporter(Path(OUT_DIR) / "spans.jsonl")
        provider.add_span_processor(SimpleSpanProcessor(exporter))


def _observe() -> dict[str, object]:
    span = trace.get_current_span()
    context = span.get_span_context()
    return {
        "trace_id": ctxkit.current_trace_id(),
        "span_id": f"{context.span_id:016x}" if context.is_valid else None,
        "span_recording": span.is_recording(),
        "request_id": request_id.get(None),
        "tenant": tenant.get(None),
        "secret": secret.get(None),
        "pid": os.getpid(),
    }


@broker.task(task_name="observe")
async def observe() -> dict[str, object]:
    """Return what an async task sees."""
    return _observe()


@broker.task(task_name="observe_sync")
def observe_sync() -> dict[str, object]:
    """Return what a sync task (run in taskiq's thread pool) sees."""
    return _observe()


@broker.task(task_name="fail")
async def fail() -> None:
    """Raise, so that the consumer span is marked ERROR; the worker must carry on."""
    raise RuntimeError(f"task failed for {request_id.get('?')}")


@broker.task(task_name="flaky")
async def flaky(key: str) -> dict[str, object]:
    """Fail on the first two runs for ``key`` (counted in Redis), then return what it sees."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        runs = await client.incr(key)
    finally:
        await client.aclose()
    if runs < 3:
        raise RuntimeError(f"run {runs} of {key} failed")
    return _observe()
