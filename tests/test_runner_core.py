"""The runner core's guarantees that the outside review of the old runner found broken.

Each class names the bug (issue 10) its tests would have caught: every test here fails on the
runner before the redesign.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import StatusCode

import ctxkit
from ctxkit import _clone, _registry, propagation
from ctxkit.testing import open_runner

from ._support import ASYNCIO_ONLY, assert_identity, is_closed, noop, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ._support import MakeRunner

pytestmark = pytest.mark.anyio

needs_eager = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in Python 3.12"
)


def ctxkit_messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ctxkit" and r.levelno == level]


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
class TestEagerTaskFactory:
    """Bug 1: with the eager task factory, finishing recursed into the next task's start."""

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

    Before, the task stayed counted as running although it never ran: drain waited for it
    until its timeout, shutdown reported it as ignoring its cancellation, its coroutines
    warned "never awaited", and a refused start of a queued task escaped into the task that
    made room for it, leaving the rest of the queue waiting.
    """

    async def test_spawn_raises_and_the_task_ends_as_an_error(
        self,
        make_runner: MakeRunner,
        span_exporter: InMemorySpanExporter,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
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


class _FailingStart(SpanProcessor):
    """A span processor whose ``on_start`` raises for spans with this name, after ``go``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.name == self.name:
            self.entered.set()
            self.go.wait(5)
            raise RuntimeError(f"processor broke on {self.name}")


class TestFailingSpanStart:
    """The app's span processor (or sampler) raises when spawn starts the task's span.

    spawn raises that error and leaves nothing behind: the coroutine is closed (never
    "never awaited"), nothing is counted, and a spawn from another thread gives its reserved
    slot back, so drain and shutdown do not wait for a task that will never come.
    """

    async def test_on_the_loop(self, tracer_provider: TracerProvider) -> None:
        tracer_provider.add_span_processor(_FailingStart("doomed"))
        coro = noop()
        async with ctxkit.BackgroundRunner(tracer_provider=tracer_provider) as runner:
            with pytest.raises(RuntimeError, match="processor broke on doomed"):
                runner.spawn(coro, name="doomed")
            assert await runner.spawn(noop, name="fine").wait() == "ok"
            stats = runner.statistics()
        assert is_closed(coro)
        assert (stats.spawned, stats.ok, stats.error, stats.running) == (1, 1, 0, 0)

    async def test_from_a_thread_while_a_drain_waits(self, tracer_provider: TracerProvider) -> None:
        failing = _FailingStart("doomed")
        failing.go.clear()
        tracer_provider.add_span_processor(failing)
        coro = noop()
        raised: list[BaseException] = []

        def spawn_in_thread() -> None:
            try:
                runner.spawn(coro, name="doomed")
            except RuntimeError as exc:
                raised.append(exc)

        async with ctxkit.BackgroundRunner(
            tracer_provider=tracer_provider, drain_timeout=10
        ) as runner:
            thread = threading.Thread(target=spawn_in_thread)
            thread.start()
            try:
                assert await anyio.to_thread.run_sync(failing.entered.wait, 5)
                # The slot is reserved: the drain waits for the task on its way, and ends
                # once the failed spawn gives the slot back.
                with anyio.fail_after(2):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(runner.drain)
                        await anyio.sleep(0.05)
                        assert runner.statistics().running == 0
                        failing.go.set()
            finally:
                failing.go.set()
                await anyio.to_thread.run_sync(thread.join, 5)
            stats = runner.statistics()
        assert [str(exc) for exc in raised] == ["processor broke on doomed"]
        assert is_closed(coro)
        assert (stats.spawned, stats.running, stats.pending) == (0, 0, 0)


class _FailingEnd(SpanProcessor):
    """A span processor whose ``on_end`` raises (an exporter bug of the app)."""

    def on_end(self, span: Any) -> None:
        raise RuntimeError(f"processor broke on {span.name}")


class TestFailingSpanEnd:
    """The app's span processor raises as a task's span ends.

    Before, that escaped into the task's wrapper: on trio it ended the whole run with
    ``TrioInternalError`` (a system task must not raise); on asyncio the task's own error
    never reached ``on_error`` or the log, only "Task exception was never retrieved".
    """

    async def test_every_other_report_is_made(
        self, tracer_provider: TracerProvider, caplog: pytest.LogCaptureFixture
    ) -> None:
        tracer_provider.add_span_processor(_FailingEnd())
        failures: list[ctxkit.TaskFailure] = []
        called: list[str] = []

        async def fails() -> None:
            raise ValueError("the task's own error")

        async with ctxkit.BackgroundRunner(
            tracer_provider=tracer_provider, on_error=failures.append
        ) as runner:
            failed = runner.spawn(fails, name="fails")
            failed.add_done_callback(lambda task: called.append(task.name))
            fine = runner.spawn(noop, name="fine")
            assert await failed.wait() == "error"
            assert await fine.wait() == "ok"
            await anyio.sleep(0.01)  # done-callbacks of ended tasks run soon
        assert [type(f.exception) for f in failures] == [ValueError]
        assert called == ["fails"]
        errors = ctxkit_messages(caplog, logging.ERROR)
        assert any(m.startswith("background task 'fails' failed: ValueError") for m in errors)
        assert sum(m.startswith("ending the span of background task") for m in errors) == 2
        stats = runner.statistics()
        assert (stats.ok, stats.error) == (1, 1)


