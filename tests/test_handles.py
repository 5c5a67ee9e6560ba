"""Handles that behave like tasks, and insight into running work."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import ctxkit

from ._support import assert_identity, finished_counts, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from ._support import MakeRunner

pytestmark = pytest.mark.anyio


async def double(value: int) -> int:
    await anyio.lowlevel.checkpoint()
    return value * 2


class Boom(Exception):
    pass


async def boom() -> None:
    await anyio.lowlevel.checkpoint()
    raise Boom("failed on purpose")


class TestAwait:
    """``await task`` returns the result or raises, as awaiting an asyncio.Task does."""

    async def test_await_returns_the_result(self, make_runner: MakeRunner) -> None:
        """await task is the coroutine's return value."""
        async with make_runner() as runner:
            assert await runner.spawn(double, 21) == 42

    async def test_await_reraises_the_error_reported_once(
        self,
        make_runner: MakeRunner,
        caplog: pytest.LogCaptureFixture,
        metric_reader: InMemoryMetricReader,
    ) -> None:
        """The exception is re-raised to the awaiter; still logged and counted exactly once."""
        failures: list[ctxkit.TaskFailure] = []
        async with make_runner(on_error=failures.append) as runner:
            task = runner.spawn(boom, name="boom")
            with pytest.raises(Boom, match="failed on purpose"):
                await task
            with pytest.raises(Boom):
                await task  # again: the same exception, no new report
            assert isinstance(task.exception(), Boom)
        errors = [r for r in caplog.records if r.name == "ctxkit" and r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert len(failures) == 1
        assert runner.statistics().error == 1
        assert finished_counts(metric_reader, "boom") == [1]

    async def test_cancelled_and_timed_out_tasks_raise_ctxkit_errors(
        self, make_runner: MakeRunner
    ) -> None:
        """A cancelled task raises TaskCancelledError (an asyncio.CancelledError), a timed-out
        one TaskTimeoutError (a TimeoutError)."""
        release = anyio.Event()
        async with make_runner() as runner:
            cancelled = runner.spawn(wait_for, release)
            timed_out = runner.spawn(wait_for, release, timeout=0.01)
            cancelled.cancel()
            with pytest.raises(ctxkit.TaskCancelledError) as info:
                await cancelled
            assert isinstance(info.value, asyncio.CancelledError)
            assert isinstance(info.value, ctxkit.CtxkitError)
            with pytest.raises(ctxkit.TaskTimeoutError, match=r"timed out after 0\.01s") as tinfo:
                await timed_out
            assert isinstance(tinfo.value, TimeoutError)
            assert cancelled.cancelled()
            assert not timed_out.cancelled()
            with pytest.raises(ctxkit.TaskCancelledError):
                cancelled.exception()
            with pytest.raises(ctxkit.TaskTimeoutError):
                timed_out.result()

    async def test_awaiting_cancels_nothing(self, make_runner: MakeRunner) -> None:
        """Cancelling the awaiter leaves the task running; it still finishes."""
        release = anyio.Event()
        async with make_runner() as runner:
            task = runner.spawn(wait_for, release)
            with anyio.move_on_after(0.01):
                await task
            assert not task.done()
            release.set()
            await task
            assert task.outcome == "ok"

    async def test_awaiting_from_another_loop_is_a_clear_error(
        self, make_runner: MakeRunner
    ) -> None:
        """Awaiting a handle on another thread's event loop raises RuntimeError at once."""
        release = anyio.Event()
        errors: list[BaseException] = []
        async with make_runner() as runner:
            task = runner.spawn(wait_for, release)

            def other_loop() -> None:
                async def await_it() -> None:
                    await task

                try:
                    asyncio.run(await_it())
                except RuntimeError as exc:
                    errors.append(exc)

            await anyio.to_thread.run_sync(other_loop)
            release.set()
        assert len(errors) == 1
        assert "another event loop or thread" in str(errors[0])

    async def test_result_and_exception_before_the_end(self, make_runner: MakeRunner) -> None:
        """result()/exception() of a running task raise TaskNotDoneError (a RuntimeError)."""
        release = anyio.Event()
        async with make_runner() as runner:
            task = runner.spawn(wait_for, release)
            with pytest.raises(ctxkit.TaskNotDoneError, match="has not ended yet"):
                task.result()
            with pytest.raises(RuntimeError):
                task.exception()
            with pytest.raises(asyncio.InvalidStateError):
                task.result()
            release.set()
            await task
            assert task.exception() is None
            assert task.done()


class TestDoneCallbacks:
    """add_done_callback(fn) calls fn(task) once the task has ended."""

    async def test_callbacks_run_after_the_bookkeeping(self, make_runner: MakeRunner) -> None:
        """The callback sees the final outcome and the runner's counters already updated."""
        seen: list[tuple[str | None, int]] = []
        async with make_runner() as runner:
            task = runner.spawn(double, 1)
            task.add_done_callback(lambda t: seen.append((t.outcome, runner.statistics().running)))
            await task
        assert seen == [("ok", 0)]

    async def test_a_callback_added_after_the_end_runs_soon(self, make_runner: MakeRunner) -> None:
        """Added to an ended task, the callback is called soon on the runner's loop."""
        called = anyio.Event()
        async with make_runner() as runner:
            task = runner.spawn(double, 1)
            await task
            task.add_done_callback(lambda t: called.set())
            with anyio.fail_after(5):
                await called.wait()

    async def test_a_failing_callback_is_logged(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A callback's exception is logged on the ctxkit logger, never propagated."""

        def broken(task: ctxkit.BackgroundTask[Any]) -> None:
            raise ValueError("callback broke")

        async with make_runner() as runner:
            task = runner.spawn(double, 1)
            task.add_done_callback(broken)
            await task
        assert any("done-callback" in r.getMessage() for r in caplog.records)
        assert_identity(runner.statistics())
        with pytest.raises(TypeError):
            task.add_done_callback(42)  # type: ignore[arg-type]


class TestTasksSnapshot:
    """runner.tasks() lists running then pending tasks with name, state, age, trace id."""

    async def test_running_then_pending_in_start_order(self, make_runner: MakeRunner) -> None:
        """Names, states, ages and trace ids of what runs and waits, oldest first."""
        release = anyio.Event()
        async with make_runner(limit=2) as runner:
            handles = [runner.spawn(wait_for, release, name=f"job-{i}") for i in range(4)]
            await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.01)
            infos = runner.tasks()
            assert [(i.name, i.state) for i in infos] == [
                ("job-0", "running"),
                ("job-1", "running"),
                ("job-2", "pending"),
                ("job-3", "pending"),
            ]
            assert [i.trace_id for i in infos] == [h.trace_id for h in handles]
            assert all(i.age >= 0.01 for i in infos)
            assert infos[0].running_for is not None
            assert infos[0].running_for <= infos[0].age
            assert infos[2].running_for is None
            handles[2].cancel()
            assert [i.name for i in runner.tasks()] == ["job-0", "job-1", "job-3"]
            release.set()
        assert runner.tasks() == []

    async def test_from_another_thread(self, make_runner: MakeRunner) -> None:
        """tasks() may be called from a health endpoint's thread."""
        release = anyio.Event()
        async with make_runner() as runner:
            runner.spawn(wait_for, release, name="busy")
            await anyio.lowlevel.checkpoint()
            infos = await anyio.to_thread.run_sync(runner.tasks)
            assert [i.name for i in infos] == ["busy"]
            release.set()


class TestDumpOnSignal:
    """CTXKIT_TASKS_SIGNAL=USR1 logs every runner's tasks when the process gets SIGUSR1."""

    @pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
    def test_a_running_process_dumps_its_tasks(self, tmp_path: Path) -> None:
        """Without code changes: the env var, then kill -USR1 <pid>, then read the log."""
        script = tmp_path / "app.py"
        ready = tmp_path / "ready"
        script.write_text(
            textwrap.dedent(
                f"""
                import asyncio, logging, pathlib, ctxkit
                logging.basicConfig(level=logging.INFO, format="%(message)s")

                async def main():
                    async with ctxkit.BackgroundRunner(limit=1) as runner:
                        runner.spawn(asyncio.sleep, 30, name="long-export")
                        runner.spawn(asyncio.sleep, 30, name="queued-mail")
                        pathlib.Path({str(ready)!r}).write_text("ready")
                        await asyncio.sleep(30)

                asyncio.run(main())
                """
            )
        )
        env = {**os.environ, "CTXKIT_TASKS_SIGNAL": "USR1"}
        with subprocess.Popen(
            [sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True
        ) as process:
            try:
                for _ in range(600):
                    if ready.exists():
                        break
                    threading.Event().wait(0.05)
                process.send_signal(signal.SIGUSR1)
                threading.Event().wait(0.5)
            finally:
                process.terminate()
            _, stderr = process.communicate(timeout=30)
        assert "ctxkit tasks of <BackgroundRunner open running=1 pending=1" in stderr
        assert "long-export running" in stderr
        assert "queued-mail pending" in stderr


class TestDumpInProcess:
    """The dump handler itself, in this process (the subprocess test shows it end to end)."""

    @pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")
    async def test_the_signal_logs_every_open_runner(
        self,
        make_runner: MakeRunner,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """CTXKIT_TASKS_SIGNAL=USR2: the signal logs each open runner's tasks at WARNING."""
        from ctxkit import _dump

        monkeypatch.setenv(_dump.ENVIRONMENT, "USR2")
        monkeypatch.setattr(_dump, "_installed", set())
        previous = signal.getsignal(signal.SIGUSR2)
        release = anyio.Event()
        try:
            async with make_runner() as runner:
                runner.spawn(wait_for, release, name="in-flight")
                await anyio.lowlevel.checkpoint()
                os.kill(os.getpid(), signal.SIGUSR2)
                await anyio.sleep(0.05)  # the handler runs between bytecodes of this thread
                release.set()
        finally:
            signal.signal(signal.SIGUSR2, previous)
        (message,) = [r.getMessage() for r in caplog.records if "ctxkit tasks of" in r.getMessage()]
        assert "in-flight running age=" in message

    def test_a_bad_signal_name_is_logged_not_raised(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A name that is no signal here is a WARNING, and nothing is installed."""
        from ctxkit import _dump
        from ctxkit._runner import process_runners

        monkeypatch.setenv(_dump.ENVIRONMENT, "NOSUCH")
        _dump.install_from_environment(process_runners.snapshot)
        assert any("names no signal" in r.getMessage() for r in caplog.records)
