"""Threads that ctxkit starts begin detached, whatever the interpreter's default.

From 3.14, ``sys.flags.thread_inherit_context`` (on by default in free-threaded builds,
``-X thread_inherit_context=1`` anywhere) makes a plain ``threading.Thread`` start in a copy of
the context of whoever calls ``start()``. ctxkit's runner thread, ``ContextExecutor``'s workers
and the worker threads of plain-function tasks start in a context ctxkit chooses (empty) on
every interpreter: nothing of the request that happened to start them reaches ctxkit's log
lines, its serving loop or a later job's done-callbacks, and nothing of it stays alive.

Each scenario runs in a child interpreter, so that the flags are the test's, not the suite's:
from 3.14 once with each setting of ``thread_inherit_context`` (``context_aware_warnings`` set
alike, as free-threaded builds have them), before 3.14 once as it is (threads start empty there;
the tests then pin that ctxkit's threads still do). The child prints its findings as JSON.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import gc
import json
import logging
import subprocess
import sys
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider

import ctxkit

ROOT = Path(__file__).resolve().parents[1]

request_id: contextvars.ContextVar[object] = contextvars.ContextVar("thread_context_request")


@dataclasses.dataclass(frozen=True)
class Interpreter:
    """A child interpreter's flags: ``inherit`` is the value of both 3.14 flags, None before."""

    inherit: bool | None

    @property
    def args(self) -> list[str]:
        if self.inherit is None:
            return []
        value = int(self.inherit)
        return ["-X", f"thread_inherit_context={value}", "-X", f"context_aware_warnings={value}"]

    def __str__(self) -> str:
        return "before-3.14" if self.inherit is None else f"inherit={int(self.inherit)}"


INTERPRETERS = (
    [Interpreter(inherit=False), Interpreter(inherit=True)]
    if sys.version_info >= (3, 14)
    else [Interpreter(inherit=None)]
)
each_interpreter = pytest.mark.parametrize("interpreter", INTERPRETERS, ids=str)