class _Unprintable(Exception):
    """An exception of the app whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no text")


async def test_an_exception_that_cannot_be_printed_is_still_reported(
    tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its span ends with status ERROR and is exported, the log line is made, on_error runs.

    Before, formatting it for the span's status raised: the span was never ended (so never
    exported), the log line was dropped by logging, and on trio the run ended.
    """
    failures: list[ctxkit.TaskFailure] = []

    async def fails() -> None:
        raise _Unprintable

    async with ctxkit.BackgroundRunner(
        tracer_provider=tracer_provider, on_error=failures.append
    ) as runner:
        assert await runner.spawn(fails, name="fails").wait() == "error"
    assert [type(f.exception) for f in failures] == [_Unprintable]
    (span,) = [s for s in span_exporter.get_finished_spans() if s.name == "fails"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "_Unprintable: <str() of the _Unprintable raised>"
    assert any(
        m.startswith("background task 'fails' failed: _Unprintable: <str() of the")
        for m in ctxkit_messages(caplog, logging.ERROR)
    )


class _OwnCreateTaskLoop(asyncio.SelectorEventLoop):
    """A loop class with a create_task of its own (as uvloop's is): it names what it made."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = super().create_task(coro, **kwargs)
        self.made.append(task.get_name())
        return task


class TestHowTasksAreCreated:
    """On asyncio's own loops with no task factory ctxkit builds the asyncio.Task itself."""

    def test_a_loop_with_its_own_create_task_is_asked(self) -> None:
        loop = _OwnCreateTaskLoop()

        async def main() -> None:
            async with ctxkit.BackgroundRunner() as runner:
                runner.spawn(noop, name="first")
                ctxkit.spawn(noop, name="second")

        with asyncio.Runner(loop_factory=lambda: loop) as run:
            run.run(main())
        assert "first" in loop.made
        assert "second" in loop.made

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


class TestBoundedShutdown:
    """Bug 2: on trio, a task shielding its cleanup held the block's exit for seconds."""

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
        """Bug 8: cancel_timeout=None waits as long as the tasks take, as drain_timeout=None."""
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


class TestOwnership:
    """Bug 3: on trio, spawning from another thread counted a task that never existed."""

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


class TestHooks:
    """Bug 4: an ``async def`` on_error was accepted and never ran."""

    def test_async_on_error_is_refused(self) -> None:
        """on_error must be a plain function; an async one is a TypeError naming it."""

        async def hook(failure: ctxkit.TaskFailure) -> None: ...

        with pytest.raises(TypeError, match="on_error must be a plain function"):
            ctxkit.BackgroundRunner(on_error=hook)

    def test_hook_raising_system_exit_leaves_the_runner_consistent(
        self, tracer_provider: TracerProvider
    ) -> None:
        """A hook's SystemExit propagates only after the bookkeeping of the task is complete."""
        runners: list[ctxkit.BackgroundRunner] = []
        handles: list[ctxkit.BackgroundTask[None]] = []

        def hook(failure: ctxkit.TaskFailure) -> None:
            raise SystemExit(7)

        async def boom() -> None:
            await anyio.lowlevel.checkpoint()  # fails in the loop, not in an eager first step
            raise ValueError("boom")

        async def main() -> None:
            runner = ctxkit.BackgroundRunner(on_error=hook, limit=1, cancel_timeout=0.5)
            runners.append(runner)
            async with runner:
                handles.append(runner.spawn(boom))
                handles.append(runner.spawn(anyio.sleep_forever))
                await anyio.sleep_forever()

        with pytest.raises(SystemExit):
            asyncio.run(main())
        runner = runners[0]
        assert handles[0].outcome == "error"
        assert handles[1].outcome == "cancelled"  # it was started, then cancelled at exit
        stats = runner.statistics()
        assert_identity(stats)
        assert (stats.error, stats.cancelled, stats.running, stats.pending) == (1, 1, 0, 0)


class TestEnteredContextSource:
    """Bug 5: with context= an entered context, a stale OTel context in a var won."""

    async def test_clone_and_inject_of_the_entered_context_carry_its_own_trace(
        self, tracer_provider: TracerProvider
    ) -> None:
        """A stale OpenTelemetry context kept in an app var never replaces the current one."""
        tracer = tracer_provider.get_tracer("test")
        stash: contextvars.ContextVar[object] = contextvars.ContextVar("stash")
        with tracer.start_as_current_span("stale"):
            stash.set(otel_context.get_current())
        # Many other vars, so that hash order has every chance to pick the stash first.
        extra: list[contextvars.ContextVar[object]] = [
            contextvars.ContextVar(f"x{i}") for i in range(50)
        ]
        for var in extra:
            var.set(otel_context.Context())
        with tracer.start_as_current_span("live") as live:
            expected = f"{live.get_span_context().trace_id:032x}"
            source = contextvars.copy_context()
            seen: list[str | None] = []

            def check() -> None:  # runs inside ``source``: entered, so run() on it raises
                clones = (
                    ctxkit.clone_without_span(context=source),
                    ctxkit.clone(context=source, tracer_provider=tracer_provider),
                )
                seen.extend(clone.run(ctxkit.current_trace_id) for clone in clones)
                carrier: dict[str, str] = {}
                propagation.inject(carrier, context=source)
                seen.append(carrier["traceparent"].split("-")[1])

            source.run(check)
        assert seen == [expected] * 3


class TestTestingRunnerIsScoped:
    """Bug 6: a test runner closed on a shared loop made later spawns raise RunnerClosedError."""

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


def test_a_finished_loops_runners_are_freed_with_the_loop() -> None:
    """The registry's memo of the last loop looked up lets go of that loop's runners when the
    loop is garbage-collected (it used to keep them until another loop spawned)."""
    refs: list[weakref.ref[Any]] = []

    async def main() -> None:
        async with ctxkit.BackgroundRunner() as runner:
            await ctxkit.spawn(noop)
            refs.append(weakref.ref(_registry.loop_runners()))
            refs.append(weakref.ref(runner))

    asyncio.run(main())
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


class TestNoCycles:
    """Bug 7: a finished task kept its carried values alive until the cyclic GC ran."""

    @pytest.mark.parametrize("raises", [False, True])
    async def test_carried_values_are_freed_without_the_cyclic_gc(
        self, make_runner: MakeRunner, raises: bool
    ) -> None:
        """Once a task ended, its handle (kept) no longer keeps its vars' values alive."""

        class Value:
            pass

        var: contextvars.ContextVar[Value] = contextvars.ContextVar("carried")

        async def work() -> None:
            assert var.get() is not None
            # Past the first step: with the eager task factory an exception of the first step
            # has the spawner's frames in its traceback (docs/background.md).
            await anyio.lowlevel.checkpoint()
            if raises:
                raise ValueError("failed on purpose")

        async with make_runner(on_error=lambda failure: None) as runner:
            value = Value()
            ref = weakref.ref(value)
            token = var.set(value)
            del value
            gc.collect()
            gc.disable()
            try:
                handle = runner.spawn(work, vars=(var,), span=False)
                var.reset(token)
                await handle.wait()
                # The clone cache keeps the last clone of this selection (docs/cloning.md):
                # one more clone of the selection replaces it.
                ctxkit.clone_without_span(var)
                for _ in range(3):
                    await anyio.lowlevel.checkpoint()
                assert ref() is None, gc.get_referrers(ref())
            finally:
                gc.enable()
        assert handle.outcome == ("error" if raises else "ok")


class TestCloneCache:
    """Bug 9: with more than 16 selected vars the clone cache never hit."""

    async def test_large_selections_reuse_the_cached_clone(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """1000 clones of an unchanged source build one clone, whatever the selection size."""
        many: tuple[contextvars.ContextVar[int], ...] = tuple(
            contextvars.ContextVar(f"v{i}") for i in range(40)
        )
        for index, var in enumerate(many):
            var.set(index)
        builds: list[object] = []
        real = _clone._build_current

        def counting(*args: Any) -> Any:
            builds.append(args)
            return real(*args)

        monkeypatch.setattr(_clone, "_build_current", counting)
        clones = [ctxkit.clone_without_span(*many) for _ in range(1000)]
        assert len(builds) == 1
        assert all(clone.run(many[39].get) == 39 for clone in clones[:3])
        many[3].set(-3)  # a changed value is seen at once
        assert ctxkit.clone_without_span(*many).run(many[3].get) == -3
        assert len(builds) == 2


class TestAlsoSeen:
    """The smaller findings of the review."""

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


class TestStubbornTrioTaskEndsTheRun:
    """A trio task still shielded after the block ends keeps running until it is done."""

    @pytest.mark.parametrize("anyio_backend", ["trio"])
    async def test_the_run_goes_on_with_it(self, make_runner: MakeRunner) -> None:
        """After the block, the stubborn task still runs and finishes in the same run."""
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


def test_the_core_never_tests_for_a_backend() -> None:
    """The runner core reaches the backends through one interface, never by testing a field."""
    import inspect

    from ctxkit import _runner

    source = inspect.getsource(_runner)
    assert "import asyncio" not in source
    assert "import trio" not in source
    assert "_loop is None" not in source


class TestSummaryWording:
    """Issue 13, rule 6: "every task finished" only when no task failed, timed out or was
    cancelled."""

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
