"""The frameworks' background tasks, detached: FastAPI, Starlette and Litestar apps on uvicorn.

Each test serves one of tests/framework_apps on a real uvicorn process (a free loopback port,
stopped at the end), drives it with httpx, and reads what the app exported: its spans and its
log lines as JSON lines. Every wait polls with a generous deadline; nothing asserts a duration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import litestar
import pytest
from fastapi import FastAPI
from litestar import Litestar
from litestar import Response as LitestarResponse
from litestar.background_tasks import BackgroundTask as LitestarTask
from litestar.background_tasks import BackgroundTasks as LitestarTasks
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import ctxkit
import ctxkit.contrib.litestar as litestar_module
import ctxkit.contrib.starlette as starlette_module
from ctxkit.contrib.litestar import CtxkitPlugin
from ctxkit.contrib.starlette import detach_background_tasks

from ._servers import free_port, stop

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from starlette.requests import Request

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 30.0
FRAMEWORKS = ["fastapi", "starlette", "litestar"]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}

JsonObject = dict[str, Any]


@pytest.fixture
def anyio_backend() -> str:
    """The frameworks run on asyncio under uvicorn; the client side needs one backend only."""
    return "asyncio"


@dataclass
class Server:
    framework: str
    url: str
    process: subprocess.Popen[bytes]
    spans_path: Path
    logs_path: Path
    output_path: Path

    def spans(self) -> list[JsonObject]:
        return read_json_lines(self.spans_path)

    def logs(self) -> list[JsonObject]:
        return read_json_lines(self.logs_path)

    def messages(self) -> list[str]:
        return [str(line["message"]) for line in self.logs()]

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def logged(self, message: str) -> bool:
        return message in self.messages()

    def line(self, message: str) -> JsonObject:
        for line in self.logs():
            if line["message"] == message:
                return line
        raise AssertionError(f"{message!r} was not logged:\n{self.messages()}")


def read_json_lines(path: Path) -> list[JsonObject]:
    if not path.exists():
        return []
    # A line being written right now may be incomplete: only complete lines count.
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@contextlib.contextmanager
def serve(framework: str, tmp_path: Path, mode: str = "detached", **env: str) -> Iterator[Server]:
    """Serve ``tests/framework_apps/{framework}_app.py`` on uvicorn; stop it at the end."""
    port = free_port()
    directory = tmp_path / f"{framework}-{mode}-{port}"
    directory.mkdir()
    spans, logs, output = directory / "spans.jsonl", directory / "logs.jsonl", directory / "out"
    environment = {
        **os.environ,
        "CTXKIT_TEST_SPANS": str(spans),
        "CTXKIT_TEST_LOGS": str(logs),
        "CTXKIT_TEST_MODE": mode,
        **env,
    }
    command = [
        *(sys.executable, "-m", "uvicorn", f"tests.framework_apps.{framework}_app:app"),
        *("--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "5"),
    ]
    with output.open("wb") as file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        server = Server(framework, f"http://127.0.0.1:{port}", process, spans, logs, output)
        wait_until_listening(server, port)
        yield server
    finally:
        stop(process)


def wait_until_listening(server: Server, port: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"uvicorn exited with {server.process.returncode}:\n{server.output()}")
        try:
            with httpx.Client() as client:
                client.get(f"http://127.0.0.1:{port}/missing", timeout=2)
        except httpx.TransportError:
            time.sleep(0.05)  # polling another process's socket, not synchronising tasks
        else:
            return
    pytest.fail(f"uvicorn did not answer on port {port} in {DEADLINE}s:\n{server.output()}")


async def poll(server: Server, what: str, found: Callable[[], bool]) -> None:
    """Wait until ``found()``; fail with the server's output and logs after the deadline."""
    with anyio.move_on_after(DEADLINE):
        while not found():  # noqa: ASYNC110 - polling another process's files
            await anyio.sleep(0.02)
        return
    pytest.fail(f"waited in vain for {what}:\n{server.messages()}\n{server.output()}")


