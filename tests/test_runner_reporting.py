"""A failed task is reported whatever else breaks: the app's span processor, the text of the
exception, the on_error hook.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import StatusCode

import ctxkit

from ._support import assert_identity, ctxkit_messages, is_closed, noop

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.anyio


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


class TestSpanStartFailure:
    """The app's span processor (or sampler) raises when spawn starts the task's span.

    spawn raises that error and leaves nothing behind: the coroutine is closed (never
    "never awaited"), nothing is counted, and a spawn from another thread gives its reserved
    slot back, so drain and shutdown do not wait for a task that will never come.
    """

    async def test_on_the_loop(self, tracer_provider: TracerProvider) -> None:
        """spawn on the loop raises the processor's error, closes the coroutine and counts
        nothing; the next spawn runs."""
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
        """A spawn from another thread that fails gives its reserved slot back: a drain
        waiting for it ends, and nothing is counted."""
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


class TestSpanEndFailure:
    """The app's span processor raises as a task's span ends: the error is logged, not raised.

    It never escapes into the task's wrapper (on trio that would end the whole run with
    ``TrioInternalError``, as a system task must not raise; on asyncio it would leave only
    "Task exception was never retrieved"): the task's own error still reaches ``on_error``
    and the log.
    """

    async def test_every_other_report_is_made(
        self, tracer_provider: TracerProvider, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The task's error reaches on_error and the log, its done-callback runs, each
        span's failed end is logged, and the counts are exact."""
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


class TestUnprintableError:
    """A task's exception whose ``__str__`` raises is reported like any other."""

    async def test_an_exception_that_cannot_be_printed_is_still_reported(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Its span ends with status ERROR and is exported, the log line is made, on_error runs.

        Formatting it for the span's status and the log never raises: a placeholder stands for
        its text, so the span is ended, the log line is kept, and on trio the run goes on.
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
        (event,) = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.message"] == "<str() of the _Unprintable raised>"
        assert "raise _Unprintable" in str(event.attributes["exception.stacktrace"])
        messages = ctxkit_messages(caplog, logging.ERROR)
        assert any(
            m.startswith("background task 'fails' failed: _Unprintable: <str() of the")
            for m in messages
        )
        assert not [m for m in messages if m.startswith("ending the span")]


class TestErrorHook:
    """on_error is a plain function, checked at once; a hook that raises SystemExit does
    so only once the runner's bookkeeping of the task is complete."""

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
        # The loop task that the SystemExit left is collected here, not during a later test:
        # its "never retrieved" log line formats a traceback, which on Python 3.11 parses
        # source, and a collection inside another ast.parse breaks that parse.
        gc.collect()
        runner = runners[0]
        assert handles[0].outcome == "error"
        assert handles[1].outcome == "cancelled"  # it was started, then cancelled at exit
        stats = runner.statistics()
        assert_identity(stats)
        assert (stats.error, stats.cancelled, stats.running, stats.pending) == (1, 1, 0, 0)
