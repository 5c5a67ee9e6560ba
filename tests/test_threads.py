"""Background work from sync code and threads: spawn from any thread, plain functions, bind,
ContextExecutor and RunnerThread."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import ctxkit

from ._support import ASYNCIO_ONLY, assert_identity, is_closed, noop

if TYPE_CHECKING:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ._support import MakeRunner

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("thread_request_id")
secret: contextvars.ContextVar[str] = contextvars.ContextVar("thread_secret")


def hex_trace(span: trace.Span) -> str:
    return f"{span.get_span_context().trace_id:032x}"


async def observe() -> tuple[str | None, str | None, str | None]:
    return request_id.get(None), secret.get(None), ctxkit.current_trace_id()


def observe_sync() -> tuple[str | None, str | None, str | None, str]:
    return (
        request_id.get(None),
        secret.get(None),
        ctxkit.current_trace_id(),
        threading.current_thread().name,
    )


#: The exit-drain scripts' start: a RunnerThread nobody stops, and a way to wait for its drain.
EXIT_PRELUDE = """
import asyncio, logging, socket, sys, threading, time
import ctxkit

sys.stdout.reconfigure(line_buffering=True)
logging.basicConfig(level=logging.INFO, format="%(message)s")
runner = ctxkit.RunnerThread(drain_timeout=30).start()  # never stopped: drained at exit
started = threading.Event()

async def drain_has_begun():
    # The drain at exit has begun, so the main thread has ended (polled: no event says so).
    while runner.accepting:
        await asyncio.sleep(0.005)