async def get(
    client: httpx.AsyncClient, path: str, label: str, headers: dict[str, str] | None = None
) -> tuple[JsonObject, int]:
    """GET ``path``; return the JSON body and the client port of the connection that carried
    it, read as soon as the headers arrived (the server may close the connection later)."""
    async with client.stream("GET", path, params={"label": label}, headers=headers) as response:
        address = response.extensions["network_stream"].get_extra_info("client_addr")
        await response.aread()
    assert response.status_code == 200, response.text
    return response.json(), int(address[1])


def one_connection(server: Server) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(base_url=server.url, limits=limits, timeout=DEADLINE)


def task_spans(server: Server, name: str) -> list[JsonObject]:
    return [
        span
        for span in server.spans()
        if "ctxkit.task.name" in span["attributes"]
        and str(span["attributes"]["ctxkit.task.name"]).endswith(name)
    ]


def request_span(server: Server, path: str) -> JsonObject:
    spans = [span for span in server.spans() if span["name"] == f"GET {path}"]
    assert len(spans) == 1, spans
    return spans[0]


@pytest.mark.anyio
@pytest.mark.parametrize("framework", FRAMEWORKS)
class TestEachTaskOnItsOwn:
    async def test_a_failing_task_beside_succeeding_ones_and_the_keep_alive_connection(
        self, framework: str, tmp_path: Path
    ) -> None:
        """A failing task does not stop the tasks after it, the request returns at once, the
        failure is reported (log line with the trace id, span, on_error), a hanging task times
        out on its own, and the same keep-alive connection serves the next request."""
        with serve(framework, tmp_path) as server:
            async with one_connection(server) as client:
                body, first = await get(client, "/mixed", "r1", TRACEPARENT)
                assert body == {"ok": "r1"}
                await poll(
                    server,
                    "both succeeding tasks and the failure",
                    lambda: (
                        server.logged("done r1-a")
                        and server.logged("done r1-c")
                        and server.logged("on_error task_fail ValueError")
                    ),
                )
                body, second = await get(client, "/mixed", "r2")
                assert body == {"ok": "r2"}
                assert second == first
                await poll(server, "the second request's tasks", lambda: server.logged("done r2-c"))
                await poll(
                    server,
                    "the hanging task's timeout",
                    lambda: any(
                        "'task_hang' timed out" in message and TRACE_ID in message
                        for message in server.messages()
                    ),
                )
            failed = [
                message
                for message in server.messages()
                if message.startswith("background task 'task_fail' failed: ValueError")
            ]
            assert len(failed) == 2, server.messages()
            assert f"[trace_id={TRACE_ID}]" in failed[0]
            assert server.line("done r1-a")["trace_id"] == TRACE_ID
            assert server.line("done r1-c")["trace_id"] == TRACE_ID  # a plain function too
            error_spans = [s for s in task_spans(server, "task_fail") if s["trace_id"] == TRACE_ID]
            assert [span["status"] for span in error_spans] == ["ERROR"]
            assert "Exception in ASGI application" not in server.output()

    async def test_setting_an_app_up_twice_detaches_each_task_once(
        self, framework: str, tmp_path: Path
    ) -> None:
        """A second set-up changes nothing: each task runs once, as a detached task."""
        with serve(framework, tmp_path, mode="twice") as server:
            async with one_connection(server) as client:
                _, first = await get(client, "/mixed", "t1")
                await poll(
                    server,
                    "the tasks after the failing one",
                    lambda: server.logged("done t1-c") and server.logged("hanging t1-d"),
                )
                _, second = await get(client, "/mixed", "t2")
                assert second == first
                await poll(server, "the second request's tasks", lambda: server.logged("done t2-c"))
            messages = server.messages()
            assert messages.count("done t1-a") == messages.count("done t1-c") == 1
            assert messages.count("hanging t1-d") == 1
            await poll(server, "the tasks' spans", lambda: len(task_spans(server, "task_ok")) >= 2)