def run_child(interpreter: Interpreter, scenario: str, *args: str) -> dict[str, Any]:
    """Run ``scenario(*args)`` of this module in a child with ``interpreter``'s flags."""
    code = (
        "import json, sys\n"
        f"from tests.test_thread_context import {scenario} as scenario\n"
        "print(json.dumps(scenario(*sys.argv[1:])))\n"
    )
    result = subprocess.run(
        [sys.executable, *interpreter.args, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    # The child ran with the flags asked for (never silently with others).
    expected = None if interpreter.inherit is None else int(interpreter.inherit)
    assert found["flags"] == [expected, expected], result.stderr
    return found


def interpreter_flags() -> list[int | None]:
    return [
        getattr(sys.flags, "thread_inherit_context", None),
        getattr(sys.flags, "context_aware_warnings", None),
    ]


class Payload:
    """A request's object, to tell by weakref whether something keeps it alive."""


class Lines(logging.Handler):
    """Keep what each ``ctxkit`` log line carried: its trace id and whether a request var."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(ctxkit.TraceIdFilter())
        self.seen: list[tuple[str, str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # emit runs in the thread and context that logged.
        trace_id = str(getattr(record, "trace_id", "?"))
        self.seen.append((record.getMessage(), trace_id, request_id.get(None) is not None))


# ---- the scenarios, run in the child ------------------------------------------------------


def runner_thread_started_from_anyio_on_trio() -> dict[str, Any]:
    """Start a RunnerThread from anyio-on-trio code, spawn two tasks, stop it mid-flight."""
    runner_thread = ctxkit.RunnerThread(drain_timeout=10)

    async def until_the_drain() -> str:
        # Polled: no event says that the drain has begun (stop() runs in another thread).
        while runner_thread.runner.accepting:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        return "drained"

    async def request() -> list[tuple[str | None, object]]:
        runner = runner_thread.start()
        handles = [runner.spawn(until_the_drain) for _ in range(2)]
        await anyio.to_thread.run_sync(runner_thread.stop)
        return [(h.outcome, h.result() if h.outcome == "ok" else None) for h in handles]

    outcomes = anyio.run(request, backend="trio")
    stats = runner_thread.runner.statistics()
    return {
        "flags": interpreter_flags(),
        "outcomes": outcomes,
        "ok": stats.ok,
        "cancelled": stats.cancelled,
    }


def runner_thread_started_in_a_request() -> dict[str, Any]:
    """Start a RunnerThread inside request A, stop it after A ended; what kept A?"""
    provider = TracerProvider()
    lines = Lines()
    log = logging.getLogger("ctxkit")
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    runner_thread = ctxkit.RunnerThread(drain_timeout=5, tracer_provider=provider)

    def request_a() -> tuple[weakref.ref[Payload], str]:
        payload = Payload()
        request_id.set(payload)
        with provider.get_tracer("test").start_as_current_span("request A"):
            runner_thread.start()
            return weakref.ref(payload), ctxkit.current_trace_id() or ""

    payload_ref, trace_a = contextvars.Context().run(request_a)
    runner_thread.stop()
    gc.collect()
    return {
        "flags": interpreter_flags(),
        "trace_a": trace_a,
        "lines": lines.seen,
        "payload_alive": payload_ref() is not None,
    }


def executor_started_in_a_request() -> dict[str, Any]:
    """Start a ContextExecutor's worker inside request A; then watch request B's done-callback."""
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    executor = ctxkit.ContextExecutor(max_workers=1, vars=(request_id,))

    def request_a() -> tuple[weakref.ref[Payload], str, object]:
        payload = Payload()
        request_id.set(payload)
        with tracer.start_as_current_span("request A"):
            # The worker is started here; the job sees A in its clone, as it should.
            job_saw_a = executor.submit(lambda: request_id.get(None) is payload).result()
            return weakref.ref(payload), ctxkit.current_trace_id() or "", job_saw_a

    def request_b() -> tuple[list[tuple[bool, str | None]], str]:
        request_id.set("request B")
        with tracer.start_as_current_span("request B"):
            release, called = threading.Event(), threading.Event()
            seen: list[tuple[bool, str | None]] = []

            def callback(_: object) -> None:  # called by the worker that finishes the job
                seen.append((request_id.get(None) is not None, ctxkit.current_trace_id()))
                called.set()

            future = executor.submit(release.wait, 10)
            future.add_done_callback(callback)
            release.set()
            assert called.wait(10)
            return seen, ctxkit.current_trace_id() or ""

    payload_ref, trace_a, job_saw_a = contextvars.Context().run(request_a)
    callback_saw, trace_b = contextvars.Context().run(request_b)
    gc.collect()
    alive_with_the_pool = payload_ref() is not None
    executor.shutdown()
    return {
        "flags": interpreter_flags(),
        "job_saw_a": job_saw_a,
        "traces": [trace_a, trace_b],
        "callback_saw": callback_saw,
        "payload_alive": alive_with_the_pool,
    }


def plain_function_in_a_request(backend: str) -> dict[str, Any]:
    """Spawn a plain function inside request A (its worker thread starts then); after it ends,
    is A's object released while the worker thread is still alive (idle, reusable)?"""
    released = threading.Event()

    def seen_in_the_thread() -> bool:
        return request_id.get(None) is not None

    async def main() -> tuple[object, bool]:
        async with ctxkit.BackgroundRunner(tracer_provider=TracerProvider()) as runner:

            def request_a() -> ctxkit.BackgroundTask[bool]:
                payload = Payload()
                weakref.finalize(payload, released.set)
                request_id.set(payload)
                return runner.spawn(seen_in_the_thread, vars=(request_id,))

            task = contextvars.Context().run(request_a)
            await task.wait()
            saw_a = task.result()
            # Another request with the same selection: it replaces A's clone in ctxkit's clone
            # cache (docs/cloning.md) and runs on the same, now idle, worker thread.
            task = contextvars.Context().run(runner.spawn, seen_in_the_thread, vars=(request_id,))
            await task.wait()
            del task
            # Released once nothing holds A's clone (an event, no polling); a worker thread
            # that kept a copy of that clone as its own context would keep it until it exits.
            gc.collect()
            return saw_a, await anyio.to_thread.run_sync(released.wait, 5)

    saw_a, payload_released = anyio.run(main, backend=backend)
    return {"flags": interpreter_flags(), "saw_a": saw_a, "released": payload_released}


class ProcessWarning(UserWarning):
    """A category the process's filters turn into an error (the spawner's block ignores it)."""


class SpawnerWarning(UserWarning):
    """A category the spawner's ``catch_warnings`` block turns into an error."""


def warning_filters_in_tasks() -> dict[str, Any]:
    """Spawn a coroutine task and a plain-function task inside a ``catch_warnings`` block."""
    warnings.simplefilter("error", ProcessWarning)  # the process's filters
    warnings.simplefilter("ignore", SpawnerWarning)

    def warn_both() -> list[str]:
        raised = []
        for category in (ProcessWarning, SpawnerWarning):
            try:
                warnings.warn("from a task", category, stacklevel=1)
            except category:
                raised.append(category.__name__)
        return raised

    async def warn_both_async() -> list[str]:
        return warn_both()

    async def main() -> dict[str, object]:
        async with ctxkit.BackgroundRunner(tracer_provider=TracerProvider()) as runner:
            with warnings.catch_warnings():
                warnings.simplefilter("error", SpawnerWarning)
                warnings.simplefilter("ignore", ProcessWarning)
                tasks = {
                    "coroutine": runner.spawn(warn_both_async),
                    "plain": runner.spawn(warn_both),
                }
                for task in tasks.values():
                    await task.wait()
            return {kind: task.result() for kind, task in tasks.items()}

    return {"flags": interpreter_flags(), "raised": asyncio.run(main())}


# ---- the tests ----------------------------------------------------------------------------


class TestRunnerThread:
    """A RunnerThread's thread starts in an empty context, whoever starts it."""

    @each_interpreter
    def test_drains_when_started_from_anyio_on_trio(self, interpreter: Interpreter) -> None:
        """Started from anyio-on-trio code, its loop is asyncio's (no inherited "current
        library = trio"): stop() drains the tasks in flight and loses none."""
        found = run_child(interpreter, "runner_thread_started_from_anyio_on_trio")
        assert found["outcomes"] == [["ok", "drained"], ["ok", "drained"]]
        assert (found["ok"], found["cancelled"]) == (2, 0)

    @each_interpreter
    def test_keeps_nothing_of_the_request_that_started_it(self, interpreter: Interpreter) -> None:
        """Started inside request A: its shutdown lines carry neither A's vars nor A's trace id,
        and A's objects are released once A ends (the thread object keeps no copy of A)."""
        found = run_child(interpreter, "runner_thread_started_in_a_request")
        assert len(found["trace_a"]) == 32
        summary = [line for line in found["lines"] if "runner shut down" in line[0]]
        assert len(summary) == 1, found["lines"]
        for _, trace_id, saw_request_var in found["lines"]:
            assert (trace_id, saw_request_var) == ("", False), found
        assert found["payload_alive"] is False


class TestContextExecutor:
    """ContextExecutor's worker threads start in an empty context, whoever submits first."""

    @each_interpreter
    def test_workers_keep_nothing_of_the_request_that_started_them(
        self, interpreter: Interpreter
    ) -> None:
        """A worker started inside request A runs A's job in A's clone, and nothing more of A:
        a done-callback of request B's future (called in that worker) sees neither A's vars nor
        A's trace, and A's objects do not live as long as the pool."""
        found = run_child(interpreter, "executor_started_in_a_request")
        trace_a, trace_b = found["traces"]
        assert len({trace_a, trace_b}) == 2
        assert found["job_saw_a"] is True
        assert found["callback_saw"] == [[False, None]]
        assert found["payload_alive"] is False


class TestPlainFunctions:
    """The worker threads that run plain-function tasks keep nothing of a request."""

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    @each_interpreter
    def test_worker_threads_keep_nothing_of_the_request(
        self, interpreter: Interpreter, backend: str
    ) -> None:
        """The function runs in the request's clone; once its task ended, the request's objects
        are released although the (idle, reusable) worker thread started for it lives on."""
        found = run_child(interpreter, "plain_function_in_a_request", backend)
        assert found["saw_a"] is True
        assert found["released"] is True


class TestWarningFilters:
    """What a task sees of ``warnings`` filters: the interpreter's rule, ctxkit adds none."""

    @each_interpreter
    def test_a_task_sees_the_process_filters_not_the_spawners_context(
        self, interpreter: Interpreter
    ) -> None:
        """With context-aware warnings (3.14 free-threaded default) a ``catch_warnings`` block
        is context-local and ctxkit's clone carries no warnings state: tasks see the process's
        filters, not the spawner's block. Without it the block changes the process's filters
        while it lasts, so tasks that run meanwhile see the block's."""
        found = run_child(interpreter, "warning_filters_in_tasks")
        context_aware = bool(interpreter.inherit)
        expected = ["ProcessWarning"] if context_aware else ["SpawnerWarning"]
        assert found["raised"] == {"coroutine": expected, "plain": expected}


class TestHandover:
    """ctxkit's own work on a runner's loop, handed over from another thread, runs in an empty
    context: never in a copy of the calling thread's (a request's) whole context."""

    @pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
    def test_a_done_callback_added_from_a_thread_sees_nothing_of_it(
        self, anyio_backend: str
    ) -> None:
        """A callback added from a request's thread to an ended task sees no var of that thread.

        The callback runs on the runner's loop; handed there from the request's thread it must
        not run in a copy of that thread's context (the request's vars, unselected, and its
        objects, kept alive until the loop ran it).
        """
        seen: list[object] = []

        async def main() -> None:
            ran = anyio.Event()  # set by the callback, on the runner's loop
            async with ctxkit.BackgroundRunner() as runner:
                task = runner.spawn(anyio.sleep, 0)
                await task.wait()

                def request() -> None:
                    request_id.set("request A, not selected")

                    def callback(_: ctxkit.BackgroundTask[Any]) -> None:
                        seen.append(request_id.get("nothing"))
                        ran.set()

                    task.add_done_callback(callback)

                await anyio.to_thread.run_sync(request)
                await ran.wait()

        anyio.run(main, backend=anyio_backend)
        assert seen == ["nothing"]
