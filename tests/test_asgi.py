"""Tests for ctxkit.contrib.asgi: one fake trace id per request, shared with its tasks' logs."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace

import ctxkit
from ctxkit._trace import fake_trace_id_var
from ctxkit.contrib.asgi import TraceIdMiddleware
from ctxkit.contrib.structlog import add_trace_ids

from . import test_examples

if TYPE_CHECKING:
    from collections.abc import Iterator, MutableMapping

    from opentelemetry.sdk.trace import TracerProvider

    from ctxkit.contrib.asgi import ASGIApp, Receive, Scope, Send

    from ._support import MakeRunner
    from .test_examples import Server

#: The example apps' server fixture, reused here for examples/untraced_app.py under uvicorn.
server = test_examples.server

HEX32 = re.compile("[0-9a-f]{32}")
log = logging.getLogger("tests.asgi")


class Capture(logging.Handler):
    """Keep (message, trace_id, span_id) of each record, the ids as TraceIdFilter sets them."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ctxkit.TraceIdFilter())
        self.lines: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(
            (record.getMessage(), record.__dict__["trace_id"], record.__dict__["span_id"])
        )

    def ids(self, prefix: str) -> list[str]:
        return [trace_id for message, trace_id, _ in self.lines if message.startswith(prefix)]


@pytest.fixture
def capture() -> Iterator[Capture]:
    handler = Capture()
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def seen() -> dict[str, str | None]:
    """The ids each of ctxkit's three reporters gives in the calling context."""
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", None, None)
    ctxkit.TraceIdFilter().filter(record)
    event = add_trace_ids(None, "info", {"event": "m"})
    return {
        "current": ctxkit.current_trace_id(),
        "filter": record.__dict__["trace_id"],
        "structlog": str(event["trace_id"]),
    }


async def note(what: str) -> None:
    log.info("%s %s", what, ctxkit.current_trace_id())


def make_app(results: list[dict[str, object]]) -> FastAPI:
    """A FastAPI app whose handler logs, spawns a task with and one without a span, and says
    which ids it saw."""
    app = FastAPI()
    app.add_middleware(TraceIdMiddleware)

    @app.get("/signup")
    async def signup() -> dict[str, str | None]:
        log.info("request line")
        with_span = ctxkit.spawn(note, "task with span")
        without_span = ctxkit.spawn(note, "task without span", span=False)
        results.append({**seen(), "tasks": (with_span.trace_id, without_span.trace_id)})
        return {"trace_id": ctxkit.current_trace_id()}

    return app


async def get(app: ASGIApp, path: str = "/signup") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.get(path)


@pytest.mark.anyio
class TestRequestsWithoutASpan:
    async def test_request_and_its_tasks_share_one_fake_id(
        self, make_runner: MakeRunner, capture: Capture
    ) -> None:
        """Without tracing, the request's logs, current_trace_id, the structlog processor and
        every task it spawns (with or without a span) share one fake id, new per request."""
        results: list[dict[str, object]] = []
        app = make_app(results)
        async with make_runner(tracer_provider=trace.NoOpTracerProvider()) as runner:
            first = (await get(app)).json()["trace_id"]
            second = (await get(app)).json()["trace_id"]
            await runner.drain()
        assert HEX32.fullmatch(first)
        assert HEX32.fullmatch(second)
        assert first != second
        for fake, result in zip((first, second), results, strict=True):
            assert result == {
                "current": fake,
                "filter": fake,
                "structlog": fake,
                "tasks": (fake, fake),
            }
        assert capture.ids("request line") == [first, second]
        assert sorted(capture.ids("task with span")) == sorted([first, second])
        assert sorted(capture.ids("task without span")) == sorted([first, second])
        # each task's own current_trace_id() is its request's id
        for message, trace_id, _ in capture.lines:
            if message.startswith("task"):
                assert message.endswith(trace_id)
        # the id is reset when the request ends
        assert ctxkit.current_trace_id() is None
        assert fake_trace_id_var.get(None) is None

    async def test_a_task_span_of_a_configured_sdk_wins(
        self, make_runner: MakeRunner, capture: Capture, tracer_provider: TracerProvider
    ) -> None:
        """With an SDK, a task's own span starts a trace whose id its lines carry; a span-less
        task still logs the request's fake id."""
        results: list[dict[str, object]] = []
        async with make_runner(tracer_provider=tracer_provider) as runner:
            fake = (await get(make_app(results))).json()["trace_id"]
            await runner.drain()
        (result,) = results
        tasks = result["tasks"]
        assert isinstance(tasks, tuple)
        with_span, without_span = tasks
        assert without_span == fake
        assert with_span != fake
        assert capture.ids("task without span") == [fake]
        assert capture.ids("task with span") == [with_span]

    async def test_outer_fake_id_is_not_reused(self, make_runner: MakeRunner) -> None:
        """A server running in a context that has a fake id still gives each request its own,
        and leaves the outer one as it was."""
        outer = "ab" * 16
        token = fake_trace_id_var.set(outer)
        try:
            async with make_runner(tracer_provider=trace.NoOpTracerProvider()) as runner:
                inner = (await get(make_app([]))).json()["trace_id"]
                await runner.drain()
            assert ctxkit.current_trace_id() == outer
        finally:
            fake_trace_id_var.reset(token)
        assert HEX32.fullmatch(inner)
        assert inner != outer