@pytest.mark.anyio
@pytest.mark.parametrize("framework", FRAMEWORKS)
class TestContextAtAddTask:
    @pytest.mark.parametrize("path", ["/sync", "/async"])
    async def test_the_selected_vars_and_the_trace_arrive_and_nothing_else(
        self, framework: str, path: str, tmp_path: Path
    ) -> None:
        """Tasks of a ``def`` or ``async def`` endpoint, plain or async functions, see the
        selected var as it was at add_task, not the unselected one, and the request's trace:
        each task's span is a child of the request's span."""
        with serve(framework, tmp_path) as server:
            async with one_connection(server) as client:
                response = await client.get(path, params={"label": "v"}, headers=TRACEPARENT)
                assert response.json() == {"ok": "v"}
            await poll(
                server,
                "both tasks' report",
                lambda: sum(message.startswith("vars v") for message in server.messages()) == 2,
            )
            for suffix in ("-sync", "-async"):
                line = server.line(f"vars v{suffix} selected=v-selected session=None")
                assert line["trace_id"] == TRACE_ID
            parent = request_span(server, path)
            await poll(server, "the tasks' spans", lambda: len(task_spans(server, "vars")) == 2)
            for span in task_spans(server, "vars"):
                assert span["trace_id"] == TRACE_ID
                assert span["parent_span_id"] == parent["span_id"]

    async def test_a_background_task_given_to_a_response_with_a_new_linked_trace(
        self, framework: str, tmp_path: Path
    ) -> None:
        """A ``BackgroundTask`` passed to a response is detached too; with propagation="link"
        its span starts a new trace with a link to the request's span."""
        with serve(framework, tmp_path, CTXKIT_TEST_PROPAGATION="link") as server:
            async with one_connection(server) as client:
                await client.get("/response", params={"label": "l"}, headers=TRACEPARENT)
            await poll(server, "the task's span", lambda: len(task_spans(server, "vars")) == 1)
            parent = request_span(server, "/response")
            (span,) = task_spans(server, "areport_vars")
            assert span["trace_id"] != TRACE_ID
            assert span["links"] == [{"trace_id": TRACE_ID, "span_id": parent["span_id"]}]
            line = server.line("vars l selected=l-selected session=None")
            assert line["trace_id"] == span["trace_id"]


@pytest.mark.anyio
@pytest.mark.parametrize("framework", FRAMEWORKS)
class TestHangUpAndShutdown:
    async def test_a_client_that_hangs_up_after_the_headers_does_not_cancel_the_task(
        self, framework: str, tmp_path: Path
    ) -> None:
        """The client closes its connection once it has the response's headers; the task
        goes on to the end."""
        with serve(framework, tmp_path) as server:
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as client,
                client.stream("GET", "/slow", params={"label": "h", "seconds": "1"}) as response,
            ):
                assert response.status_code == 200
            await poll(server, "the task's end", lambda: server.logged("slow done h"))
            # The task's span ends after its last log line: wait for it to be exported.
            await poll(server, "the task's span", lambda: len(task_spans(server, "slow")) == 1)
            (span,) = task_spans(server, "slow")
            assert span["status"] == "UNSET"

    async def test_sigterm_drains_the_running_tasks(self, framework: str, tmp_path: Path) -> None:
        """SIGTERM while tasks run: the server stops taking requests, the runner of the app's
        lifespan lets the tasks finish, then logs its summary line and the process exits."""
        with serve(framework, tmp_path, DRAIN_TIMEOUT="20") as server:
            async with one_connection(server) as client:
                for label in ("s1", "s2", "s3"):
                    await client.get("/slow", params={"label": label, "seconds": "1.5"})
            await poll(
                server,
                "the tasks' start",
                lambda: all(server.logged(f"slow started s{n}") for n in (1, 2, 3)),
            )
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=DEADLINE)
            # uvicorn exits 0, or (newer versions) re-raises the signal once it has shut down
            assert server.process.returncode in (0, -signal.SIGTERM), server.output()
            messages = server.messages()
            assert all(f"slow done s{n}" in messages for n in (1, 2, 3)), messages
            summary = [m for m in messages if m.startswith("ctxkit runner shut down")]
            assert summary == [m for m in summary if "every task finished" in m], messages
            assert len(summary) == 1, messages
            assert messages.index(summary[0]) > messages.index("slow done s3")

    async def test_sigterm_cancels_what_outlives_the_drain_timeout(
        self, framework: str, tmp_path: Path
    ) -> None:
        """A task longer than the runner's drain_timeout is cancelled at its end, and the
        summary line says so; a short one beside it finishes."""
        env = {"DRAIN_TIMEOUT": "2", "CTXKIT_TEST_TIMEOUT": "600"}
        with serve(framework, tmp_path, **env) as server:
            async with one_connection(server) as client:
                await client.get("/slow", params={"label": "short", "seconds": "0.5"})
                await client.get("/slow", params={"label": "long", "seconds": "600"})
            await poll(
                server,
                "the tasks' start",
                lambda: server.logged("slow started short") and server.logged("slow started long"),
            )
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=DEADLINE)
            messages = server.messages()
            assert "slow done short" in messages
            assert "slow done long" not in messages
            summary = [m for m in messages if m.startswith("ctxkit runner shut down")]
            assert len(summary) == 1, messages
            assert "cancelled 1 running and 0 pending tasks" in summary[0]


