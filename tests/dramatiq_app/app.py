"""A dramatiq app for a real worker process: ``python -m dramatiq tests.dramatiq_app.app``.

Configured by environment variables, so one module serves several workers:

- ``CTXKIT_TEST_REDIS_URL``: the Redis the broker uses, and where actors write what they saw;
- ``CTXKIT_TEST_QUEUE``: the queue this worker's actors consume;
- ``CTXKIT_TEST_PROPAGATION``: ``child``, ``link`` or ``none``;
- ``CTXKIT_TEST_OUT``: a directory; finished spans are appended to ``spans.jsonl`` there.

Each actor takes a Redis key and writes there, as JSON, what it observed (trace, span, vars).
The worker allows ``request_id`` and ``tenant`` only: a ``secret`` var sent by the producer
must never be restored here.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import ctxkit
from ctxkit.contrib.dramatiq import CtxkitMiddleware
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
    provider.add_span_processor(
        SimpleSpanProcessor(JsonlSpanExporter(Path(OUT_DIR) / "spans.jsonl"))
    )

broker = RedisBroker(url=REDIS_URL)
broker.add_middleware(
    CtxkitMiddleware(
        vars=(request_id, tenant), propagation=_propagation(), tracer_provider=provider
    )
)
dramatiq.set_broker(broker)
client = redis.Redis.from_url(REDIS_URL)


def observe_into(key: str) -> None:
    span = trace.get_current_span()
    context = span.get_span_context()
    seen = {
        "trace_id": ctxkit.current_trace_id(),
        "span_id": f"{context.span_id:016x}" if context.is_valid else None,
        "request_id": request_id.get(None),
        "tenant": tenant.get(None),
        "secret": secret.get(None),
        "pid": os.getpid(),
    }
    client.rpush(key, json.dumps(seen))


@dramatiq.actor(actor_name="observe", queue_name=QUEUE, max_retries=0)
def observe(key: str) -> None:
    """Write what the actor sees."""
    observe_into(key)


@dramatiq.actor(actor_name="fail", queue_name=QUEUE, max_retries=0)
def fail(key: str) -> None:
    """Write what it sees, then raise: the consumer span is ERROR, the worker carries on."""
    observe_into(key)
    raise RuntimeError(f"actor failed for {request_id.get('?')}")


@dramatiq.actor(actor_name="flaky", queue_name=QUEUE, max_retries=5, min_backoff=10, max_backoff=50)
def flaky(key: str) -> None:
    """Fail on the first two runs for ``key`` (counted in Redis), then write what it sees."""
    runs = client.incr(f"{key}:runs")
    if runs < 3:
        raise RuntimeError(f"run {runs} of {key} failed")
    observe_into(key)