"""

#: CPython 3.12.0 to 3.12.2 start no thread once the main thread has ended (cpython gh-113964).
EXIT_DRAIN_STARTS_THREADS = pytest.mark.xfail(
    (3, 12) <= sys.version_info[:3] < (3, 12, 3),
    reason="CPython 3.12.0-3.12.2 refuse new threads once the main thread has ended",
    strict=True,
)


def run_at_exit(tmp_path: Any, body: str) -> list[str]:
    """Run EXIT_PRELUDE + body in a child interpreter whose main thread ends while the task
    it spawned still runs; check that the drain finished it and return its output lines."""
    script = tmp_path / "app.py"
    epilogue = 'started.wait(10)\nprint("main done")\n'
    script.write_text(EXIT_PRELUDE + textwrap.dedent(body) + epilogue)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "cannot schedule new futures" not in result.stderr, result.stderr
    assert "every task finished" in result.stderr, result.stderr
    return result.stdout.splitlines()


class TestSpawnFromAThread:
    """runner.spawn, ctxkit.spawn and decorated calls work from any thread."""

    async def test_the_clone_is_made_in_the_calling_thread(
        self, make_runner: MakeRunner, tracer_provider: TracerProvider
    ) -> None:
        """The task sees the calling thread's selected vars and trace, not unselected ones."""
        tracer = tracer_provider.get_tracer("test")
        seen: list[tuple[str, ctxkit.BackgroundTask[Any]]] = []

        def handler(runner: ctxkit.BackgroundRunner) -> None:
            request_id.set("r-thread")
            secret.set("session")
            with tracer.start_as_current_span("sync endpoint") as span:
                seen.append((hex_trace(span), runner.spawn(observe, vars=(request_id,))))
                seen.append((hex_trace(span), ctxkit.spawn(observe, vars=(request_id,))))

        async with make_runner() as runner:
            await anyio.to_thread.run_sync(handler, runner)
            for trace_id, handle in seen:
                assert await handle.wait() == "ok"
                assert handle.result() == ("r-thread", None, trace_id)
        assert_identity(runner.statistics())
        assert runner.statistics().spawned == 2

    async def test_decorated_calls_from_a_thread(self, make_runner: MakeRunner) -> None:
        """A fire_and_forget function called in a thread spawns on the process's runner."""

        @ctxkit.fire_and_forget(vars=(request_id,), span=False)
        async def job() -> str | None:
            return request_id.get(None)

        def handler() -> ctxkit.BackgroundTask[str | None]:
            request_id.set("r-decorated")
            return job()

        async with make_runner():
            handle = await anyio.to_thread.run_sync(handler)
            assert await handle.wait() == "ok"
            assert handle.result() == "r-decorated"

    async def test_closed_and_full_runners_raise_in_the_caller(
        self, make_runner: MakeRunner
    ) -> None:
        """RunnerFullError and RunnerClosedError reach the calling thread; nothing is counted."""
        release = anyio.Event()
        errors: list[BaseException] = []

        def spawn_twice(runner: ctxkit.BackgroundRunner) -> None:
            for _ in range(2):
                try:
                    runner.spawn(noop)
                except (ctxkit.RunnerFullError, ctxkit.RunnerClosedError) as exc:
                    errors.append(exc)

        async def blocker() -> None:
            await release.wait()

        async with make_runner(limit=1, pending_limit=0) as runner:
            runner.spawn(blocker)
            await anyio.to_thread.run_sync(spawn_twice, runner)
            assert [type(e) for e in errors] == [ctxkit.RunnerFullError] * 2
            assert runner.statistics().rejected == 2
            release.set()
        errors.clear()
        await anyio.to_thread.run_sync(spawn_twice, runner)
        assert [type(e) for e in errors] == [ctxkit.RunnerClosedError] * 2
        stats = runner.statistics()
        assert_identity(stats)
        assert stats.spawned == 1

    async def test_a_spawn_from_a_thread_into_a_full_runner_waits_for_a_slot(
        self, make_runner: MakeRunner
    ) -> None:
        """With every slot taken, the task arrives, waits in the queue in FIFO order, and
        starts when a slot frees, as a spawn on the loop would."""
        release = anyio.Event()
        order: list[str] = []

        async def blocker() -> None:
            await release.wait()
            order.append("blocker")

        async def queued(label: str) -> None:
            order.append(label)

        async with make_runner(limit=1) as runner:
            runner.spawn(blocker)
            handles = await anyio.to_thread.run_sync(
                lambda: [runner.spawn(queued, label) for label in ("first", "second")]
            )
            # Both arrived before the thread's return did (the loop runs calls from a thread
            # in their order), and they wait.
            assert runner.statistics().pending == 2
            assert [handle.done() for handle in handles] == [False, False]
            release.set()
            with anyio.fail_after(2):
                assert [await handle.wait() for handle in handles] == ["ok", "ok"]
            stats = runner.statistics()
        assert order == ["blocker", "first", "second"]
        assert_identity(stats)
        assert (stats.spawned, stats.ok, stats.pending) == (3, 3, 0)

    async def test_a_handle_is_cancelled_from_another_thread_on_its_loop(
        self, make_runner: MakeRunner
    ) -> None:
        """cancel() from a thread hands the cancel to the runner's loop, which wakes for it.

        asyncio's and trio's cancel calls are not thread-safe: made in the thread, the
        cancel waited for something else to wake the loop (here nothing does until the
        thread returns), and asyncio's debug mode raises for it.
        """
        never = anyio.Event()

        def cancel_and_watch(handles: list[ctxkit.BackgroundTask[None]]) -> list[bool]:
            assert [handle.cancel() for handle in handles] == [True, True]
            deadline = time.monotonic() + 2
            while not all(handle.done() for handle in handles) and time.monotonic() < deadline:
                time.sleep(0.005)
            return [handle.done() for handle in handles]

        async with make_runner(limit=1) as runner:
            running = runner.spawn(never.wait, name="running")
            pending = runner.spawn(never.wait, name="pending")
            await anyio.sleep(0.01)  # "running" has started and waits; the loop then idles
            assert await anyio.to_thread.run_sync(cancel_and_watch, [running, pending]) == [
                True,
                True,
            ]
            assert [running.outcome, pending.outcome] == ["cancelled", "cancelled"]
            stats = runner.statistics()
        assert (stats.cancelled, stats.running, stats.pending) == (2, 0, 0)

    async def test_done_callbacks_added_from_another_thread_are_never_lost(
        self, make_runner: MakeRunner
    ) -> None:
        """A callback added from a thread runs once, whether the task ends before or after."""
        release = anyio.Event()
        called: list[tuple[str, bool]] = []

        def note(task: ctxkit.BackgroundTask[None]) -> None:
            called.append((task.name, threading.current_thread() is loop_thread))

        loop_thread = threading.current_thread()
        async with make_runner() as runner:
            ended = runner.spawn(noop, name="ended")
            assert await ended.wait() == "ok"
            later = runner.spawn(release.wait, name="later")

            def add_both() -> None:
                ended.add_done_callback(note)
                later.add_done_callback(note)

            await anyio.to_thread.run_sync(add_both)
            release.set()
            await runner.drain(2)
            await anyio.sleep(0.01)  # the callback of a task that had ended runs soon
        assert sorted(called) == [("ended", True), ("later", True)]

    def test_no_runner_anywhere_raises_no_runner_error(self) -> None:
        """A thread with no loop and no open runner in the process gets a helpful error."""
        coro = noop()
        with pytest.raises(ctxkit.NoRunnerError, match="RunnerThread"):
            ctxkit.spawn(coro)
        assert is_closed(coro)

    async def test_no_deadlock_while_the_loop_awaits_the_thread(
        self, make_runner: MakeRunner
    ) -> None:
        """A handler the loop is awaiting can spawn (and its task runs once the loop is free)."""

        def handler(runner: ctxkit.BackgroundRunner) -> ctxkit.BackgroundTask[None]:
            handle = runner.spawn(noop)
            time.sleep(0.01)  # the loop is blocked in to_thread on us meanwhile
            return handle

        async with make_runner() as runner:
            handle = await anyio.to_thread.run_sync(handler, runner)
            assert await handle.wait() == "ok"

    async def test_many_threads_spawn_into_one_runner(self, make_runner: MakeRunner) -> None:
        """8 threads x 10,000 spawns while the runner runs: exact counts, each its own vars."""
        threads, per_thread = 8, 10_000
        wrong: list[tuple[str, str | None]] = []
        done = 0

        async def check(expected: str) -> None:
            nonlocal done
            got = request_id.get(None)
            if got != expected:
                wrong.append((expected, got))
            done += 1

        def producer(runner: ctxkit.BackgroundRunner, index: int) -> None:
            label = f"thread-{index}"
            request_id.set(label)
            for _ in range(per_thread):
                runner.spawn(check, label, vars=(request_id,), span=False)

        async with make_runner(limit=None, pending_limit=None, drain_timeout=120) as runner:
            async with anyio.create_task_group() as group:
                for index in range(threads):
                    group.start_soon(anyio.to_thread.run_sync, producer, runner, index)
            await runner.drain(120)
            stats = runner.statistics()
        assert wrong == []
        assert done == threads * per_thread
        assert_identity(stats)
        assert (stats.spawned, stats.ok) == (threads * per_thread, threads * per_thread)