@pytest.mark.anyio
@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
async def test_an_app_whose_lifespan_opens_no_runner_drains_at_sigterm(
    framework: str, tmp_path: Path
) -> None:
    """``detach_background_tasks`` alone: the app's lifespan opens no runner, so the switch
    opens one for the app's lifetime; SIGTERM drains its tasks (the stock app's server would
    have waited for them) and its summary line follows them."""
    with serve(framework, tmp_path, mode="no-runner") as server:
        async with one_connection(server) as client:
            for label in ("n1", "n2"):
                await client.get("/slow", params={"label": label, "seconds": "1.5"})
        await poll(
            server,
            "the tasks' start",
            lambda: all(server.logged(f"slow started n{n}") for n in (1, 2)),
        )
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=DEADLINE)
        messages = server.messages()
        assert all(f"slow done n{n}" in messages for n in (1, 2)), messages
        summary = [m for m in messages if m.startswith("ctxkit runner shut down")]
        assert len(summary) == 1, messages
        assert "every task finished" in summary[0], messages
        assert messages.index(summary[0]) > messages.index("slow done n2")


@pytest.mark.anyio
@pytest.mark.parametrize("framework", FRAMEWORKS)
class TestAppsNotSetUp:
    async def test_an_app_not_set_up_keeps_the_framework_behaviour(
        self, framework: str, tmp_path: Path
    ) -> None:
        """In a process where another app is set up, an app that is not runs its tasks the
        framework's way: inline and in order, so a failure stops the tasks after it and
        reaches the server, and the tasks see the request's context as it is at the end (all
        of an ``async def`` endpoint's vars; none of a ``def`` endpoint's)."""
        with serve(framework, tmp_path, mode="plain") as server:
            async with one_connection(server) as client:
                _, first = await get(client, "/mixed", "p")
                await poll(
                    server,
                    "the server's report of the failure",
                    lambda: "task p-b failed" in server.output(),
                )
                try:
                    _, second = await get(client, "/async", "q")
                except httpx.RemoteProtocolError:  # sent as the server was closing it
                    _, second = await get(client, "/async", "q")
                # the server closed the connection on the failure: a new one carries this
                assert second != first
                await client.get("/sync", params={"label": "w"})
            await poll(
                server,
                "the endpoints' tasks",
                lambda: (
                    sum(message.startswith(("vars q", "vars w")) for message in server.messages())
                    == 4
                ),
            )
            messages = server.messages()
            assert "done p-a" in messages
            assert "done p-c" not in messages  # stopped by the failure before it
            assert not any("background task" in message for message in messages)
            for suffix in ("-sync", "-async"):
                # the request's own context when the response ends: every var, last values
                assert f"vars q{suffix} selected=changed after add_task session=q-session" in (
                    messages
                )
                # a def endpoint's vars were set in its worker thread's copy: lost
                assert f"vars w{suffix} selected=None session=None" in messages
            assert task_spans(server, "") == []


