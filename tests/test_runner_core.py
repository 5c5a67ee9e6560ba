"""The runner core: admission from threads, the queue, current_task, drain from a task, the
bounded shutdown and its summary, a runner's scope, and one interface to the backends.

How asyncio makes the tasks is in test_runner_task_creation.py, how failures are reported when
something else breaks in test_runner_reporting.py, and what a task carries in
test_runner_context.py.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import ctxkit
from ctxkit._runner import loops
from ctxkit.testing import open_runner

from ._support import ASYNCIO_ONLY, assert_identity, ctxkit_messages, noop, wait_for

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from ._support import MakeRunner

pytestmark = pytest.mark.anyio


class TestSpawnFromAThread:
    """spawn() called from a thread other than the runner's loop admits exactly one task."""

    async def test_spawn_from_a_thread_is_counted_once_and_runs(
        self, make_runner: MakeRunner
    ) -> None:
        """A spawn from a thread with no loop is one task: counted when it arrives, then run."""
        handles: list[ctxkit.BackgroundTask[None]] = []

        def other_thread(runner: ctxkit.BackgroundRunner) -> None:
            handles.append(runner.spawn(noop))

        async with make_runner() as runner:
            await anyio.to_thread.run_sync(other_thread, runner)
            await runner.drain(5)
            stats = runner.statistics()
            assert (stats.spawned, stats.ok, stats.running, stats.pending) == (1, 1, 0, 0)
        assert handles[0].outcome == "ok"


class TestPendingCancel:
    """Cancelling queued tasks ends them at once, keeps the counts exact and the queue usable."""

    async def test_cancelling_many_pending_tasks(self, make_runner: MakeRunner) -> None:
        """Cancelling 20,000 pending tasks keeps exact counts and leaves the queue usable."""
        release = anyio.Event()
        async with make_runner(limit=1, pending_limit=None) as runner:
            runner.spawn(wait_for, release)
            handles = [runner.spawn(noop) for _ in range(20_000)]
            for handle in handles[:-1]:
                assert handle.cancel()
            stats = runner.statistics()
            assert (stats.pending, stats.cancelled) == (1, 19_999)
            assert_identity(stats)
            release.set()
            assert await handles[-1].wait() == "ok"
        assert_identity(runner.statistics())


class TestCurrentTask:
    """current_task() is the background task running the code, never inherited."""

    async def test_current_task_is_not_inherited_by_plain_child_tasks(
        self, make_runner: MakeRunner
    ) -> None:
        """A plain task started by a background task is not that background task."""
        seen: list[object] = []

        async def child() -> None:
            seen.append(ctxkit.current_task())

        async def parent() -> None:
            seen.append(ctxkit.current_task())
            async with anyio.create_task_group() as group:
                group.start_soon(child)

        async with make_runner() as runner:
            handle = runner.spawn(parent)
            await handle.wait()
        assert seen == [handle, None]


class TestDrainFromATask:
    """A drain awaited inside a background task waits for the other tasks, not itself."""

    async def test_drain_from_a_task_does_not_wait_for_itself(
        self, make_runner: MakeRunner
    ) -> None:
        """ctxkit.drain() and runner.drain() in a task wait for the other tasks only."""
        order: list[str] = []

        async def child() -> None:
            await anyio.lowlevel.checkpoint()
            order.append("child")

        async def parent() -> None:
            ctxkit.spawn(child)
            await ctxkit.drain(5)
            order.append("parent drained")
            runner = ctxkit.current_runner()
            await runner.drain(5)
            order.append("parent drained again")

        async with make_runner() as runner:
            handle = runner.spawn(parent)
            assert await handle.wait() == "ok"
        assert order == ["child", "parent drained", "parent drained again"]