def span_around(app: ASGIApp, tracer: trace.Tracer) -> ASGIApp:
    """A minimal OpenTelemetry server middleware: a SERVER span around ``app``."""

    async def traced(scope: Scope, receive: Receive, send: Send) -> None:
        with tracer.start_as_current_span("GET /signup", kind=trace.SpanKind.SERVER):
            await app(scope, receive, send)

    return traced


@pytest.mark.anyio
class TestRequestsWithASpan:
    async def test_a_valid_span_outside_means_no_fake_id(
        self, make_runner: MakeRunner, tracer_provider: TracerProvider
    ) -> None:
        """Under a server span the middleware sets nothing: the span's trace id is reported
        in the request and carried by its tasks."""
        results: list[dict[str, object]] = []
        fakes: list[str | None] = []
        inner = make_app(results)

        async def probe(scope: Scope, receive: Receive, send: Send) -> None:
            fakes.append(fake_trace_id_var.get(None))
            await inner(scope, receive, send)

        app = span_around(TraceIdMiddleware(probe), tracer_provider.get_tracer("t"))
        async with make_runner() as runner:
            trace_id = (await get(app)).json()["trace_id"]
            await runner.drain()
        assert fakes == [None]
        (result,) = results
        assert result == {
            "current": trace_id,
            "filter": trace_id,
            "structlog": trace_id,
            "tasks": (trace_id, trace_id),
        }

    async def test_a_span_started_inside_wins_over_the_fake_id(
        self, tracer_provider: TracerProvider
    ) -> None:
        """A server span opened inside the middleware is what the request reports."""
        ids: list[tuple[str | None, int]] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            span = trace.get_current_span()
            ids.append((ctxkit.current_trace_id(), span.get_span_context().trace_id))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        wrapped = TraceIdMiddleware(span_around(app, tracer_provider.get_tracer("t")))
        assert (await get(wrapped)).status_code == 204
        ((reported, span_trace_id),) = ids
        assert reported == f"{span_trace_id:032x}"


async def call(app: ASGIApp, scope: Scope) -> None:
    async def receive() -> MutableMapping[str, object]:
        return {"type": "websocket.disconnect" if scope["type"] == "websocket" else "noop"}

    async def send(message: MutableMapping[str, object]) -> None:
        pass

    await app(scope, receive, send)


@pytest.mark.anyio
class TestScopes:
    async def test_websocket_connections_get_a_fake_id(self) -> None:
        """A WebSocket connection is a request too: it runs with a fake id, reset after."""
        seen_ids: list[str | None] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen_ids.append(ctxkit.current_trace_id())

        await call(TraceIdMiddleware(app), {"type": "websocket", "path": "/ws"})
        (fake,) = seen_ids
        assert fake is not None
        assert HEX32.fullmatch(fake)
        assert ctxkit.current_trace_id() is None

    async def test_lifespan_passes_through(self) -> None:
        """The lifespan scope (and any scope but http and websocket) gets no fake id."""
        seen_ids: list[str | None] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen_ids.append(fake_trace_id_var.get(None))

        await call(TraceIdMiddleware(app), {"type": "lifespan"})
        assert seen_ids == [None]

    async def test_the_id_is_reset_when_the_app_raises(self) -> None:
        """An exception from the app propagates and the fake id is reset all the same."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            assert ctxkit.current_trace_id() is not None
            raise LookupError("boom")

        with pytest.raises(LookupError, match="boom"):
            await call(TraceIdMiddleware(app), {"type": "http", "path": "/"})
        assert fake_trace_id_var.get(None) is None


def test_a_non_callable_app_is_refused() -> None:
    """Wrapping something that is not an ASGI callable raises TypeError naming it."""
    with pytest.raises(TypeError, match="needs an ASGI application, got 'app'"):
        TraceIdMiddleware("app")  # type: ignore[arg-type]


@pytest.mark.parametrize("server", ["untraced"], indirect=True)
def test_under_uvicorn_a_request_and_its_tasks_log_one_fake_id(server: Server) -> None:
    """examples/untraced_app.py under a real uvicorn, no SDK: each request's own log line and
    its two tasks' lines carry the fake id the response reports; two requests, two ids."""
    responses = []
    with httpx.Client(base_url=server.url, timeout=test_examples.DEADLINE) as client:
        for address in ("ada@example.com", "bob@example.com"):
            response = client.post("/signup", params={"address": address})
            assert response.status_code == 200, server.output()
            responses.append((address, response.json()))

    def lines(trace_id: str) -> set[str]:
        return {line["message"] for line in server.logs() if line["trace_id"] == trace_id}

    deadline = time.monotonic() + test_examples.DEADLINE
    for address, body in responses:
        assert HEX32.fullmatch(body["trace_id"])
        assert body["task_trace_id"] == body["trace_id"]
        expected = {
            f"signup of {address} accepted",
            f"welcome email sent to {address}",
            f"audit: signup {address}",
        }
        while lines(body["trace_id"]) != expected:  # the server process writes the log file
            assert time.monotonic() < deadline, (expected, server.logs(), server.output())
            time.sleep(0.02)
    assert responses[0][1]["trace_id"] != responses[1][1]["trace_id"]