class TestSetUp:
    def test_options_are_checked_at_set_up(self) -> None:
        """Bad options fail at set-up with ctxkit.spawn's messages, before anything is added."""

        app = FastAPI()
        with pytest.raises(ValueError, match="propagation"):
            detach_background_tasks(app, propagation="sideways")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="timeout must be a number"):
            detach_background_tasks(app, timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must be a positive"):
            detach_background_tasks(app, timeout=0)
        with pytest.raises(TypeError, match="ContextVar"):
            detach_background_tasks(app, vars=["not a var"])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="vars must be a tuple or list"):
            detach_background_tasks(app, vars={1})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="needs span=True"):
            detach_background_tasks(app, span=False, propagation="link")
        assert app.user_middleware == []
        with pytest.raises(TypeError, match="Starlette or FastAPI application"):
            detach_background_tasks(object())
        with pytest.raises(ValueError, match="drain_timeout"):
            CtxkitPlugin(drain_timeout=-1)
        with pytest.raises(TypeError, match="on_error"):
            CtxkitPlugin(on_error=lambda_async)
        with pytest.raises(ValueError, match="timeout must be a positive"):
            CtxkitPlugin(timeout=-1)

    def test_setting_up_twice_adds_one_middleware_and_keeps_the_last_options(self) -> None:
        """The second call replaces the options; the app keeps one switch."""

        app = Starlette()
        detach_background_tasks(app, timeout=1)
        detach_background_tasks(app, timeout=2)
        assert len(app.user_middleware) == 1
        holder = app._ctxkit_detach  # type: ignore[attr-defined]
        assert holder.config.timeout == 2.0

    def test_an_unknown_starlette_shape_fails_at_set_up(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A BackgroundTask that does not keep func, args and kwargs is refused at set-up."""

        class BackgroundTask:
            def __init__(self, func: object, *args: object, **kwargs: object) -> None:
                self.call = (func, args, kwargs)

            async def __call__(self) -> None: ...

        class BackgroundTasks(BackgroundTask):
            def __init__(self) -> None:
                self.tasks: list[BackgroundTask] = []

        fake = type(sys)("starlette.background")
        fake.BackgroundTask = BackgroundTask  # type: ignore[attr-defined]
        fake.BackgroundTasks = BackgroundTasks  # type: ignore[attr-defined]
        monkeypatch.setattr(starlette_module, "background", fake)
        app = Starlette()
        with pytest.raises(RuntimeError, match="does not have the shape ctxkit knows"):
            starlette_module.detach_background_tasks(app)
        assert app.user_middleware == []

    def test_an_unknown_litestar_shape_fails_at_set_up(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A BackgroundTask whose ``fn`` cannot be set is refused when the plugin is made."""

        class BackgroundTask:
            __slots__ = ("args", "kwargs")

            def __init__(self, fn: object, *args: object, **kwargs: object) -> None:
                self.args, self.kwargs = args, kwargs

            async def __call__(self) -> None: ...

        class BackgroundTasks:
            async def __call__(self) -> None: ...

        fake = type(sys)("litestar.background_tasks")
        fake.BackgroundTask = BackgroundTask  # type: ignore[attr-defined]
        fake.BackgroundTasks = BackgroundTasks  # type: ignore[attr-defined]
        monkeypatch.setattr(litestar_module, "background_tasks", fake)
        with pytest.raises(RuntimeError, match="does not have the shape ctxkit knows"):
            litestar_module.CtxkitPlugin()


async def lambda_async(failure: object) -> None:
    """An ``async def`` on_error: refused, the runner would never await it."""


class TestMounted:
    @pytest.mark.anyio
    async def test_mounted_apps_follow_the_app_that_serves_the_request(self) -> None:
        """A sub-app mounted in a set-up app is detached with it; an outer app that mounts a
        set-up app keeps Starlette's behaviour for its own routes."""

        seen: dict[str, bool] = {}
        done = anyio.Event()

        async def note(key: str) -> None:
            seen[key] = ctxkit.current_task() is not None
            if len(seen) == 3:
                done.set()

        async def endpoint(request: Request) -> PlainTextResponse:
            key = request.url.path
            return PlainTextResponse(key, background=BackgroundTask(note, key))

        def leaf() -> Starlette:
            return Starlette(routes=[Route("/x", endpoint)])

        set_up = Starlette(routes=[Route("/x", endpoint), Mount("/sub", app=leaf())])
        detach_background_tasks(set_up)
        outer = Starlette(routes=[Route("/x", endpoint), Mount("/in", app=set_up)])
        transport = httpx.ASGITransport(app=outer)
        async with (
            ctxkit.BackgroundRunner(),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            for path in ("/x", "/in/x", "/in/sub/x"):
                assert (await client.get(path)).status_code == 200
            with anyio.fail_after(DEADLINE):
                await done.wait()
        assert seen == {"/x": False, "/in/x": True, "/in/sub/x": True}


class Recorder(logging.Handler):
    """Keep the messages of the ``ctxkit`` logger."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def ctxkit_log() -> Iterator[Recorder]:
    recorder = Recorder()
    logger = logging.getLogger("ctxkit")
    logger.addHandler(recorder)
    yield recorder
    logger.removeHandler(recorder)


VAR: ContextVar[str] = ContextVar("VAR", default="unset")


class TestInProcess:
    """The same rules through httpx's ASGI transport, in this process's event loop."""

    @pytest.mark.anyio
    async def test_starlette_tasks_become_runner_tasks(self, ctxkit_log: Recorder) -> None:
        """Each task of a response is a task of the open runner, named after its function, in
        the context of add_task; a failure is reported and the others run; a task made outside
        any request runs in the response's context; a refused spawn is logged, not raised."""
        seen: list[tuple[str, str, bool]] = []

        async def note(label: str) -> None:
            seen.append((label, VAR.get(), ctxkit.current_task() is not None))

        def note_sync(label: str) -> None:
            seen.append((label, VAR.get(), True))  # a worker thread: no task to ask

        async def fail() -> None:
            raise ValueError("boom")

        made_outside = BackgroundTask(note, "outside")

        def endpoint(request: Request) -> PlainTextResponse:
            VAR.set("at add_task")
            tasks = BackgroundTasks()
            tasks.add_task(fail)
            tasks.add_task(note, label="async")
            tasks.add_task(note_sync, "sync")
            VAR.set("later")
            return PlainTextResponse("ok", background=tasks)

        async def outside(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok", background=made_outside)

        app = Starlette(routes=[Route("/", endpoint), Route("/outside", outside)])
        detach_background_tasks(app, vars=(VAR,))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async with ctxkit.BackgroundRunner() as runner:
                assert (await client.get("/")).text == "ok"
                assert (await client.get("/outside")).text == "ok"
                await runner.drain()
                stats = runner.statistics()
                assert (stats.spawned, stats.ok, stats.error) == (4, 3, 1)
            # the runner has shut down: the spawn is refused, logged, and the response is sent
            response = await client.get("/")
            assert response.text == "ok"
        assert sorted(seen) == [
            ("async", "at add_task", True),
            ("outside", "unset", True),
            ("sync", "at add_task", True),
        ]
        assert any("<locals>.fail' failed: ValueError: boom" in m for m in ctxkit_log.messages)
        refused = [m for m in ctxkit_log.messages if "was not started" in m]
        assert len(refused) == 3, ctxkit_log.messages
        assert "<locals>.fail' of a request was not started: RunnerClosedError" in refused[0]

    @pytest.mark.anyio
    async def test_litestar_plugin_runner_and_tasks(self) -> None:
        """The plugin's lifespan opens the runner the tasks go to, and closes it at shutdown;
        a task made outside any request, run by a set-up app, is detached as well."""
        seen: list[tuple[str, str, object]] = []

        async def note(label: str) -> None:
            seen.append((label, VAR.get(), ctxkit.current_runner()))

        def note_sync(label: str) -> None:
            seen.append((label, VAR.get(), None))

        made_outside = LitestarTask(note, "outside")

        @litestar.get("/", sync_to_thread=True)
        def handler() -> LitestarResponse[str]:
            VAR.set("at add_task")
            tasks = [LitestarTask(note, "async"), LitestarTask(note_sync, label="sync")]
            VAR.set("later")
            return LitestarResponse("ok", background=LitestarTasks(tasks, run_in_task_group=True))

        @litestar.get("/outside")
        async def outside() -> LitestarResponse[str]:
            return LitestarResponse("ok", background=made_outside)

        plugin = CtxkitPlugin(vars=[VAR], drain_timeout=5)
        app = Litestar(route_handlers=[handler, outside], plugins=[plugin])
        before = plugin.runner
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with (
            app.lifespan(),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            runner = plugin.runner
            assert runner is not None
            assert "CtxkitPlugin(runner=" in repr(plugin)
            assert (await client.get("/")).text == "ok"
            assert (await client.get("/outside")).text == "ok"
            await runner.drain()
            assert runner.statistics().ok == 3
        assert before is None
        assert plugin.runner is None
        assert runner.closed
        assert sorted(seen, key=str) == sorted(
            [
                ("async", "at add_task", runner),
                ("sync", "at add_task", None),
                ("outside", "unset", runner),
            ],
            key=str,
        )

    @pytest.mark.anyio
    async def test_tasks_outside_a_set_up_app_run_the_framework_way(self) -> None:
        """With the classes taught the switch, an app without it runs its tasks inline and in
        order (a failure stops the next one and reaches the server), and a task made in a
        set-up app but run outside any request runs inline as the framework runs it."""
        seen: list[tuple[str, bool]] = []

        async def note(label: str) -> None:
            seen.append((label, ctxkit.current_task() is not None))

        async def fail() -> None:
            raise ValueError("boom")

        kept: list[Any] = []

        @litestar.get("/plain")
        async def plain() -> LitestarResponse[str]:
            tasks = [LitestarTask(note, "a"), LitestarTask(fail), LitestarTask(note, "c")]
            return LitestarResponse("ok", background=LitestarTasks(tasks))

        @litestar.get("/keep")
        async def keep() -> LitestarResponse[str]:
            kept.append(LitestarTask(note, "kept"))
            return LitestarResponse("ok")

        def starlette_keep(request: Request) -> PlainTextResponse:
            kept.append(BackgroundTask(note, "kept-starlette"))
            return PlainTextResponse("ok")

        set_up = Litestar(route_handlers=[keep], plugins=[CtxkitPlugin()])
        not_set_up = Litestar(route_handlers=[plain])
        starlette_app = Starlette(routes=[Route("/keep", starlette_keep)])
        detach_background_tasks(starlette_app)
        async with ctxkit.BackgroundRunner():
            for app, path in ((set_up, "/keep"), (starlette_app, "/keep")):
                transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    assert (await client.get(path)).text == "ok"
            # The failure reaches the server (TestAppsNotSetUp shows uvicorn's report of it);
            # this transport, unlike uvicorn, would trip over the error response that some
            # Litestar versions try to send after the response, so it is told not to raise.
            transport = httpx.ASGITransport(
                app=not_set_up,  # type: ignore[arg-type]
                raise_app_exceptions=False,
            )
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/plain")).text == "ok"
            for task in kept:
                await task()
        assert seen == [("a", False), ("kept", False), ("kept-starlette", False)]

    @pytest.mark.anyio
    async def test_the_switch_passes_other_scopes_through(self) -> None:
        """Lifespan and WebSocket scopes reach the app untouched, with no switch set."""
        from ctxkit.contrib._detach import switch

        calls: list[tuple[str, object]] = []

        async def inner(scope: Any, receive: Any, send: Any) -> None:
            calls.append((scope["type"], switch.get()))

        app = Starlette()
        detach_background_tasks(app)
        middleware = starlette_module._SwitchMiddleware(inner, app._ctxkit_detach)  # type: ignore[attr-defined]
        for kind in ("lifespan", "websocket", "http"):
            await middleware({"type": kind}, None, None)  # type: ignore[arg-type]
        assert [kind for kind, _ in calls] == ["lifespan", "websocket", "http"]
        assert [config is None for _, config in calls] == [True, True, False]

    def test_setting_up_a_started_app_fails_at_once(self) -> None:
        """An app that has built its middleware stack cannot be set up: it says so."""
        app = Starlette()
        app.middleware_stack = app.build_middleware_stack()
        with pytest.raises(RuntimeError, match="after an application has started"):
            detach_background_tasks(app)

    def test_listing_the_plugin_twice_adds_it_once(self) -> None:
        """A second CtxkitPlugin (or the same one twice) leaves the app's config as it is."""
        from litestar.config.app import AppConfig
        from litestar.plugins import InitPluginProtocol

        first, second = CtxkitPlugin(), CtxkitPlugin()
        assert isinstance(first, InitPluginProtocol)
        config = first.on_app_init(AppConfig())
        config = second.on_app_init(first.on_app_init(config))
        assert len(config.lifespan) == 1
        assert len(config.middleware) == 1