class TestPlainFunctions:
    """spawn(fn, *args) with a plain callable runs it in a worker thread, in the clone."""

    async def test_a_plain_function_runs_in_a_worker_thread_in_the_clone(
        self, make_runner: MakeRunner, span_exporter: InMemorySpanExporter
    ) -> None:
        """Same span, vars and trace as a coroutine task; the work runs off the loop's thread."""
        request_id.set("r-plain")
        secret.set("session")
        async with make_runner() as runner:
            handle = runner.spawn(observe_sync, vars=(request_id,), name="smtp")
            assert await handle.wait() == "ok"
        rid, hidden, trace_id, thread_name = handle.result()
        assert (rid, hidden, trace_id) == ("r-plain", None, handle.trace_id)
        assert thread_name != threading.current_thread().name
        (span,) = [s for s in span_exporter.get_finished_spans() if s.name == "smtp"]
        assert span.attributes is not None
        assert span.attributes["ctxkit.task.outcome"] == "ok"

    async def test_lambdas_and_partials_of_plain_functions_are_plain(
        self, make_runner: MakeRunner
    ) -> None:
        """A lambda or functools.partial of a plain function runs in a thread too."""
        loop_thread = threading.current_thread().name
        async with make_runner() as runner:
            first = runner.spawn(lambda: threading.current_thread().name)
            second = runner.spawn(functools.partial(str.upper, "x"))
            assert await first.wait() == "ok"
            assert await second.wait() == "ok"
        assert first.result() != loop_thread
        assert second.result() == "X"
        assert first.name.endswith("<locals>.<lambda>")
        assert second.name == "str.upper"

    async def test_errors_of_plain_functions_are_reported(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A plain function's exception: outcome error, logged, on_error called once."""
        failures: list[ctxkit.TaskFailure] = []

        def fails() -> None:
            raise LookupError("no such user")

        async with make_runner(on_error=failures.append) as runner:
            handle = runner.spawn(fails)
            assert await handle.wait() == "error"
        assert isinstance(handle.exception(), LookupError)
        assert [f.task for f in failures] == [handle]
        assert any("no such user" in r.getMessage() for r in caplog.records)

    async def test_a_timeout_cannot_stop_a_thread(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """At its timeout a thread task ends "timeout"; the thread finishes later, logged."""
        release = threading.Event()
        finished = threading.Event()

        def slow() -> str:
            release.wait(5)
            finished.set()
            return "late"

        async with make_runner() as runner:
            handle = runner.spawn(slow, timeout=0.05)
            assert await handle.wait() == "timeout"
            assert not finished.is_set()  # its thread still runs: nothing can stop it
            release.set()
            await anyio.to_thread.run_sync(finished.wait)
            for _ in range(50):
                if any(
                    "finished after the task had ended" in r.getMessage() for r in caplog.records
                ):
                    break
                await anyio.sleep(0.01)
        assert any("finished after the task had ended" in r.getMessage() for r in caplog.records)

    async def test_shutdown_drains_plain_functions(self, make_runner: MakeRunner) -> None:
        """Leaving the runner's block waits for thread tasks as for coroutine tasks."""
        finished: list[str] = []

        def work() -> None:
            time.sleep(0.05)
            finished.append("done")

        async with make_runner() as runner:
            handle = runner.spawn(work)
        assert finished == ["done"]
        assert handle.outcome == "ok"


class TestBind:
    """ctxkit.bind(fn) runs fn in a span-less clone made at bind() time."""

    def test_each_call_runs_in_its_own_copy_of_the_clone(
        self, tracer_provider: TracerProvider
    ) -> None:
        """The bound function sees the bind-time vars and trace, in any thread."""
        tracer = tracer_provider.get_tracer("test")

        def read_and_set() -> tuple[str | None, str | None, str | None]:
            result = (request_id.get(None), secret.get(None), ctxkit.current_trace_id())
            request_id.set("changed inside")
            return result

        def in_a_thread() -> object:
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(bound).result()

        context = contextvars.copy_context()

        def setup() -> Any:
            request_id.set("r-bind")
            secret.set("session")
            with tracer.start_as_current_span("request") as span:
                return hex_trace(span), ctxkit.bind(read_and_set, vars=(request_id,))

        trace_id, bound = context.run(setup)
        assert bound() == ("r-bind", None, trace_id)
        assert bound() == ("r-bind", None, trace_id)  # the first call's set() stayed there
        assert in_a_thread() == ("r-bind", None, trace_id)
        assert bound.__name__ == "read_and_set"

    def test_without_a_trace_every_call_shares_one_fake_id(self) -> None:
        """No span at bind(): the clone's fake trace id is the same in every call."""
        bound = ctxkit.bind(ctxkit.current_trace_id)
        first = bound()
        assert first is not None
        assert bound() == first

    def test_async_functions_are_refused(self) -> None:
        """bind() of an async function raises TypeError pointing to spawn."""
        with pytest.raises(TypeError, match=r"ctxkit\.spawn"):
            ctxkit.bind(observe)
        with pytest.raises(TypeError, match="callable"):
            ctxkit.bind(42)  # type: ignore[arg-type]


class TestContextExecutor:
    """ContextExecutor clones at every submit; workers never reuse a job's context."""

    @ASYNCIO_ONLY
    async def test_run_in_executor_keeps_the_trace_and_vars(self, make_runner: MakeRunner) -> None:
        """Inside a background task, run_in_executor(ContextExecutor(), fn) sees the task's."""
        executor = ctxkit.ContextExecutor(vars=(request_id,))

        async def task() -> tuple[Any, ...]:
            loop = asyncio.get_running_loop()
            return (ctxkit.current_trace_id(), await loop.run_in_executor(executor, observe_sync))

        request_id.set("r-exec")
        try:
            async with make_runner() as runner:
                handle = runner.spawn(task, vars=(request_id,))
                assert await handle.wait() == "ok"
        finally:
            executor.shutdown()
        trace_id, (rid, hidden, inner_trace, _) = handle.result()
        assert (rid, hidden, inner_trace) == ("r-exec", None, trace_id)

    @ASYNCIO_ONLY
    async def test_as_the_default_executor_for_asyncio_to_thread(self) -> None:
        """loop.set_default_executor(ContextExecutor()) makes asyncio.to_thread keep the trace."""
        loop = asyncio.get_running_loop()
        executor = ctxkit.ContextExecutor(vars=(request_id,))
        loop.set_default_executor(executor)
        try:
            request_id.set("r-default")
            outer = ctxkit.clone_without_span(request_id)

            async def inside() -> tuple[Any, ...]:
                return (ctxkit.current_trace_id(), await asyncio.to_thread(observe_sync))

            trace_id, (rid, _, inner_trace, _) = await asyncio.create_task(inside(), context=outer)
            assert (rid, inner_trace) == ("r-default", trace_id)
        finally:
            executor.shutdown()

    @ASYNCIO_ONLY
    @pytest.mark.parametrize("call", ["to_thread", "run_in_executor"])
    @pytest.mark.parametrize("pool", ["own threads", "wrapped pool"])
    async def test_as_the_default_executor_a_job_sees_the_clone_and_nothing_else(
        self, call: str, pool: str, tracer_provider: TracerProvider
    ) -> None:
        """asyncio.to_thread (which wraps the function in copy_context().run) and
        run_in_executor(None, fn) run fn in the clone: the selected and registered vars and the
        trace, but not a var the caller set and did not select (a DB session)."""
        tenant: contextvars.ContextVar[str] = contextvars.ContextVar("thread_tenant")
        ctxkit.register(tenant)
        wrapped = ThreadPoolExecutor() if pool == "wrapped pool" else None
        executor = ctxkit.ContextExecutor(wrapped, vars=(request_id,))
        loop = asyncio.get_running_loop()
        loop.set_default_executor(executor)

        def describe(label: str, *, suffix: str) -> tuple[Any, ...]:
            return (label + suffix, request_id.get(None), tenant.get(None), *observe_sync()[1:3])

        request_id.set("r-default")
        tenant.set("acme")
        secret.set("db session")
        try:
            with tracer_provider.get_tracer("test").start_as_current_span("request") as span:
                if call == "to_thread":
                    seen = await asyncio.to_thread(describe, "job", suffix="!")
                else:
                    job = functools.partial(describe, "job", suffix="!")
                    seen = await loop.run_in_executor(None, job)
        finally:
            executor.shutdown()
            if wrapped is not None:
                wrapped.shutdown()
        assert seen == ("job!", "r-default", "acme", None, hex_trace(span))

    def test_a_job_wrapped_in_a_contexts_run_runs_in_the_clone(self) -> None:
        """submit(ctx.run, fn) and submit(partial(ctx.run, fn)) run fn in the clone made at
        submit, not in ctx."""
        request_id.set("r-submit")
        secret.set("db session")
        whole = contextvars.copy_context()
        with ctxkit.ContextExecutor(vars=(request_id,)) as executor:
            direct = executor.submit(whole.run, observe_sync).result()
            wrapped = functools.partial(whole.run, observe_sync)
            partial = executor.submit(wrapped).result()
            doubly = executor.submit(whole.run, wrapped).result()
        for rid, hidden, _, _ in (direct, partial, doubly):
            assert (rid, hidden) == ("r-submit", None)

    async def test_anyio_to_thread_keeps_the_context(self) -> None:
        """anyio.to_thread.run_sync copies the caller's context (both backends)."""
        request_id.set("r-anyio")
        rid, _, trace_id, _ = await anyio.to_thread.run_sync(observe_sync)
        assert rid == "r-anyio"
        assert trace_id == ctxkit.current_trace_id()

    def test_no_job_sees_another_jobs_context(self) -> None:
        """One worker thread, many jobs: each job sees only its submitter's vars."""
        with ctxkit.ContextExecutor(max_workers=1, vars=(request_id,)) as executor:

            def submit(label: str) -> Any:
                request_id.set(label)
                return executor.submit(leaky)

            def leaky() -> tuple[str | None, str | None]:
                before = secret.get(None)
                secret.set("left by a job")
                return request_id.get(None), before

            futures = [contextvars.copy_context().run(submit, f"r{i}") for i in range(20)]
            results = [future.result() for future in futures]
        assert results == [(f"r{i}", None) for i in range(20)]

    def test_a_wrapped_executor_is_shut_down_by_its_owner(self) -> None:
        """ContextExecutor(pool) hands jobs to pool and leaves it running at shutdown."""
        pool = ThreadPoolExecutor(1)
        executor = ctxkit.ContextExecutor(pool, vars=(request_id,))
        request_id.set("r-wrapped")
        assert executor.submit(request_id.get).result() == "r-wrapped"
        executor.shutdown()
        assert pool.submit(lambda: 1).result() == 1  # still running
        pool.shutdown()
        with pytest.raises(TypeError, match="Executor"):
            ctxkit.ContextExecutor("pool")  # type: ignore[arg-type]


class TestRunnerThread:
    """RunnerThread: a runner on its own loop in a thread, for code with no loop."""

    def test_block_spawns_from_plain_threads_and_drains(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """ctxkit.spawn from a plain thread uses it; leaving the block drains and logs."""
        results: list[str | None] = []

        async def work(label: str) -> None:
            await asyncio.sleep(0.01)
            results.append(request_id.get(None))

        def plain_thread(label: str) -> None:
            request_id.set(label)
            ctxkit.spawn(work, label, vars=(request_id,))

        with (
            caplog.at_level(logging.INFO, logger="ctxkit"),
            ctxkit.RunnerThread(limit=10) as runner,
        ):
            threads = [threading.Thread(target=plain_thread, args=(f"r{i}",)) for i in range(5)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sync_handle = runner.spawn(observe_sync)
        assert sorted(results) == [f"r{i}" for i in range(5)]  # type: ignore[type-var]
        assert sync_handle.outcome == "ok"
        stats = runner.statistics()
        assert_identity(stats)
        assert (stats.spawned, stats.ok) == (6, 6)
        assert runner.closed
        assert any("every task finished" in r.getMessage() for r in caplog.records)

    async def test_its_runner_cannot_be_drained_from_another_loop(self) -> None:
        """drain() awaited on another loop would wait for wake-ups that never reach it."""
        with (
            ctxkit.RunnerThread() as runner,
            pytest.raises(RuntimeError, match="another event loop or thread"),
        ):
            await runner.drain()

    def test_start_and_stop(self) -> None:
        """start() returns the open runner; stop() drains it and joins the thread."""
        runner_thread = ctxkit.RunnerThread(drain_timeout=5)
        runner = runner_thread.start()
        assert runner.accepting
        handle = runner.spawn(asyncio.sleep, 0.05)
        runner_thread.stop()
        assert handle.outcome == "ok"
        assert runner.closed
        runner_thread.stop()  # twice: nothing more
        with pytest.raises(RuntimeError, match="started already"):
            runner_thread.start()

    def test_bad_options_raise_at_once(self) -> None:
        """The options are BackgroundRunner's, checked when the RunnerThread is made."""
        with pytest.raises(ValueError, match="limit"):
            ctxkit.RunnerThread(limit=0)

    def test_an_unstopped_runner_thread_is_drained_at_exit(self, tmp_path: Any) -> None:
        """A process that never stops its RunnerThread still drains it at interpreter exit."""
        script = tmp_path / "app.py"
        script.write_text(
            textwrap.dedent(
                """
                import asyncio, logging, ctxkit
                logging.basicConfig(level=logging.INFO, format="%(message)s")

                async def work():
                    await asyncio.sleep(0.2)
                    print("work finished", flush=True)

                runner = ctxkit.RunnerThread().start()
                ctxkit.spawn(work)
                print("main done", flush=True)
                """
            )
        )
        result = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
        )
        assert result.stdout.splitlines() == ["main done", "work finished"]
        assert "every task finished" in result.stderr

    @EXIT_DRAIN_STARTS_THREADS
    def test_tasks_drained_at_exit_can_use_the_loops_executor(self, tmp_path: Any) -> None:
        """Tasks drained when the main thread ends still get asyncio.to_thread, getaddrinfo
        and run_in_executor: the drain runs before concurrent.futures shuts its pools down."""
        output = run_at_exit(
            tmp_path,
            """
            async def network_client():
                started.set()
                await drain_has_begun()
                loop = asyncio.get_running_loop()
                infos = await loop.getaddrinfo("localhost", 80)
                in_thread = await asyncio.to_thread(threading.current_thread)
                in_executor = await loop.run_in_executor(None, str.upper, "ran")
                print("to_thread off the loop:", in_thread is not threading.current_thread())
                print("getaddrinfo:", len(infos) > 0, "run_in_executor:", in_executor)

            ctxkit.spawn(network_client)
            """,
        )
        assert output == [
            "main done",
            "to_thread off the loop: True",
            "getaddrinfo: True run_in_executor: RAN",
        ]

    @EXIT_DRAIN_STARTS_THREADS
    def test_plain_functions_drained_at_exit_can_use_a_thread_pool(self, tmp_path: Any) -> None:
        """A plain function still running in its worker thread when the main thread ends can
        still submit to a ThreadPoolExecutor."""
        output = run_at_exit(
            tmp_path,
            """
            from concurrent.futures import ThreadPoolExecutor

            def sync_client():
                started.set()
                while runner.accepting:
                    time.sleep(0.005)
                with ThreadPoolExecutor(1) as pool:
                    infos = pool.submit(socket.getaddrinfo, "localhost", 80).result()
                print("getaddrinfo in a pool:", len(infos) > 0)

            ctxkit.spawn(sync_client)
            """,
        )
        assert output == ["main done", "getaddrinfo in a pool: True"]

    @EXIT_DRAIN_STARTS_THREADS
    def test_a_pool_module_imported_after_start_shuts_down_after_the_drain(
        self, tmp_path: Any
    ) -> None:
        """The drain runs before every concurrent.futures pool shuts down, whether the app
        imported the pool's module before ctxkit, after it, or after start()."""
        output = run_at_exit(
            tmp_path,
            """
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor  # after ctxkit and start()

            async def job():
                started.set()
                await drain_has_begun()
                fork = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(1, mp_context=fork) as pool:
                    loop = asyncio.get_running_loop()
                    print("process pool:", await loop.run_in_executor(pool, str.upper, "ran"))

            ctxkit.spawn(job)
            """,
        )
        assert output == ["main done", "process pool: RAN"]

    @EXIT_DRAIN_STARTS_THREADS
    def test_a_runner_thread_first_started_after_the_main_thread_ended_is_drained(
        self, tmp_path: Any
    ) -> None:
        """Started from a non-daemon thread once the main thread has ended (too late for
        threading's exit hooks), a runner thread is still drained at interpreter exit."""
        script = tmp_path / "late.py"
        script.write_text(
            textwrap.dedent(
                """
                import asyncio, logging, threading, ctxkit
                logging.basicConfig(level=logging.INFO, format="%(message)s")

                async def work():
                    await asyncio.sleep(0.05)
                    print("work finished", flush=True)

                def after_main():
                    threading.main_thread().join()
                    ctxkit.RunnerThread().start()
                    ctxkit.spawn(work)

                threading.Thread(target=after_main).start()
                print("main done", flush=True)
                """
            )
        )
        result = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["main done", "work finished"]
        assert "ctxkit runner shut down, every task finished" in result.stderr, result.stderr


def test_spawn_from_a_thread_into_a_trio_runner() -> None:
    """A trio runner takes spawns from other threads too (the run's token hands them over)."""
    results: list[str | None] = []

    async def main() -> None:
        async with ctxkit.BackgroundRunner() as runner:

            def handler() -> None:
                request_id.set("r-trio")
                runner.spawn(observe, vars=(request_id,))

            await anyio.to_thread.run_sync(handler)
            await runner.drain(5)
            results.extend(str(x) for x in [runner.statistics().ok])

    anyio.run(main, backend="trio")
    assert results == ["1"]
