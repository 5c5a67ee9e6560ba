"""How the runner has asyncio make its tasks: the loop's task factory and create_task.

A loop's task factory may start a task's first step eagerly, wrap each coroutine in one of
its own, or refuse to make a task; a loop (or an agent) may have its own create_task. Each
way, every task is started once, its cancels are kept and its counts stay exact.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import sys
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry.trace import StatusCode

import ctxkit

from ._support import ASYNCIO_ONLY, assert_identity, ctxkit_messages, is_closed, noop, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ._support import MakeRunner

pytestmark = pytest.mark.anyio

needs_eager = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in Python 3.12"
)


@pytest.fixture
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What reaches the asyncio loop's exception handler during the test (asyncio only)."""
    errors: list[dict[str, Any]] = []
    yield errors
    assert errors == []


def install_handler(errors: list[dict[str, Any]]) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.set_exception_handler(lambda _, context: errors.append(context))


@needs_eager
class TestEagerStart:
    """With asyncio's eager task factory a task's first step runs as it is started.

    Starting the next queued task never recurses from the end of the previous one (the start
    loop is flat, whatever the queue's length), a cancel made during the eager first step is
    kept, and a first step that changes the queue leaves each task started once.
    """

    @ASYNCIO_ONLY
    async def test_a_long_queue_of_tasks_that_never_suspend_finishes(
        self, make_runner: MakeRunner, loop_errors: list[dict[str, Any]]
    ) -> None:
        """300 queued tasks that return at once all end ok, at a bounded stack depth."""
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        install_handler(loop_errors)
        depths: list[int] = []
        release = anyio.Event()

        async def quick() -> None:
            depth, frame = 0, sys._getframe()
            while frame.f_back is not None:
                depth, frame = depth + 1, frame.f_back
            depths.append(depth)

        try:
            async with make_runner(limit=1) as runner:
                blocker = runner.spawn(wait_for, release)
                handles = [runner.spawn(quick) for _ in range(300)]
                assert runner.statistics().pending == 300
                release.set()
                await runner.drain(2)
                stats = runner.statistics()
                assert_identity(stats)
                assert (stats.ok, stats.running, stats.pending) == (301, 0, 0)
        finally:
            loop.set_task_factory(None)
        assert blocker.outcome == "ok"
        assert all(handle.outcome == "ok" for handle in handles)
        assert len(depths) == 300
        assert max(depths) - min(depths) < 5  # no frame per task: the start loop is flat
        # A loop task that ended by an exception (raised by the start loop, say) is reported
        # to the loop's handler once it is freed.
        del blocker, handles
        gc.collect()
        assert loop_errors == []

    @ASYNCIO_ONLY
    async def test_cancel_during_the_eager_first_step_is_kept(
        self, make_runner: MakeRunner
    ) -> None:
        """A task cancelled while its first step runs eagerly ends "cancelled", not "ok"."""
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]

        async def cancels_itself() -> str:
            task = ctxkit.current_task()
            assert task is not None
            assert task.cancel()
            return "done"

        try:
            async with make_runner() as runner:
                handle = runner.spawn(cancels_itself)
                assert await handle.wait() == "cancelled"
        finally:
            loop.set_task_factory(None)
        assert_identity(runner.statistics())
        assert runner.statistics().cancelled == 1

    @ASYNCIO_ONLY
    async def test_cancel_during_the_eager_first_step_of_a_task_that_then_waits(
        self, make_runner: MakeRunner
    ) -> None:
        """A task that cancels itself in its eager first step and then suspends is cancelled
        at its wait, whether spawn started it or the end of another task did (a queued one)."""
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        reached: list[str] = []

        async def cancels_itself_then_waits() -> None:
            task = ctxkit.current_task()
            assert task is not None
            assert task.cancel()
            try:
                await anyio.sleep_forever()
            except BaseException:
                reached.append("cancelled at its wait")
                raise

        try:
            async with make_runner(limit=1) as runner:
                started_by_spawn = runner.spawn(cancels_itself_then_waits)
                started_by_an_end = runner.spawn(cancels_itself_then_waits)
                with anyio.fail_after(2):
                    assert await started_by_spawn.wait() == "cancelled"
                    assert await started_by_an_end.wait() == "cancelled"
        finally:
            loop.set_task_factory(None)
        assert reached == ["cancelled at its wait"] * 2
        stats = runner.statistics()
        assert_identity(stats)
        assert stats.cancelled == 2

    @ASYNCIO_ONLY
    async def test_a_first_step_that_cancels_the_queue_starts_each_task_once(
        self, make_runner: MakeRunner
    ) -> None:
        """A queued task's eager first step cancels 200 queued tasks (the queue is compacted
        then): the start loop that started it goes on with the compacted queue, so the tasks
        queued after them start once each and the counts stay exact."""
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        first, second, later = anyio.Event(), anyio.Event(), anyio.Event()
        starts: list[str] = []
        victims: list[ctxkit.BackgroundTask[None]] = []

        async def cancel_the_queue() -> None:
            for victim in victims:
                victim.cancel()

        started = anyio.Event()

        async def survivor() -> None:
            starts.append("survivor")
            started.set()
            await later.wait()

        try:
            async with make_runner(limit=2, pending_limit=None) as runner:
                runner.spawn(wait_for, first)
                runner.spawn(wait_for, second)
                runner.spawn(cancel_the_queue)
                victims.extend(runner.spawn(noop) for _ in range(200))
                kept = runner.spawn(survivor)
                last = runner.spawn(noop)
                first.set()  # starts cancel_the_queue, then the survivor
                with anyio.fail_after(2):
                    await started.wait()
                assert runner.statistics().pending == 1
                second.set()  # a slot more: the last one starts (and the survivor not again)
                with anyio.fail_after(2):
                    assert await last.wait() == "ok"
                assert_identity(runner.statistics())
                later.set()
                assert await kept.wait() == "ok"
        finally:
            loop.set_task_factory(None)
        assert starts == ["survivor"]
        stats = runner.statistics()
        assert_identity(stats)
        assert (stats.ok, stats.cancelled) == (5, 200)


