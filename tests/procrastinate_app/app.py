"""A procrastinate app for a real worker process.

Run as ``python -m procrastinate --app=tests.procrastinate_app.app.app worker``.

Configured by environment variables, so one module serves several workers:

- ``CTXKIT_TEST_PG_DSN``: the PostgreSQL the connector uses;
- ``CTXKIT_TEST_PROPAGATION``: ``child``, ``link`` or ``none``;
- ``CTXKIT_TEST_RETRIES``: ``link`` or ``child``;
- ``CTXKIT_TEST_OUT``: a directory; finished spans are appended to ``spans.jsonl`` there and
  what each task observed (procrastinate keeps no results) to ``observed.jsonl``.

The worker allows ``request_id`` and ``tenant`` only: a ``secret`` var sent by the producer must
never be restored here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

import procrastinate
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import ctxkit
from ctxkit.contrib.procrastinate import instrument
from ctxkit.contrib.structlog import add_trace_ids
from tests._spans import JsonlSpanExporter

request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[object] = ContextVar("tenant")
secret: ContextVar[str] = ContextVar("secret")

DSN = os.environ.get("CTXKIT_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
OUT_DIR = os.environ.get("CTXKIT_TEST_OUT")


def _propagation() -> Literal["child", "link", "none"]:
    value = os.environ.get("CTXKIT_TEST_PROPAGATION", "child")
    if value == "link":
        return "link"
    if value == "none":
        return "none"
    return "child"


def _retries() -> Literal["link", "child"]:
    return "child" if os.environ.get("CTXKIT_TEST_RETRIES") == "child" else "link"


provider = TracerProvider()
if OUT_DIR is not None:
    provider.add_span_processor(
        SimpleSpanProcessor(JsonlSpanExporter(Path(OUT_DIR) / "spans.jsonl"))
    )
    # Log records of the task, with the trace id ctxkit's filter gives them.
    handler = logging.FileHandler(Path(OUT_DIR) / "tasks.log")
    handler.addFilter(ctxkit.TraceIdFilter())
    handler.setFormatter(logging.Formatter("%(trace_id)s %(message)s"))
    task_logger = logging.getLogger("ctxkit_test_tasks")
    task_logger.addHandler(handler)
    task_logger.setLevel(logging.INFO)
    task_logger.propagate = False

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=DSN))
instrument(
    app,
    vars=(request_id, tenant),
    propagation=_propagation(),
    retries=_retries(),
    tracer_provider=provider,
)

_lock = threading.Lock()


def _observe(key: str, kwargs: list[str]) -> None:
    span = trace.get_current_span()
    context = span.get_span_context()
    trace_id = ctxkit.current_trace_id()
    logging.getLogger("ctxkit_test_tasks").info("observed %s", key)
    line = {
        "key": key,
        "trace_id": trace_id,
        "span_id": f"{context.span_id:016x}" if context.is_valid else None,
        "request_id": request_id.get(None),
        "tenant": tenant.get(None),
        "secret": secret.get(None),
        "kwargs": kwargs,
        "thread": threading.current_thread().name,
        "structlog": add_trace_ids(None, "info", {}),
    }
    if OUT_DIR is not None:
        with _lock, (Path(OUT_DIR) / "observed.jsonl").open("a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")


@app.task(name="observe", pass_context=True)
async def observe(context: procrastinate.JobContext, key: str) -> None:
    """Record what an async task sees (and the kwargs the job still has)."""
    assert context.job is not None
    _observe(key, sorted(context.job.task_kwargs))


@app.task(name="observe_sync", pass_context=True)
def observe_sync(context: procrastinate.JobContext, key: str) -> None:
    """Record what a sync task (run in a thread) sees."""
    assert context.job is not None
    _observe(key, sorted(context.job.task_kwargs))


@app.task(name="set_and_observe", pass_context=True)
async def set_and_observe(context: procrastinate.JobContext, key: str) -> None:
    """Set the vars to other values, then record: the next job must not see them."""
    request_id.set("leaked")
    tenant.set("leaked")
    assert context.job is not None
    _observe(key, sorted(context.job.task_kwargs))


@app.task(name="fail")
async def fail(key: str) -> None:
    """Raise, so that the consumer span is marked ERROR; the worker must carry on."""
    _observe(key, [])
    raise RuntimeError(f"task failed for {request_id.get('?')}")


@app.task(name="flaky", pass_context=True, retry=procrastinate.RetryStrategy(max_attempts=3))
async def flaky(context: procrastinate.JobContext, key: str) -> None:
    """Fail on the first two attempts, then record what the third sees."""
    assert context.job is not None
    _observe(key, sorted(context.job.task_kwargs))
    if context.job.attempts < 2:
        raise RuntimeError(f"attempt {context.job.attempts + 1} of {key} failed")
