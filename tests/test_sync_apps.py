"""Sync apps for real: FastAPI ``def`` endpoints on uvicorn, Flask on gunicorn's sync workers.

The servers are started by the examples' fixture on free loopback ports (a subprocess, spans
and JSON logs to files) and stopped with SIGTERM; the tests read what the background tasks
logged and exported, so every check is made from the task's side.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

from . import test_examples
from .test_examples import DEADLINE, logged, poll, traceparent

if TYPE_CHECKING:
    from .test_examples import Server

server = test_examples.server
TRACE = "ab" * 16
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("server", ["sync"], indirect=True)
async def test_def_endpoints_spawn_with_the_requests_trace_and_vars(server: Server) -> None:
    """A def endpoint's coroutine and thread tasks see its trace and selected var only; work
    of an abandoned request completes; SIGTERM drains."""
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as client:
        response = await client.post(
            "/order/42", headers={"x-request-id": "r-42", **traceparent(TRACE, PARENT)}
        )
        assert response.status_code == 200, server.output()
        assert response.json()["trace_id"] == TRACE
    expected = "request_id=r-42 session=unset"
    for kind in ("coroutine", "thread"):
        message = f"{kind} task for order 42: {expected}"
        await poll(server, message, lambda m=message: logged(server, m, TRACE))  # type: ignore[misc]

    def trace_spans() -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in server.spans() if s["trace_id"] == TRACE}

    # A task's span ends after its last log line: wait for both task spans to be exported.
    await poll(server, "the task spans", lambda: {"notify", "write_invoice"} <= set(trace_spans()))
    spans = trace_spans()
    assert spans["notify"]["parent_id"] == spans["POST /order/42"]["span_id"]
    assert spans["write_invoice"]["attributes"]["ctxkit.task.outcome"] == "ok"

    # The client gives up on a def endpoint after it spawned: its work still completes.
    export_trace = "cd" * 16

    async def get() -> None:
        await client.get(
            "/export", params={"seconds": 0.3}, headers=traceparent(export_trace, PARENT)
        )

    async with httpx.AsyncClient(base_url=server.url) as client, anyio.create_task_group() as tg:
        tg.start_soon(get)
        await poll(
            server, "export started", lambda: logged(server, "export started (0.3s)", export_trace)
        )
        tg.cancel_scope.cancel()
    await poll(
        server, "export finished", lambda: logged(server, "export finished (0.3s)", export_trace)
    )
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=DEADLINE)
    summaries = [
        line for line in server.logs() if line["message"].startswith("ctxkit runner shut down")
    ]
    assert len(summaries) == 1, server.output()
    assert "spawned=3 ok=3" in summaries[0]["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("server", ["flask"], indirect=True)
async def test_flask_on_gunicorn_drains_each_worker_at_sigterm(server: Server) -> None:
    """Requests spawn work that completes after the response; SIGTERM drains every worker,
    each logging its summary line."""
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as client:
        for index in range(6):
            response = await client.post(
                "/signup",
                params={"address": f"u{index}@example.com", "seconds": 0.4},
                headers={"x-request-id": f"r-{index}"},
            )
            assert response.status_code == 200, server.output()
    # The responses came back at once; the e-mails are still being sent: stop the server now.
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=DEADLINE)
    sent = {line["message"] for line in server.logs() if line["message"].startswith("welcome")}
    assert sent == {f"welcome email sent to u{i}@example.com for r-{i}" for i in range(6)}
    summaries = [
        line for line in server.logs() if line["message"].startswith("ctxkit runner shut down")
    ]
    pids = {line.get("process") for line in summaries}
    assert len(summaries) == 2, server.output()  # one per worker (WORKERS=2)
    assert all("every task finished" in line["message"] for line in summaries)
    assert len(pids) in (1, 2)