def _wrapping_factory(
    loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
) -> asyncio.Task[Any]:
    """A task factory that runs every coroutine inside one of its own, as Sentry's does."""

    async def around() -> Any:
        return await coro

    return asyncio.Task(around(), loop=loop, **kwargs)


@ASYNCIO_ONLY
class TestWrappingTaskFactory:
    """A loop task factory that wraps each coroutine hides ctxkit's wrapper one level down."""

    async def test_current_task_and_own_runner_are_found(self, make_runner: MakeRunner) -> None:
        """current_task() is the task's handle inside it, None in its plain child task; its
        spawns go to its own runner; its drain() does not wait for itself."""
        loop = asyncio.get_running_loop()
        loop.set_task_factory(_wrapping_factory)
        seen: list[object] = []

        async def child() -> None:
            seen.append(ctxkit.current_task())

        async def parent() -> None:
            seen.append(ctxkit.current_task())
            await asyncio.create_task(child())
            ctxkit.spawn(noop)
            await ctxkit.drain(2)

        try:
            async with make_runner() as first, make_runner() as second:
                handle = second.spawn(parent)
                assert await handle.wait() == "ok"
        finally:
            loop.set_task_factory(None)
        assert seen == [handle, None]
        assert (first.statistics().spawned, second.statistics().spawned) == (0, 2)

    async def test_cancel_before_the_first_step_is_reported(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """cancel() right after spawn ends the task "cancelled", its coroutine closed."""
        loop = asyncio.get_running_loop()
        loop.set_task_factory(_wrapping_factory)
        try:
            async with make_runner() as runner:
                coro = wait_for(anyio.Event())
                handle = runner.spawn(coro)
                assert handle.cancel() is True
                assert await handle.wait() == "cancelled"
                assert is_closed(coro)  # never left un-awaited
                assert_identity(runner.statistics())
        finally:
            loop.set_task_factory(None)
        assert runner.statistics().cancelled == 1
        assert ctxkit_messages(caplog, logging.WARNING) == []

    @pytest.mark.parametrize("when", ["before the runner opens", "while it is open"])
    async def test_the_factory_makes_every_task(self, make_runner: MakeRunner, when: str) -> None:
        """A factory set on the loop, before or after the runner opened, makes each of its
        tasks: started at spawn and started from the queue."""
        loop = asyncio.get_running_loop()
        made: list[asyncio.Task[Any]] = []

        def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            task = _wrapping_factory(loop, coro, **kwargs)
            made.append(task)  # named after the factory returns it, on Python 3.11
            return task

        release = anyio.Event()
        try:
            if when == "before the runner opens":
                loop.set_task_factory(counting)
            async with make_runner(limit=1) as runner:
                if when == "while it is open":
                    loop.set_task_factory(counting)
                runner.spawn(wait_for, release, name="first")
                runner.spawn(noop, name="queued")
                release.set()
                await runner.drain(2)
        finally:
            loop.set_task_factory(None)
        assert [task.get_name() for task in made] == ["first", "queued"]
        assert runner.statistics().ok == 2


class _Refused(RuntimeError):
    """What the refusing task factory raises."""


def _refusing_factory(refuse: set[str], refused: list[Any] | None = None) -> Any:
    """A task factory that refuses (raises for) the ctxkit tasks spawned with these names.

    asyncio gives a factory no task name (Python 3.11 sets it afterwards), so it reads the
    name from the ctxkit handle in the wrapper's frame. The coroutines it refused go to
    ``refused``.
    """

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        frame = getattr(coro, "cr_frame", None)
        task = frame.f_locals.get("task") if frame is not None else None
        if isinstance(task, ctxkit.BackgroundTask) and task.name in refuse:
            if refused is not None:
                refused.append(coro)
            raise _Refused(f"no task for {task.name}")
        return asyncio.Task(coro, loop=loop, **kwargs)

    return factory


@ASYNCIO_ONLY
class TestRefusedStart:
    """The loop refuses to start a task (its task factory raises): the task ends as an error.

    A task that never ran is never counted as running: drain does not wait for it, shutdown
    does not report it as ignoring its cancellation, its coroutines are closed (no "never
    awaited" warning), and a refused start of a queued task stays with that task: the task that
    made room for it is unaffected and the rest of the queue starts.
    """

    async def test_spawn_raises_and_the_task_ends_as_an_error(
        self,
        make_runner: MakeRunner,
        span_exporter: InMemorySpanExporter,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """spawn raises the factory's error and the task ends as an error: its coroutines
        closed, counted once, its span ERROR, on_error called, no shutdown warning."""
        loop = asyncio.get_running_loop()
        failures: list[ctxkit.TaskFailure] = []
        coro = noop()
        wrappers: list[Any] = []
        async with make_runner(on_error=failures.append) as runner:
            loop.set_task_factory(_refusing_factory({"refused"}, wrappers))
            try:
                with pytest.raises(_Refused, match="no task for refused"):
                    runner.spawn(coro, name="refused")
                assert runner.spawn(noop, name="fine") is not None
            finally:
                loop.set_task_factory(None)
            with anyio.fail_after(2):
                await runner.drain()
            stats = runner.statistics()
        assert is_closed(coro)
        (wrapper,) = wrappers
        assert is_closed(wrapper)  # never warns "never awaited"
        assert (stats.spawned, stats.running, stats.error, stats.ok) == (2, 0, 1, 1)
        assert_identity(stats)
        assert [(f.task.name, type(f.exception)) for f in failures] == [("refused", _Refused)]
        assert failures[0].task.outcome == "error"
        (span,) = [s for s in span_exporter.get_finished_spans() if s.name == "refused"]
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["ctxkit.task.outcome"] == "error"
        assert ctxkit_messages(caplog, logging.WARNING) == []  # no shutdown summary

    async def test_a_queued_task_refused_at_its_start_lets_the_next_one_start(
        self, make_runner: MakeRunner, loop_errors: list[dict[str, Any]]
    ) -> None:
        """A queued task refused when a slot frees ends as an error, and the task queued
        after it still starts."""
        install_handler(loop_errors)
        loop = asyncio.get_running_loop()
        release = anyio.Event()
        failures: list[ctxkit.TaskFailure] = []
        async with make_runner(limit=1, on_error=failures.append) as runner:
            first = runner.spawn(wait_for, release, name="first")
            loop.set_task_factory(_refusing_factory({"refused"}))
            try:
                refused = runner.spawn(noop, name="refused")  # queued: no start yet
                last = runner.spawn(noop, name="last")
                assert runner.statistics().pending == 2
                release.set()
                with anyio.fail_after(2):
                    assert await first.wait() == "ok"
                    assert await refused.wait() == "error"
                    assert await last.wait() == "ok"
                    await runner.drain()
            finally:
                loop.set_task_factory(None)
            stats = runner.statistics()
        assert isinstance(refused.exception(), _Refused)
        assert [f.task for f in failures] == [refused]
        assert (stats.running, stats.pending, stats.ok, stats.error) == (0, 0, 2, 1)

    async def test_a_task_spawned_from_a_thread_and_refused_ends_as_an_error(
        self, make_runner: MakeRunner
    ) -> None:
        """A task spawned from another thread and refused as the loop starts it ends as an
        error, handed to on_error."""
        loop = asyncio.get_running_loop()
        failures: list[ctxkit.TaskFailure] = []
        async with make_runner(on_error=failures.append) as runner:
            loop.set_task_factory(_refusing_factory({"refused"}))
            try:
                handle = await anyio.to_thread.run_sync(lambda: runner.spawn(noop, name="refused"))
                with anyio.fail_after(2):
                    assert await handle.wait() == "error"
            finally:
                loop.set_task_factory(None)
            stats = runner.statistics()
        assert isinstance(handle.exception(), _Refused)
        assert [f.task for f in failures] == [handle]
        assert (stats.spawned, stats.running, stats.error) == (1, 0, 1)


class _OwnCreateTaskLoop(asyncio.SelectorEventLoop):
    """A loop class with a create_task of its own (as uvloop's is): it names what it made."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = super().create_task(coro, **kwargs)
        self.made.append(task.get_name())
        return task


class TestCreateTask:
    """On asyncio's own loops with no task factory ctxkit builds the asyncio.Task itself."""

    def test_a_loop_with_its_own_create_task_is_asked(self) -> None:
        """A loop class with its own create_task makes the tasks of an explicit runner and
        of the implicit one."""
        loop = _OwnCreateTaskLoop()

        async def main() -> None:
            async with ctxkit.BackgroundRunner() as runner:
                runner.spawn(noop, name="first")
                ctxkit.spawn(noop, name="second")

        with asyncio.Runner(loop_factory=lambda: loop) as run:
            run.run(main())
        assert "first" in loop.made
        assert "second" in loop.made

    def test_a_loop_with_its_own_create_task_and_a_factory_set_then_removed(self) -> None:
        """On a loop class with its own create_task, a (loop, coro) task factory set and then
        removed while the runner is open: the loop makes every task, each named, the factory
        the one task spawned while it was set."""
        loop = _OwnCreateTaskLoop()
        by_factory: list[object] = []
        names: list[str] = []

        def old_style(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
            by_factory.append(coro)
            return asyncio.Task(coro, loop=loop)

        async def named() -> None:
            task = asyncio.current_task()
            assert task is not None
            names.append(task.get_name())

        async def main() -> None:
            async with ctxkit.BackgroundRunner() as runner:
                await runner.spawn(named, name="before")
                loop.set_task_factory(old_style)
                await runner.spawn(named, name="with the factory")
                loop.set_task_factory(None)
                await runner.spawn(named, name="after")

        with asyncio.Runner(loop_factory=lambda: loop) as run:
            run.run(main())
        assert names == ["before", "with the factory", "after"]
        assert len(by_factory) == 1
        assert len(loop.made) >= 3

    @ASYNCIO_ONLY
    async def test_a_create_task_patched_on_the_class_or_the_loop_is_asked(
        self, make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An agent that patched BaseEventLoop.create_task, or the loop's own create_task,
        before the runner opened sees every task ctxkit starts."""
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        original = asyncio.BaseEventLoop.create_task

        def patched(self: Any, coro: Any, **kwargs: Any) -> Any:
            seen.append(kwargs.get("name") or "?")
            return original(self, coro, **kwargs)

        async with make_runner() as runner:
            await runner.spawn(noop, name="plain")
        monkeypatch.setattr(asyncio.BaseEventLoop, "create_task", patched)
        async with make_runner() as runner:
            await runner.spawn(noop, name="class")
        monkeypatch.undo()
        monkeypatch.setattr(loop, "create_task", lambda coro, **kw: patched(loop, coro, **kw))
        async with make_runner() as runner:
            await runner.spawn(noop, name="instance")
        assert seen == ["class", "instance"]

    @ASYNCIO_ONLY
    async def test_the_task_built_directly_is_the_task_create_task_makes(
        self, make_runner: MakeRunner
    ) -> None:
        """Same class, name and context as loop.create_task would give; it is the loop's
        current task inside, and cancelling the handle cancels it."""
        seen: list[tuple[object, str, object]] = []
        looked = anyio.Event()

        async def look() -> None:
            await anyio.lowlevel.checkpoint()  # an eager factory names the task after step 1
            task = asyncio.current_task()
            assert task is not None
            seen.append((type(task), task.get_name(), marker.get(None)))
            looked.set()
            await anyio.sleep_forever()

        marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker")
        marker.set("carried")
        async with make_runner() as runner:
            handle = runner.spawn(look, name="looked", vars=[marker])
            await looked.wait()
            assert handle.cancel()
            assert await handle.wait() == "cancelled"
        assert seen == [(asyncio.Task, "looked", "carried")]
