"""A Celery app for a real worker: ``celery -A tests.celery_app.app worker --pool=prefork``.

Configured by environment variables:

- ``CTXKIT_TEST_REDIS_URL``: the Redis the broker and the result backend use;
- ``CTXKIT_TEST_QUEUE``: the queue this worker consumes;
- ``CTXKIT_TEST_PROPAGATION``: ``child`` or ``link``;
- ``CTXKIT_TEST_OUT``: a directory; finished spans are appended to ``spans.jsonl`` there and
  Celery's ``task_failure`` signal to ``failures.jsonl``.

The app is instrumented by ctxkit and by ``opentelemetry-instrumentation-celery`` alongside.
The tasks return what they observed, so the test reads the worker's view from the result
backend. The worker allows ``request_id`` and ``tenant`` only, never ``secret``.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import redis
from celery import Celery
from celery.signals import task_failure
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import ctxkit
from ctxkit.contrib.celery import instrument
from tests._spans import JsonlSpanExporter

request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[object] = ContextVar("tenant")
secret: ContextVar[str] = ContextVar("secret")

REDIS_URL = os.environ.get("CTXKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("CTXKIT_TEST_QUEUE", "ctxkit-test")
OUT_DIR = os.environ.get("CTXKIT_TEST_OUT")
PROPAGATION: Literal["child", "link"] = (
    "link" if os.environ.get("CTXKIT_TEST_PROPAGATION") == "link" else "child"
)

provider = TracerProvider()
if OUT_DIR is not None:
    provider.add_span_processor(
        SimpleSpanProcessor(JsonlSpanExporter(Path(OUT_DIR) / "spans.jsonl"))
    )

app = Celery("ctxkit_test", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def _observe() -> dict[str, object]:
    span = trace.get_current_span()
    context = span.get_span_context()
    return {
        "trace_id": ctxkit.current_trace_id(),
        "span_id": f"{context.span_id:016x}" if context.is_valid else None,
        "request_id": request_id.get(None),
        "tenant": tenant.get(None),
        "secret": secret.get(None),
        "pid": os.getpid(),
    }


def _runs(key: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.incr(key))
    finally:
        client.close()


@app.task(name="observe")
def observe() -> dict[str, object]:
    """Return what the task sees."""
    return _observe()


@app.task(name="fail")
def fail() -> None:
    """Raise: the process span is ERROR, and Celery's failure handling runs as usual."""
    raise RuntimeError(f"task failed for {request_id.get('?')}")


class Unprintable(Exception):
    """An exception whose ``__str__`` raises: its args are the pid of the process that raised."""

    def __str__(self) -> str:
        raise RuntimeError("this exception has no text")


@app.task(name="fail_unprintable")
def fail_unprintable() -> None:
    """Raise an exception that cannot be turned into text."""
    raise Unprintable(os.getpid())


@app.task(name="flaky", bind=True, max_retries=5)
def flaky(self: Any, key: str) -> dict[str, object]:
    """Fail the first two runs for ``key`` with self.retry(), then return what it sees."""
    runs = _runs(key)
    if runs < 3:
        raise self.retry(countdown=0, exc=RuntimeError(f"run {runs} failed"))
    return _observe()


@app.task(
    name="flaky_auto", autoretry_for=(LookupError,), retry_kwargs={"countdown": 0, "max_retries": 5}
)
def flaky_auto(key: str) -> dict[str, object]:
    """Fail the first two runs for ``key``, retried by autoretry_for, then return what it sees."""
    runs = _runs(key)
    if runs < 3:
        raise LookupError(f"run {runs} failed")
    return _observe()


@app.task(name="step")
def step(previous: list[dict[str, object]] | None = None) -> list[dict[str, object]]:
    """One link of a chain: return what the links so far saw, and what this one sees."""
    return [*(previous or []), _observe()]


@task_failure.connect
def _record_failure(
    sender: Any = None, task_id: str | None = None, exception: Any = None, **kwargs: Any
) -> None:
    if OUT_DIR is not None:
        line = json.dumps({"task_id": task_id, "exception": type(exception).__name__})
        with (Path(OUT_DIR) / "failures.jsonl").open("a", encoding="utf-8") as file:
            file.write(line + "\n")


CeleryInstrumentor().instrument(tracer_provider=provider)
instrument(app, vars=(request_id, tenant), propagation=PROPAGATION, tracer_provider=provider)
