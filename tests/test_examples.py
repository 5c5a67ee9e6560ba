"""The examples, run for real: a server subprocess, a real HTTP client, SIGTERM at the end.

Each example app is started on a free loopback port with its spans and JSON log lines going to
files; the test drives it with httpx, abandons requests mid-way by closing the connection, stops
the server with SIGTERM and then reads what the app exported. Every wait polls with a deadline.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

from ._support import FILTERWARNINGS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DRAIN_TIMEOUT = 3.0
DEADLINE = 15.0

JsonObject = dict[str, Any]


@pytest.fixture
def anyio_backend() -> str:
    """The client side is plain httpx; one backend is enough to drive a server process."""
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(app: str, port: int) -> list[str]:
    """The command that serves ``examples/{app}_app.py``: aiohttp's own, gunicorn for Flask,
    else uvicorn."""
    if app == "aiohttp":
        return [sys.executable, str(EXAMPLES / "aiohttp_app.py"), "--port", str(port)]
    if app == "flask":  # WSGI on gunicorn's sync workers, a RunnerThread in each
        return [
            *(sys.executable, "-m", "gunicorn", "-c", str(EXAMPLES / "gunicorn_conf.py")),
            *("--chdir", str(EXAMPLES), "-b", f"127.0.0.1:{port}", "flask_app:app"),
        ]
    return [
        *(sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), f"{app}_app:app"),
        *("--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "1"),
    ]


@dataclass
class Server:
    app: str
    url: str
    process: subprocess.Popen[bytes]
    spans_path: Path
    logs_path: Path
    output_path: Path

    def spans(self) -> list[JsonObject]:
        return read_json_lines(self.spans_path)

    def logs(self) -> list[JsonObject]:
        return read_json_lines(self.logs_path)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")


def read_json_lines(path: Path) -> list[JsonObject]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    # A line being written right now may be incomplete: only complete lines count.
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_until_listening(process: subprocess.Popen[bytes], port: int, output: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{output.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    pytest.fail(f"the server did not listen on port {port} in {DEADLINE}s:\n{output.read_text()}")


@pytest.fixture(params=["fastapi", "aiohttp"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A running example app; killed at teardown whatever happened."""
    app = str(request.param)
    port = free_port()
    spans_path, logs_path = tmp_path / "spans.jsonl", tmp_path / "logs.jsonl"
    output_path = tmp_path / "output.txt"
    env = {
        **os.environ,
        "CTXKIT_EXAMPLE_SPANS": str(spans_path),
        "CTXKIT_EXAMPLE_LOGS": str(logs_path),
        "DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
    }
    with output_path.open("wb") as output:
        process = subprocess.Popen(
            command(app, port), cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_until_listening(process, port, output_path)
        yield Server(app, f"http://127.0.0.1:{port}", process, spans_path, logs_path, output_path)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=DEADLINE)


async def poll(server: Server, what: str, found: Callable[[], bool]) -> None:
    """Wait until ``found()`` is true; fail with the server's output after the deadline."""
    with anyio.move_on_after(DEADLINE):
        while not found():
            if server.process.poll() is not None:
                break
            await anyio.sleep(0.02)
        else:
            return
    pytest.fail(f"waited in vain for {what}:\n{server.output()}")


