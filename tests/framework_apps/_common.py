"""What the framework test apps share: telemetry to files, the task functions, the options.

The environment sets each app up: ``CTXKIT_TEST_SPANS`` and ``CTXKIT_TEST_LOGS`` name the JSON
lines files for spans and log records, ``CTXKIT_TEST_MODE`` is ``detached`` (set up once),
``twice`` (set up twice) or ``plain`` (not set up, while another app of the same process is),
``CTXKIT_TEST_PROPAGATION`` the tasks' propagation, ``CTXKIT_TEST_TIMEOUT`` their timeout and
``DRAIN_TIMEOUT`` the runner's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import ctxkit

from .._spans import JsonlSpanExporter

if TYPE_CHECKING:
    from ctxkit._trace import Propagation

MODE = os.environ.get("CTXKIT_TEST_MODE", "detached")
PROPAGATION = cast("Propagation", os.environ.get("CTXKIT_TEST_PROPAGATION", "child"))
TIMEOUT = float(os.environ.get("CTXKIT_TEST_TIMEOUT", "3"))
DRAIN_TIMEOUT = float(os.environ.get("DRAIN_TIMEOUT", "5"))

#: A var the apps select (vars=...): it reaches the tasks.
SELECTED: ContextVar[str | None] = ContextVar("selected", default=None)
#: A var nobody selects, like a request's DB session: it must not reach a detached task.
SESSION: ContextVar[str | None] = ContextVar("session", default=None)

log = logging.getLogger("tests.frameworks")
tracer = trace.get_tracer("tests.frameworks")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "logger": record.name,
                "level": record.levelname,
                "message": record.getMessage(),
                "trace_id": getattr(record, "trace_id", ""),
            }
        )


def setup_telemetry() -> None:
    provider = TracerProvider()
    spans = os.environ.get("CTXKIT_TEST_SPANS")
    if spans:
        provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(Path(spans))))
    trace.set_tracer_provider(provider)
    logs = os.environ.get("CTXKIT_TEST_LOGS")
    handler: logging.Handler = (
        logging.FileHandler(logs, encoding="utf-8") if logs else logging.StreamHandler()
    )
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ctxkit.TraceIdFilter())
    for name in ("tests.frameworks", "ctxkit"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def on_error(failure: ctxkit.TaskFailure) -> None:
    log.info("on_error %s %s", failure.name, type(failure.exception).__name__)


class ServerSpan:
    """A SERVER span per HTTP request, continuing the W3C ``traceparent`` it carries."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
        }
        parent = propagate.extract(headers)
        name = f"{scope['method']} {scope['path']}"
        with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER):
            await self.app(scope, receive, send)


async def task_ok(label: str) -> None:
    await asyncio.sleep(0.05)
    log.info("done %s", label)


def task_ok_sync(label: str) -> None:
    time.sleep(0.05)
    log.info("done %s", label)


async def task_fail(label: str) -> None:
    await asyncio.sleep(0.01)
    raise ValueError(f"task {label} failed")


async def task_hang(label: str) -> None:
    log.info("hanging %s", label)
    await asyncio.sleep(3600)


def report_vars(label: str, *, suffix: str = "") -> None:
    log.info("vars %s%s selected=%s session=%s", label, suffix, SELECTED.get(), SESSION.get())


async def areport_vars(label: str, *, suffix: str = "") -> None:
    await asyncio.sleep(0)
    report_vars(label, suffix=suffix)


async def slow(label: str, seconds: float) -> None:
    log.info("slow started %s", label)
    await asyncio.sleep(seconds)
    log.info("slow done %s", label)


def enter_request(label: str) -> None:
    """What an endpoint does before it adds its tasks: sets a selected and an unselected var."""
    SELECTED.set(f"{label}-selected")
    SESSION.set(f"{label}-session")
