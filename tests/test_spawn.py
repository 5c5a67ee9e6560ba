"""Tests for ctxkit.spawn, ctxkit.drain and ctxkit.current_runner: which runner serves a spawn."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import ctxkit

from ._support import (
    ASYNCIO_ONLY,
    TRIO_ONLY,
    MakeRunner,
    assert_identity,
    is_closed,
    noop,
    wait_for,
)
from .conftest import eager_mode

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from opentelemetry.sdk.trace import TracerProvider

request_id: ContextVar[str] = ContextVar("test_spawn.request_id")


async def hold_open(
    runner: ctxkit.BackgroundRunner, opened: anyio.Event, close: anyio.Event
) -> None:
    """Keep ``runner`` open (in a task of its own) until ``close`` is set."""
    async with runner:
        opened.set()
        await close.wait()


# --- which runner --------------------------------------------------------------------------------


@pytest.mark.anyio
class TestWhichRunner:
    async def test_first_opened_runner_serves_spawn(self, make_runner: MakeRunner) -> None:
        """With two runners open, ctxkit.spawn uses the one opened first."""
        async with make_runner() as first, make_runner() as second:
            assert ctxkit.current_runner() is first
            ctxkit.spawn(noop)
        assert (first.statistics().spawned, second.statistics().spawned) == (1, 0)

    async def test_handler_in_another_task_finds_the_startup_runner(
        self, make_runner: MakeRunner
    ) -> None:
        """A handler running in another task of the loop spawns on the app's runner."""
        handled = anyio.Event()
        handles: list[ctxkit.BackgroundTask[None]] = []

        async def handler() -> None:
            handles.append(ctxkit.spawn(noop))
            handled.set()

        async with make_runner() as app_runner, anyio.create_task_group() as server:
            server.start_soon(handler)
            await handled.wait()
        assert app_runner.statistics().ok == 1
        assert handles[0].outcome == "ok"

    async def test_a_background_task_spawns_on_its_own_runner(
        self, make_runner: MakeRunner
    ) -> None:
        """ctxkit.spawn inside a task of runner B goes to B, though A was opened first."""

        async def parent() -> None:
            ctxkit.spawn(noop)

        async with make_runner() as first, make_runner() as second:
            second.spawn(parent)
            await second.drain()
        assert (first.statistics().spawned, second.statistics().spawned) == (0, 2)

    async def test_the_pick_follows_runners_opening_draining_and_closing(
        self, make_runner: MakeRunner
    ) -> None:
        """With one runner the pick skips finding the calling task; it must never go stale.

        Only A: A's tasks and other code spawn on A. A and B: B's task spawns on B. B closed:
        A again. A draining: its own task still spawns on A, other code is refused.
        """
        placed: list[ctxkit.BackgroundRunner] = []

        async def record() -> None:
            placed.append(ctxkit.current_runner())
            ctxkit.spawn(noop)

        first = make_runner()
        opened, close = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as app:
            app.start_soon(hold_open, first, opened, close)
            await opened.wait()
            first.spawn(record)
            await first.drain()
            async with make_runner() as second:
                second.spawn(record)
                await second.drain()
            assert ctxkit.current_runner() is first
            first.spawn(record)
            await first.drain()
            assert placed == [first, second, first]
            assert (first.statistics().spawned, second.statistics().spawned) == (4, 2)

            release = anyio.Event()

            async def during_drain() -> None:
                await release.wait()
                await record()

            first.spawn(during_drain)
            close.set()  # its block exits: it drains
            while first.accepting:
                await anyio.lowlevel.checkpoint()
            with pytest.raises(ctxkit.RunnerClosedError, match="shutting down"):
                ctxkit.spawn(noop())
            release.set()
        assert placed == [first, second, first, first]
        assert (first.statistics().spawned, first.statistics().ok) == (6, 6)

    async def test_next_open_runner_takes_over_when_the_first_closes(
        self, make_runner: MakeRunner
    ) -> None:
        """When the first runner closes, spawns go to the next one still open."""
        first, second = make_runner(), make_runner()
        opened = [anyio.Event(), anyio.Event()]
        close = [anyio.Event(), anyio.Event()]
        async with anyio.create_task_group() as app:
            app.start_soon(hold_open, first, opened[0], close[0])
            await opened[0].wait()
            app.start_soon(hold_open, second, opened[1], close[1])
            await opened[1].wait()
            assert ctxkit.current_runner() is first
            close[0].set()
            while not first.closed:
                await anyio.lowlevel.checkpoint()
            assert ctxkit.current_runner() is second
            ctxkit.spawn(noop)
            close[1].set()
        assert (first.statistics().spawned, second.statistics().spawned) == (0, 1)

    async def test_after_the_runner_closed_spawn_raises_closed(
        self, make_runner: MakeRunner
    ) -> None:
        """Once the loop's runner has shut down, ctxkit.spawn raises RunnerClosedError."""
        async with make_runner():
            pass
        coro = noop()
        with pytest.raises(ctxkit.RunnerClosedError, match="has shut down"):
            ctxkit.spawn(coro)
        assert is_closed(coro)
        with pytest.raises(RuntimeError):
            ctxkit.current_runner()

    async def test_spawn_carries_context_and_options(
        self, make_runner: MakeRunner, tracer_provider: TracerProvider
    ) -> None:
        """ctxkit.spawn passes vars, name, timeout and the trace to the runner."""
        tracer = tracer_provider.get_tracer("test")
        request_id.set("r-1")
        seen: list[tuple[str | None, str | None]] = []

        async def work(suffix: str) -> None:
            seen.append((request_id.get(None), ctxkit.current_trace_id()))

        async with make_runner():
            with tracer.start_as_current_span("request") as span:
                handle = ctxkit.spawn(work, "x", vars=[request_id], name="job", timeout=5)
        trace_id = f"{span.get_span_context().trace_id:032x}"
        assert seen == [("r-1", trace_id)]
        assert handle.name == "job"
        assert handle.trace_id == trace_id

    async def test_spawn_refuses_non_async_work(self, make_runner: MakeRunner) -> None:
        """ctxkit.spawn raises TypeError for non-callables and closes a coroutine with args."""
        async with make_runner() as runner:
            not_async: Any = 42
            with pytest.raises(TypeError):
                ctxkit.spawn(not_async)
            coro = noop()
            with pytest.raises(TypeError):
                ctxkit.spawn(coro, 1)  # type: ignore[call-overload]
            assert is_closed(coro)
            coro = noop()
            with pytest.raises(ValueError, match="propagation"):
                ctxkit.spawn(coro, span=False, propagation="link")
            assert is_closed(coro)
        assert runner.statistics().spawned == 0