def traceparent(trace_id: str, span_id: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{span_id}-01"}


def logged(server: Server, message: str, trace_id: str) -> bool:
    return any(
        line["message"] == message and line["trace_id"] == trace_id for line in server.logs()
    )


def task_spans(server: Server, trace_id: str) -> dict[str, JsonObject]:
    """The finished ctxkit task spans of one trace, by name."""
    return {
        span["name"]: span
        for span in server.spans()
        if span["trace_id"] == trace_id and "ctxkit.task.name" in span["attributes"]
    }


async def abandon(server: Server, path: str, trace_id: str, started: str) -> None:
    """Send a request, wait until its handler has spawned its work, then hang up."""
    headers = traceparent(trace_id, "00f067aa0ba902b7")

    async def get() -> None:
        await client.get(path, headers=headers)

    async with httpx.AsyncClient(base_url=server.url) as client, anyio.create_task_group() as tg:
        tg.start_soon(get)
        await poll(server, started, lambda: logged(server, started, trace_id))
        tg.cancel_scope.cancel()
    # Leaving the client closed its connection: the server sees the client go away.


def cancelled(server: Server, key: str) -> Callable[[], bool]:
    return lambda: logged(server, "GET /report cancelled: the client went away", TRACE[key])


TRACE = {name: f"{index:x}" * 32 for index, name in enumerate("ABCDE", start=10)}
PARENT = "b7ad6b7169203331"


@pytest.mark.anyio
async def test_background_work_outlives_requests_and_is_drained_at_sigterm(
    server: Server,
) -> None:
    """Spawned work keeps the incoming trace, survives an abandoned request, fails loudly,
    and is drained (or cancelled and reported) when the server is stopped with SIGTERM."""
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as client:
        for key, address in (("A", "ada@example.com"), ("B", "bob@invalid")):
            response = await client.post(
                "/signup", params={"address": address}, headers=traceparent(TRACE[key], PARENT)
            )
            assert response.status_code == 200
            assert response.json() == {"task": "send_welcome_email", "trace_id": TRACE[key]}

    # C: the client hangs up while the handler waits; the report it spawned still finishes.
    await abandon(server, "/report?seconds=0.3", TRACE["C"], "report started (0.3s)")
    await poll(
        server,
        "the quick background work",
        lambda: (
            len(task_spans(server, TRACE["A"])) == 2
            and len(task_spans(server, TRACE["B"])) == 2
            and "build_report" in task_spans(server, TRACE["C"])
        ),
    )
    # D is still running at SIGTERM and drained; E outlives drain_timeout and is cancelled.
    await abandon(server, "/report?seconds=1.5", TRACE["D"], "report started (1.5s)")
    await abandon(server, "/report?seconds=60", TRACE["E"], "report started (60.0s)")
    if server.app == "aiohttp":  # aiohttp cancelled each abandoned handler; its work went on
        for key in "CDE":
            await poll(server, f"the cancellation of request {key}", cancelled(server, key))

    sigterm_ns = time.time_ns()
    server.process.send_signal(signal.SIGTERM)
    await anyio.to_thread.run_sync(functools.partial(server.process.wait, DEADLINE))
    assert server.process.returncode in (0, -signal.SIGTERM), server.output()

    spans, logs = server.spans(), server.logs()

    # Every background span carries the incoming trace id and hangs off the request's span.
    for key, trace_id in TRACE.items():
        (request_span,) = [s for s in spans if s["trace_id"] == trace_id and s["kind"] == "SERVER"]
        assert request_span["parent_id"] == (PARENT if key in "AB" else "00f067aa0ba902b7")
        tasks = task_spans(server, trace_id)
        expected = {"send_welcome_email", "audit"} if key in "AB" else {"build_report"}
        assert set(tasks) == expected, key
        for task in tasks.values():
            assert task["parent_id"] == request_span["span_id"], (key, task)
            assert task["kind"] == "INTERNAL"

    # Nothing was lost silently: each task's outcome is on its span ...
    outcomes = {
        (key, name): span["attributes"]["ctxkit.task.outcome"]
        for key, trace_id in TRACE.items()
        for name, span in task_spans(server, trace_id).items()
    }
    assert outcomes == {
        ("A", "send_welcome_email"): "ok",
        ("A", "audit"): "ok",
        ("B", "send_welcome_email"): "error",
        ("B", "audit"): "ok",
        ("C", "build_report"): "ok",
        ("D", "build_report"): "ok",
        ("E", "build_report"): "cancelled",
    }
    failed = task_spans(server, TRACE["B"])["send_welcome_email"]
    assert failed["status"] == "ERROR"
    assert failed["attributes"]["error.type"] == "ValueError"
    # ... the failure was logged with its trace id ...
    (error,) = [line for line in logs if line["level"] == "ERROR" and line["logger"] == "ctxkit"]
    assert error["trace_id"] == TRACE["B"]
    assert "ValueError: cannot deliver to bob@invalid" in error["message"]
    # ... the background log lines carry the trace id of the request that spawned them ...
    assert logged(server, "welcome email sent to ada@example.com", TRACE["A"])
    assert logged(server, "audit: signup bob@invalid", TRACE["B"])
    assert logged(server, "report finished (0.3s)", TRACE["C"])
    assert logged(server, "report finished (1.5s)", TRACE["D"])
    assert not any(line["message"] == "report finished (60.0s)" for line in logs)
    # ... D was still running at SIGTERM and the shutdown drained it.
    assert task_spans(server, TRACE["D"])["build_report"]["end_ns"] > sigterm_ns

    # The shutdown summary matches what happened.
    (summary,) = [line for line in logs if line["message"].startswith("ctxkit runner shut down")]
    assert summary["level"] == "WARNING"
    assert f"drain_timeout={DRAIN_TIMEOUT}s passed" in summary["message"]
    assert "cancelled 1 running and 0 pending tasks (build_report)" in summary["message"]
    counts = dict(re.findall(r"(\w+)=(\d+)", summary["message"].split(";")[-1]))
    assert counts == {
        "spawned": "7",
        "ok": "5",
        "error": "1",
        "timeout": "0",
        "cancelled": "1",
        "rejected": "0",
    }


def test_the_tutorial_app_and_its_test(pytester: pytest.Pytester) -> None:
    """docs/tutorial.md's app.py and test_app.py work as printed (own process: the app sets
    the global tracer provider)."""
    text = (ROOT / "docs" / "tutorial.md").read_text()
    files = dict(re.findall(r'```python title="([\w.]+)"\n(.*?)```', text, flags=re.DOTALL))
    assert set(files) == {"app.py", "test_app.py"}
    pytester.makepyfile(app=files["app.py"], test_app=files["test_app.py"])
    pytester.makeini(
        "[pytest]\npythonpath = .\nasyncio_default_fixture_loop_scope = function\n" + FILTERWARNINGS
    )
    args = ["-p", "no:cacheprovider"]
    if not any(
        entry_point.value == "_ctxkit_pytestplugin"
        for entry_point in importlib.metadata.entry_points(group="pytest11")
    ):
        args += ["-p", "_ctxkit_pytestplugin"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