class TestBoundedShutdown:
    """The block's exit waits at most drain_timeout plus cancel_timeout, or as long as the
    tasks take with cancel_timeout=None; a task still shielding its cleanup then is named,
    left running, and finishes later in the same run.
    """

    async def test_exit_takes_drain_plus_cancel_timeout_at_most(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A task ignoring cancellation does not keep the block from ending; it is named."""
        release = anyio.Event()
        started = anyio.Event()

        async def stubborn() -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await release.wait()

        t0 = time.monotonic()
        async with make_runner(drain_timeout=0.2, cancel_timeout=0.3) as runner:
            handle = runner.spawn(stubborn, name="stubborn")
            await started.wait()
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0  # 0.5 s of policy plus scheduling noise, not "until released"
        assert not handle.done()
        (summary,) = ctxkit_messages(caplog, logging.WARNING)
        assert "1 ignored cancellation and are still running (stubborn)" in summary
        assert_identity(runner.statistics())
        release.set()
        assert await handle.wait() == "cancelled"
        assert_identity(runner.statistics())

    async def test_cancel_timeout_none_waits_for_the_cancelled_tasks(
        self, make_runner: MakeRunner
    ) -> None:
        """cancel_timeout=None waits as long as the tasks take, as drain_timeout=None."""
        release = anyio.Event()
        started = anyio.Event()

        async def slow_cleanup() -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await release.wait()

        async def releaser() -> None:
            await started.wait()
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            release.set()

        async with anyio.create_task_group() as group:
            group.start_soon(releaser)
            async with make_runner(drain_timeout=0, cancel_timeout=None) as runner:
                handle = runner.spawn(slow_cleanup)
                await started.wait()
            assert handle.done()  # the exit waited for its cleanup
        assert handle.outcome == "cancelled"

    @pytest.mark.parametrize("anyio_backend", ["trio"])
    async def test_a_task_shielded_past_the_exit_finishes_in_the_same_run(
        self, make_runner: MakeRunner
    ) -> None:
        """A trio task still shielding its cleanup after the block runs on and finishes in the
        same run."""
        release = threading.Event()

        async def stubborn() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(release.wait)

        async with make_runner(drain_timeout=0, cancel_timeout=0.05) as runner:
            handle = runner.spawn(stubborn)
            await anyio.lowlevel.checkpoint()
        assert not handle.done()
        release.set()
        assert await handle.wait() == "cancelled"


class TestShutdownSummary:
    """The summary a runner logs as it shuts down.

    It says "every task finished" only when no task failed, timed out or was cancelled; the
    implicit runner's teardown at asyncio.run's exit gives one WARNING that names its tasks.
    """

    async def test_a_failed_task_is_not_every_task_finished(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """After an error and a cancel, the INFO summary says no task was left to cancel."""

        async def fails() -> None:
            raise ValueError("failed on purpose")

        with caplog.at_level(logging.INFO, logger="ctxkit"):
            async with make_runner() as runner:
                await runner.spawn(fails).wait()
                cancelled = runner.spawn(anyio.sleep_forever)
                cancelled.cancel()
                await cancelled.wait()
        (summary,) = [m for m in ctxkit_messages(caplog, logging.INFO) if "shut down" in m]
        assert "every task finished" not in summary
        assert "no task left to cancel" in summary
        assert "error=1" in summary
        assert "cancelled=1" in summary

    async def test_all_ok_is_every_task_finished(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With every task ok the summary says every task finished."""
        with caplog.at_level(logging.INFO, logger="ctxkit"):
            async with make_runner() as runner:
                await runner.spawn(noop).wait()
        (summary,) = [m for m in ctxkit_messages(caplog, logging.INFO) if "shut down" in m]
        assert "every task finished" in summary

    def test_implicit_runner_logs_one_summary_at_asyncio_run_exit(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """asyncio.run's teardown of 20 implicit tasks gives one WARNING that names them."""
        handles: list[ctxkit.BackgroundTask[None]] = []

        async def forever() -> None:
            await asyncio.Event().wait()

        async def main() -> None:
            handles.extend(ctxkit.spawn(forever, name=f"job-{index}") for index in range(20))
            await asyncio.sleep(0)

        with caplog.at_level(logging.INFO, logger="ctxkit"):
            asyncio.run(main())
        assert [h.outcome for h in handles] == ["cancelled"] * 20
        (message,) = ctxkit_messages(caplog, logging.WARNING)
        assert "implicit runner" in message
        assert "cancelled 20 background tasks" in message
        assert "job-0" in message


class TestRunnerScope:
    """A runner belongs to its block and its loop: it leaves nothing behind when either ends."""

    @ASYNCIO_ONLY
    async def test_spawn_after_a_testing_runner_uses_the_implicit_runner(
        self, tracer_provider: TracerProvider
    ) -> None:
        """open_runner's runner belongs to its block: afterwards the loop is as before."""
        async with open_runner() as runner:
            assert ctxkit.current_runner() is runner
        handle = ctxkit.spawn(noop)
        assert handle.done() or await handle.wait() == "ok"
        assert ctxkit.current_runner() is not runner

    def test_a_finished_loops_runners_are_freed_with_the_loop(self) -> None:
        """The registry's memo of the last loop looked up lets go of that loop's runners when the
        loop is garbage-collected, without waiting for another loop to spawn."""
        refs: list[weakref.ref[Any]] = []

        async def main() -> None:
            async with ctxkit.BackgroundRunner() as runner:
                await ctxkit.spawn(noop)
                refs.append(weakref.ref(loops.current()))
                refs.append(weakref.ref(runner))

        asyncio.run(main())
        gc.collect()
        assert [ref() for ref in refs] == [None, None]


class TestBackendInterface:
    """The runner core reaches the backends through one interface."""

    def test_the_core_never_tests_for_a_backend(self) -> None:
        """The runner core reaches the backends through one interface, never by testing a field."""
        import inspect

        from ctxkit import _core, _handle, _handover, _lifecycle, _reporting, _runner

        for module in (_core, _handle, _handover, _lifecycle, _reporting, _runner):
            source = inspect.getsource(module)
            assert "import asyncio" not in source, module
            assert "import trio" not in source, module
            assert "_loop is None" not in source, module