class TestRunnerLookupCache:
    """ctxkit.spawn remembers the runner it picked; it must stay what current_runner says."""

    def test_a_runner_opened_after_implicit_use_takes_over(self) -> None:
        """Spawns that made the implicit runner stop going there once a runner is entered."""

        async def main() -> tuple[int, int]:
            implicit = ctxkit.spawn(noop)._owner.runner
            assert implicit is not None
            ctxkit.spawn(noop)
            async with ctxkit.BackgroundRunner() as entered:
                ctxkit.spawn(noop)
                ctxkit.spawn(noop)
            await ctxkit.drain()
            return implicit.statistics().spawned, entered.statistics().spawned

        assert asyncio.run(main()) == (2, 2)

    def test_loops_in_two_threads_each_use_their_own_runner(self) -> None:
        """Spawns alternating between two loops (threads) never cross to the other's runner."""
        barrier = threading.Barrier(2, timeout=10)
        counts: dict[str, tuple[int, int]] = {}

        async def serve(label: str) -> None:
            async with ctxkit.BackgroundRunner() as runner:
                for _ in range(50):
                    await asyncio.to_thread(barrier.wait)  # both loops spawn in turns
                    task = ctxkit.spawn(noop)
                    assert task._owner.runner is runner
                    await asyncio.sleep(0)
            counts[label] = (runner.statistics().spawned, runner.statistics().ok)

        threads = [
            threading.Thread(target=asyncio.run, args=(serve(label),)) for label in ("a", "b")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert counts == {"a": (50, 50), "b": (50, 50)}

    def test_trio_runs_in_two_threads_each_use_their_own_runner(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two trio runs that open their first runner at once share one RunVar, not runners."""
        import trio

        from ctxkit._runner import loops

        monkeypatch.setattr(loops, "_trio_var", None)  # both runs make it, at once
        barrier = threading.Barrier(2, timeout=10)
        counts: dict[str, tuple[int, int]] = {}

        async def serve(label: str) -> None:
            await trio.to_thread.run_sync(barrier.wait)
            async with ctxkit.BackgroundRunner() as runner:
                for _ in range(50):
                    await trio.to_thread.run_sync(barrier.wait)  # both runs spawn in turns
                    task = ctxkit.spawn(noop)
                    assert task._owner.runner is runner
                    assert ctxkit.current_runner() is runner
                    await trio.lowlevel.checkpoint()
            counts[label] = (runner.statistics().spawned, runner.statistics().ok)

        threads = [threading.Thread(target=trio.run, args=(serve, label)) for label in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert counts == {"a": (50, 50), "b": (50, 50)}

    def test_no_event_loop_and_trio_not_imported(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Before trio is imported no trio run can exist: the lookup says "no loop" at once."""
        import sys

        from ctxkit._runner import loops

        monkeypatch.setattr(loops, "_trio_var", None)
        monkeypatch.delitem(sys.modules, "trio")
        with pytest.raises(ctxkit.NoRunnerError, match="no async event loop"):
            loops.current()
        assert not loops.trio_ready  # made once trio is imported, not before

    def test_no_event_loop_with_trio_imported(self) -> None:
        """With trio imported but no run in this thread, the lookup says "no loop" too."""
        import trio  # noqa: F401

        from ctxkit._runner import loops

        with pytest.raises(ctxkit.NoRunnerError, match="no async event loop"):
            loops.current()


@pytest.mark.anyio
class TestDrain:
    async def test_drain_waits_for_every_runner(self, make_runner: MakeRunner) -> None:
        """ctxkit.drain() returns once no runner of the loop has work, spawned meanwhile too."""
        finished: list[str] = []

        async def second() -> None:
            finished.append("second")

        async def first() -> None:
            await anyio.lowlevel.checkpoint()
            ctxkit.spawn(second)
            finished.append("first")

        async with make_runner() as one, make_runner() as two:
            one.spawn(first)
            two.spawn(first)
            await ctxkit.drain()
            assert sorted(finished) == ["first", "first", "second", "second"]
            assert one.accepting

    async def test_drain_timeout(self, make_runner: MakeRunner) -> None:
        """ctxkit.drain(timeout) raises TimeoutError when work remains; the work goes on."""
        release = anyio.Event()
        async with make_runner():
            handle = ctxkit.spawn(wait_for, release)
            with pytest.raises(TimeoutError):
                await ctxkit.drain(timeout=0.01)
            release.set()
            await ctxkit.drain(timeout=5)
        assert handle.outcome == "ok"


@pytest.mark.anyio
class TestTrio:
    @TRIO_ONLY
    async def test_no_runner_raises_no_runner_error(self) -> None:
        """On trio without an open runner, ctxkit.spawn raises NoRunnerError, coroutine closed."""
        coro = noop()
        with pytest.raises(ctxkit.NoRunnerError, match="trio needs an open runner"):
            ctxkit.spawn(coro)
        assert is_closed(coro)
        with pytest.raises(RuntimeError):
            ctxkit.spawn(noop)

    @TRIO_ONLY
    async def test_drain_without_runner_returns(self) -> None:
        """ctxkit.drain() with no runner returns at once."""
        await ctxkit.drain()


class TestNoEventLoop:
    def test_spawn_outside_an_event_loop(self) -> None:
        """ctxkit.spawn from sync code raises NoRunnerError and closes the coroutine."""
        coro = noop()
        with pytest.raises(ctxkit.NoRunnerError, match="no event loop runs in this thread"):
            ctxkit.spawn(coro)
        assert is_closed(coro)


# --- the implicit asyncio runner -----------------------------------------------------------------


@pytest.mark.anyio
class TestImplicitRunner:
    @ASYNCIO_ONLY
    async def test_spawn_without_runner_uses_the_loop_runner(self) -> None:
        """On asyncio with no runner ever opened, spawn uses one implicit runner per loop."""
        request_id.set("r-5")
        seen: list[str | None] = []

        async def work() -> None:
            seen.append(request_id.get(None))

        handle = ctxkit.spawn(work, vars=[request_id])
        implicit = ctxkit.current_runner()
        assert ctxkit.current_runner() is implicit
        assert implicit.accepting
        await ctxkit.drain()
        assert handle.outcome == "ok"
        assert seen == ["r-5"]
        assert implicit.statistics().ok == 1

    @ASYNCIO_ONLY
    async def test_thousands_of_dropped_handles_complete(self) -> None:
        """Thousands of implicit-runner tasks with dropped handles all finish across gc."""
        total = 2000
        release = anyio.Event()
        finished = 0

        async def work() -> None:
            nonlocal finished
            await release.wait()
            finished += 1

        for index in range(total):
            ctxkit.spawn(work)
            if index % 400 == 0:
                gc.collect()
        gc.collect()
        release.set()
        await ctxkit.drain()
        assert finished == total
        assert_identity(ctxkit.current_runner().statistics())

    @ASYNCIO_ONLY
    async def test_one_task_cancelled_from_outside_leaves_the_runner_open(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A stray outside cancel of one implicit task is logged; the runner keeps working."""
        release = anyio.Event()
        impls: list[asyncio.Task[Any]] = []
        stray = ctxkit.spawn(wait_recording_task, release, impls, name="stray")
        other = ctxkit.spawn(wait_for, release)
        await anyio.lowlevel.checkpoint()
        impls[0].cancel()
        assert await stray.wait() == "cancelled"
        assert ctxkit.current_runner().accepting
        release.set()
        assert await other.wait() == "ok"
        assert await ctxkit.spawn(noop).wait() == "ok"
        assert any("'stray' was cancelled from outside" in r.getMessage() for r in caplog.records)

    @ASYNCIO_ONLY
    async def test_its_only_task_cancelled_from_outside_leaves_the_runner_open(self) -> None:
        """Cancelling the implicit runner's only task from outside is no loop teardown."""
        release = anyio.Event()
        impls: list[asyncio.Task[Any]] = []
        lone = ctxkit.spawn(wait_recording_task, release, impls, name="lone")
        await anyio.lowlevel.checkpoint()
        impls[0].cancel()
        assert await lone.wait() == "cancelled"
        assert ctxkit.current_runner().accepting
        assert await ctxkit.spawn(noop).wait() == "ok"

    @ASYNCIO_ONLY
    async def test_no_implicit_runner_once_a_runner_was_opened(
        self, make_runner: MakeRunner
    ) -> None:
        """A loop that had a runner gets no implicit one after it closes."""
        async with make_runner():
            pass
        with pytest.raises(ctxkit.RunnerClosedError):
            ctxkit.spawn(noop)

    async def test_spawn_from_another_thread_is_handed_to_the_loop(
        self, make_runner: MakeRunner
    ) -> None:
        """A spawn from another thread runs on the runner's loop, in the caller's clone."""
        loops: list[object] = []

        async def where() -> None:
            loops.append(threading.current_thread())

        async with make_runner() as runner:
            handles: list[ctxkit.BackgroundTask[None]] = []
            await anyio.to_thread.run_sync(lambda: handles.append(runner.spawn(where)))
            assert await handles[0].wait() == "ok"
        assert loops == [threading.current_thread()]


class TestAsyncioRunTeardown:
    """``asyncio.run`` cancels leftover tasks when main returns; implicit-runner tasks included."""

    def test_task_cancelled_before_its_first_step(self, caplog: pytest.LogCaptureFixture) -> None:
        """A task still unstarted at teardown ends "cancelled", closed, with a warning."""
        handles: list[ctxkit.BackgroundTask[None]] = []
        coros: list[Coroutine[Any, Any, None]] = []

        def spawn_late() -> None:
            coros.append(noop())
            handles.append(ctxkit.spawn(coros[0], name="late"))

        async def main() -> None:
            # spawn in the loop's last iteration: the task never gets its first step
            asyncio.get_running_loop().call_soon(spawn_late)

        asyncio.run(main())
        gc.collect()
        if eager_mode():  # an eager task has no unstarted phase: it ran at spawn
            assert handles[0].outcome == "ok"
            return
        assert handles[0].outcome == "cancelled"
        assert is_closed(coros[0])
        (record,) = [r for r in caplog.records if r.name == "ctxkit"]
        assert record.levelno == logging.WARNING
        assert "'late' was cancelled from outside its runner" in record.getMessage()

    def test_running_task_is_cancelled_at_teardown(self) -> None:
        """A task suspended when main returns is cancelled and its finally block runs."""
        handles: list[ctxkit.BackgroundTask[None]] = []
        cleaned: list[bool] = []

        async def work(started: asyncio.Event) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                cleaned.append(True)

        async def main() -> None:
            started = asyncio.Event()
            handles.append(ctxkit.spawn(work, started))
            await started.wait()

        asyncio.run(main())
        assert handles[0].outcome == "cancelled"
        assert cleaned == [True]

    def test_pending_tasks_of_the_implicit_runner_end_too(self) -> None:
        """Past the implicit runner's limit, every task still ends "cancelled" at teardown."""
        handles: list[ctxkit.BackgroundTask[None]] = []
        coros: list[Coroutine[Any, Any, None]] = []
        runners: list[ctxkit.BackgroundRunner] = []
        errors: list[dict[str, Any]] = []

        async def work() -> None:
            await asyncio.Event().wait()

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
            for _ in range(150):
                coros.append(work())
                handles.append(ctxkit.spawn(coros[-1]))
            runners.append(ctxkit.current_runner())
            assert runners[0].statistics().pending == 50

        asyncio.run(main())
        gc.collect()
        assert [h.outcome for h in handles] == ["cancelled"] * 150
        assert all(is_closed(coro) for coro in coros)
        stats = runners[0].statistics()
        assert_identity(stats)
        assert (stats.running, stats.pending, stats.cancelled) == (0, 0, 150)
        assert errors == []

    def test_explicit_runner_in_a_cancelled_server_task(self) -> None:
        """A runner held by a task cancelled at teardown cancels its running and pending work."""
        handles: list[ctxkit.BackgroundTask[None]] = []
        errors: list[dict[str, Any]] = []

        async def work() -> None:
            await asyncio.Event().wait()

        async def serve(ready: asyncio.Event) -> None:
            async with ctxkit.BackgroundRunner(limit=1) as runner:
                handles.extend(runner.spawn(work) for _ in range(3))
                ready.set()
                await asyncio.Event().wait()

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
            ready = asyncio.Event()
            server = asyncio.create_task(serve(ready))
            await ready.wait()
            assert not server.done()

        asyncio.run(main())
        gc.collect()
        assert [h.outcome for h in handles] == ["cancelled"] * 3
        assert errors == []


async def wait_recording_task(event: anyio.Event, impls: list[asyncio.Task[Any]]) -> None:
    """Wait for ``event``, having put this code's asyncio task into ``impls``."""
    impl = asyncio.current_task()
    assert impl is not None
    impls.append(impl)
    await event.wait()
