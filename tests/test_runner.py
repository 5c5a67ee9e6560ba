"""Tests for ctxkit.BackgroundRunner: context, detachment, outcomes, errors, spans, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import random
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

import ctxkit

from ._support import ASYNCIO_ONLY, MakeRunner, assert_identity, is_closed, wait_for

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

request_id: ContextVar[str] = ContextVar("test_runner.request_id")
tenant: ContextVar[str] = ContextVar("test_runner.tenant")
secret: ContextVar[str] = ContextVar("test_runner.secret")


# --- helpers -------------------------------------------------------------------------------------


@contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Collect what reaches the asyncio loop's exception handler (after a gc) in the block."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def hex_id(span_context: trace.SpanContext | None) -> str:
    assert span_context is not None
    return f"{span_context.trace_id:032x}"


def ctxkit_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ctxkit" and r.levelno == level]


async def return_value(value: int) -> int:
    return value


async def return_later(value: int) -> int:
    await anyio.lowlevel.checkpoint()
    return value


class Boom(Exception):
    pass


class MessageHandler(logging.Handler):
    """Keep the formatted messages only, never the records (nor their exc_info)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def fail(message: str) -> None:
    raise Boom(message)


# --- construction and options --------------------------------------------------------------------


class TestOptions:
    @pytest.mark.parametrize(
        ("option", "value", "error"),
        [
            ("limit", 0, ValueError),
            ("limit", 1.5, TypeError),
            ("limit", True, TypeError),
            ("pending_limit", -1, ValueError),
            ("pending_limit", "10", TypeError),
            ("drain_timeout", -1, ValueError),
            ("drain_timeout", "30", TypeError),
            ("drain_timeout", float("nan"), ValueError),
            ("cancel_timeout", -0.5, ValueError),
            ("on_error", "log", TypeError),
        ],
    )
    def test_bad_constructor_option_raises_at_once(
        self, option: str, value: object, error: type[Exception]
    ) -> None:
        """A bad limit, timeout or hook raises TypeError/ValueError naming the value."""
        options: dict[str, Any] = {option: value}
        with pytest.raises(error, match=option):
            ctxkit.BackgroundRunner(**options)

    def test_none_means_no_limit(self) -> None:
        """limit, pending_limit and drain_timeout accept None."""
        runner = ctxkit.BackgroundRunner(limit=None, pending_limit=None, drain_timeout=None)
        assert "limit=None pending_limit=None" in repr(runner)

    def test_statistics_is_a_frozen_dataclass(self) -> None:
        """statistics() returns a frozen dataclass with the eight counters, all zero at first."""
        stats = ctxkit.BackgroundRunner().statistics()
        assert dataclasses.asdict(stats) == dict.fromkeys(
            ("spawned", "running", "pending", "ok", "error", "timeout", "cancelled", "rejected"),
            0,
        )
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.ok = 1  # type: ignore[misc]

    def test_spawn_before_open_raises_and_closes_the_coroutine(self) -> None:
        """spawn on a runner never entered raises RunnerClosedError and closes the coroutine."""
        coro = return_value(1)
        with pytest.raises(ctxkit.RunnerClosedError, match="not open yet"):
            ctxkit.BackgroundRunner().spawn(coro)
        assert is_closed(coro)


@pytest.mark.anyio
class TestSpawnOptions:
    @pytest.mark.parametrize(
        ("options", "error"),
        [
            ({"timeout": 0}, ValueError),
            ({"timeout": -1}, ValueError),
            ({"timeout": float("inf")}, ValueError),
            ({"timeout": True}, TypeError),
            ({"timeout": "1"}, TypeError),
            ({"name": 42}, TypeError),
            ({"propagation": "parent"}, ValueError),
            ({"span": 1}, TypeError),
            ({"span": False, "propagation": "link"}, ValueError),
            ({"span": False, "propagation": "none"}, ValueError),
            ({"vars": ["test_runner.request_id"]}, TypeError),
        ],
    )
    async def test_bad_option_raises_and_closes_the_coroutine(
        self, make_runner: MakeRunner, options: dict[str, Any], error: type[Exception]
    ) -> None:
        """A bad spawn option raises at the call, closes the coroutine and counts nothing."""
        async with make_runner() as runner:
            coro = return_value(1)
            with pytest.raises(error):
                runner.spawn(coro, **options)
            assert is_closed(coro)
            assert runner.statistics().spawned == 0

    async def test_reentering_a_runner_raises(self, make_runner: MakeRunner) -> None:
        """A runner is entered once; entering it again raises RuntimeError."""
        runner = make_runner()
        async with runner:
            pass
        with pytest.raises(RuntimeError, match="already entered"):
            await runner.__aenter__()


# --- accepted work -------------------------------------------------------------------------------


class AsyncCallable:
    async def __call__(self, value: int) -> int:
        return value * 2


@pytest.mark.anyio
class TestAcceptedWork:
    async def test_coroutine_object(self, make_runner: MakeRunner) -> None:
        """A coroutine object runs and its return value is the handle's result."""
        async with make_runner() as runner:
            handle = runner.spawn(return_value(7))
            assert await handle.wait() == "ok"
        assert handle.result() == 7

    async def test_async_function_with_args(self, make_runner: MakeRunner) -> None:
        """An async function followed by its positional args is called in the task."""
        async with make_runner() as runner:
            handle = runner.spawn(return_value, 8)
            assert await handle.wait() == ctxkit.TaskOutcome.OK
        assert handle.result() == 8

    async def test_partial_and_async_callable_object(self, make_runner: MakeRunner) -> None:
        """A functools.partial of an async function and an object with async __call__ work."""
        async with make_runner() as runner:
            partial = runner.spawn(functools.partial(return_value, 3))
            callable_object = runner.spawn(AsyncCallable(), 4)
        assert partial.result() == 3
        assert callable_object.result() == 8

    async def test_coroutine_with_args_raises_and_closes_it(self, make_runner: MakeRunner) -> None:
        """A coroutine object followed by args raises TypeError and the coroutine is closed."""
        async with make_runner() as runner:
            coro = return_value(1)
            with pytest.raises(TypeError, match="coroutine object and positional arguments"):
                runner.spawn(coro, 2)  # type: ignore[call-overload]
            assert is_closed(coro)

    @pytest.mark.parametrize("work", [42, "work", None], ids=["int", "str", "None"])
    async def test_non_callable_work_raises_type_error(
        self, make_runner: MakeRunner, work: object
    ) -> None:
        """Anything but a coroutine or a callable raises TypeError at the call."""
        async with make_runner() as runner:
            with pytest.raises(TypeError, match="an async function or a plain function"):
                runner.spawn(work)  # type: ignore[call-overload]
            assert runner.statistics().spawned == 0

    async def test_async_generator_function_is_refused(self, make_runner: MakeRunner) -> None:
        """An async generator function is not a coroutine function: TypeError."""

        async def agen() -> Any:
            yield 1

        async with make_runner() as runner:
            with pytest.raises(TypeError):
                runner.spawn(agen)

    async def test_wrong_arguments_raise_in_the_caller(self, make_runner: MakeRunner) -> None:
        """Calling the async function with wrong args raises TypeError before anything runs."""
        async with make_runner() as runner:
            with pytest.raises(TypeError):
                runner.spawn(return_value, 1, 2)
            assert runner.statistics().spawned == 0


# --- context -------------------------------------------------------------------------------------


@pytest.mark.anyio
class TestContext:
    async def test_selected_vars_are_carried_others_unset(self, make_runner: MakeRunner) -> None:
        """The task sees the selected and registered vars, and no other var of the spawner."""
        ctxkit.register(tenant)
        request_id.set("r-1")
        tenant.set("acme")
        secret.set("hunter2")
        seen: dict[str, str | None] = {}

        async def work() -> None:
            seen["request_id"] = request_id.get(None)
            seen["tenant"] = tenant.get(None)
            seen["secret"] = secret.get(None)

        async with make_runner() as runner:
            runner.spawn(work, vars=[request_id])
        assert seen == {"request_id": "r-1", "tenant": "acme", "secret": None}

    async def test_context_is_captured_at_spawn_not_at_start(self, make_runner: MakeRunner) -> None:
        """A task waiting for a free slot still runs with its spawner's values at spawn time."""
        release = anyio.Event()
        seen: list[str | None] = []

        async def work() -> None:
            seen.append(request_id.get(None))

        async with make_runner(limit=1) as runner:
            blocker = runner.spawn(wait_for, release)
            request_id.set("at-spawn")
            waiting = runner.spawn(work, vars=[request_id])
            assert runner.statistics().pending == 1
            request_id.set("later")
            release.set()
        assert blocker.outcome == waiting.outcome == "ok"
        assert seen == ["at-spawn"]

    async def test_task_changes_never_reach_the_spawner(self, make_runner: MakeRunner) -> None:
        """Setting a var inside the task leaves the spawner's value alone."""
        request_id.set("spawner")

        async def work() -> None:
            request_id.set("task")

        async with make_runner() as runner:
            runner.spawn(work, vars=(request_id,))
        assert request_id.get() == "spawner"

    async def test_current_task_is_the_handle_inside_only(self, make_runner: MakeRunner) -> None:
        """ctxkit.current_task() is the task's handle inside it and None outside."""
        inside: list[ctxkit.BackgroundTask[Any] | None] = []

        async def work() -> None:
            inside.append(ctxkit.current_task())

        async with make_runner() as runner:
            handle = runner.spawn(work)
        assert inside == [handle]
        assert ctxkit.current_task() is None


# --- detachment ----------------------------------------------------------------------------------


@pytest.mark.anyio
class TestDetached:
    async def test_request_task_group_cancelled_right_after_spawning(
        self, make_runner: MakeRunner, tracer_provider: TracerProvider
    ) -> None:
        """Cancelling the request's task group right after spawn leaves the task running."""
        tracer = tracer_provider.get_tracer("test")
        spawned = anyio.Event()
        release = anyio.Event()
        handles: list[ctxkit.BackgroundTask[None]] = []
        request_trace: list[str] = []
        seen: list[tuple[str | None, str | None]] = []

        async def work() -> None:
            await release.wait()
            seen.append((request_id.get(None), ctxkit.current_trace_id()))

        async def request() -> None:
            request_id.set("r-42")
            with tracer.start_as_current_span("request") as span:
                request_trace.append(hex_id(span.get_span_context()))
                handles.append(runner.spawn(work, vars=[request_id]))
                spawned.set()
                await anyio.sleep_forever()

        async with make_runner() as runner:
            async with anyio.create_task_group() as request_group:
                request_group.start_soon(request)
                await spawned.wait()
                request_group.cancel_scope.cancel()
            assert not handles[0].done()
            release.set()
            assert await handles[0].wait() == "ok"
        assert seen == [("r-42", request_trace[0])]
        assert handles[0].trace_id == request_trace[0]

    async def test_cancel_scope_cancelled_before_any_checkpoint(
        self, make_runner: MakeRunner
    ) -> None:
        """A spawner whose scope is cancelled with no checkpoint after spawn cancels nothing."""
        release = anyio.Event()
        request_id.set("r-7")
        seen: list[str | None] = []

        async def work() -> None:
            await release.wait()
            seen.append(request_id.get(None))

        async with make_runner() as runner:
            with anyio.CancelScope() as request_scope:
                handle = runner.spawn(work, vars=[request_id])
                request_scope.cancel()
                await anyio.sleep_forever()
            assert request_scope.cancelled_caught
            release.set()
        assert handle.outcome == "ok"
        assert seen == ["r-7"]

    async def test_spawner_failing_cancels_nothing(self, make_runner: MakeRunner) -> None:
        """A spawner that raises (ending its task group) leaves its spawned task alone."""
        release = anyio.Event()
        handles: list[ctxkit.BackgroundTask[None]] = []

        async def request() -> None:
            handles.append(runner.spawn(wait_for, release))
            raise Boom("request failed")

        async with make_runner() as runner:
            with pytest.raises(ExceptionGroup) as info:
                async with anyio.create_task_group() as request_group:
                    request_group.start_soon(request)
            assert info.group_contains(Boom)
            assert not handles[0].done()
            release.set()
        assert handles[0].outcome == "ok"

    async def test_thousands_of_dropped_handles_survive_gc(self, make_runner: MakeRunner) -> None:
        """Tasks whose handles are dropped all run to completion across gc.collect()."""
        total = 3000
        release = anyio.Event()
        finished = 0

        async def work() -> None:
            nonlocal finished
            await release.wait()
            finished += 1

        async with make_runner(limit=500) as runner:
            for index in range(total):
                runner.spawn(work)
                if index % 500 == 0:
                    gc.collect()
            gc.collect()
            assert runner.statistics().running == 500
            assert runner.statistics().pending == total - 500
            release.set()
            await runner.drain()
            gc.collect()
        assert finished == total
        assert runner.statistics().ok == total

    @ASYNCIO_ONLY
    async def test_tasks_reachable_only_from_the_runner_survive_gc(
        self, make_runner: MakeRunner
    ) -> None:
        """On asyncio, tasks awaiting futures nobody else holds are kept alive by the runner."""
        total = 2000
        futures: list[weakref.ref[asyncio.Future[None]]] = []
        finished = 0

        async def work() -> None:
            nonlocal finished
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            futures.append(weakref.ref(future))
            await future
            finished += 1

        async with make_runner(limit=None) as runner:
            for _ in range(total):
                runner.spawn(work)
            while len(futures) < total:
                await anyio.lowlevel.checkpoint()
            gc.collect()
            for ref in futures:
                future = ref()
                assert future is not None, "a task was garbage-collected while it waited"
                future.set_result(None)
            del future
        assert finished == total


# --- outcomes ------------------------------------------------------------------------------------


@pytest.mark.anyio
class TestOutcomes:
    async def test_ok(self, make_runner: MakeRunner) -> None:
        """A task that returns ends "ok" with its result; done() turns True."""
        async with make_runner() as runner:
            handle = runner.spawn(return_later, 5)  # suspends once, also with eager tasks
            assert not handle.done()
            assert [handle.outcome] == [None]
            with pytest.raises(ctxkit.TaskNotDoneError, match="has not ended yet"):
                handle.result()
        assert handle.done()
        assert handle.outcome == "ok"
        assert handle.result() == 5
        assert handle.exception() is None
        assert "ok" in repr(handle)

    async def test_error(self, make_runner: MakeRunner) -> None:
        """A task that raises ends "error"; result() re-raises, wait() does not."""
        async with make_runner() as runner:
            handle = runner.spawn(fail, "bad")
            assert await handle.wait() == "error"
        assert isinstance(handle.exception(), Boom)
        with pytest.raises(Boom, match="bad"):
            handle.result()
        assert runner.statistics().error == 1

    async def test_timeout(
        self, make_runner: MakeRunner, span_exporter: InMemorySpanExporter
    ) -> None:
        """A task running past its timeout is cancelled and ends "timeout", span ERROR."""
        never = anyio.Event()
        cleaned = anyio.Event()

        async def work() -> None:
            try:
                await never.wait()
            finally:
                cleaned.set()

        async with make_runner() as runner:
            handle = runner.spawn(work, timeout=0.05, name="slow")
            assert await handle.wait() == "timeout"
        assert cleaned.is_set()
        with pytest.raises(ctxkit.TaskTimeoutError, match="timed out"):
            handle.result()
        (span,) = spans_named(span_exporter, "slow")
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["ctxkit.task.outcome"] == "timeout"
        assert span.attributes["error.type"] == "timeout"
        assert runner.statistics().timeout == 1

    async def test_a_task_that_returns_after_its_deadline_timed_out(
        self, make_runner: MakeRunner
    ) -> None:
        """A task shielded past its timeout that then returns normally ends "timeout" (its
        deadline passed), and one that returns before its deadline ends "ok"."""

        async def shielded(seconds: float) -> str:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(seconds)
            return "late"

        async with make_runner() as runner:
            late = runner.spawn(shielded, 0.2, timeout=0.05)
            in_time = runner.spawn(shielded, 0.0, timeout=30)
            assert await late.wait() == "timeout"
            assert await in_time.wait() == "ok"
        assert in_time.result() == "late"
        with pytest.raises(ctxkit.TaskTimeoutError):
            late.result()
        assert runner.statistics().timeout == 1

    async def test_own_timeout_error_is_an_error_not_a_timeout(
        self, make_runner: MakeRunner
    ) -> None:
        """A TimeoutError raised by the task's code is outcome "error", even with a timeout."""

        async def work() -> None:
            raise TimeoutError("upstream timed out")

        async with make_runner() as runner:
            handle = runner.spawn(work, timeout=30)
        assert handle.outcome == "error"

    async def test_cancel_running(self, make_runner: MakeRunner) -> None:
        """cancel() on a running task cancels it at its await; finally blocks run."""
        started = anyio.Event()
        never = anyio.Event()
        cleaned: list[bool] = []

        async def work() -> None:
            started.set()
            try:
                await never.wait()
            finally:
                cleaned.append(True)

        async with make_runner() as runner:
            handle = runner.spawn(work)
            await started.wait()
            assert handle.cancel() is True
            assert await handle.wait() == "cancelled"
            assert handle.cancel() is False
        assert cleaned == [True]
        assert runner.statistics().cancelled == 1
        with pytest.raises(ctxkit.TaskCancelledError, match="cancelled"):
            handle.result()

    async def test_cancel_before_first_step_closes_the_coroutine(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """cancel() right after spawn ends the task "cancelled" with its coroutine closed.

        Without the eager task factory the task has not run at all; with it, it ran up to its
        first suspension (there is no moment before its first step): cancelled either way.
        """
        async with make_runner() as runner:
            coro = return_later(1)
            handle = runner.spawn(coro)
            assert handle.cancel() is True
            assert await handle.wait() == "cancelled"
            assert is_closed(coro)
            assert_identity(runner.statistics())
        assert runner.statistics().cancelled == 1
        assert ctxkit_records(caplog, logging.WARNING) == []  # not "cancelled from outside"

    async def test_cancel_twice_before_first_step_counts_once(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A second cancel() before the task ran ends it at once; it is counted once."""
        async with make_runner() as runner:
            coro = return_later(1)
            handle = runner.spawn(coro)
            handle.cancel()
            handle.cancel()
            assert await handle.wait() == "cancelled"
            assert is_closed(coro)
            await anyio.sleep(0.01)  # any late report of the same end would land by now
            assert_identity(runner.statistics())
            assert runner.statistics().cancelled == 1
        assert ctxkit_records(caplog, logging.WARNING) == []

    async def test_cancel_pending_closes_the_coroutine(self, make_runner: MakeRunner) -> None:
        """cancel() on a pending task ends it at once, "cancelled", coroutine closed."""
        release = anyio.Event()
        async with make_runner(limit=1) as runner:
            runner.spawn(wait_for, release)
            coro = return_value(1)
            handle = runner.spawn(coro)
            assert handle.cancel() is True
            assert handle.outcome == "cancelled"
            assert is_closed(coro)
            assert runner.statistics().pending == 0
            release.set()

    async def test_cancel_done_task_is_a_no_op(self, make_runner: MakeRunner) -> None:
        """cancel() after the end returns False and changes nothing."""
        async with make_runner() as runner:
            handle = runner.spawn(return_value, 1)
        assert handle.cancel() is False
        assert handle.outcome == "ok"
        assert runner.statistics().cancelled == 0

    async def test_cancelling_a_waiter_cancels_no_task(self, make_runner: MakeRunner) -> None:
        """A cancelled await handle.wait() leaves the task running."""
        release = anyio.Event()
        async with make_runner() as runner:
            handle = runner.spawn(wait_for, release)
            with anyio.move_on_after(0) as scope:
                await handle.wait()
            assert scope.cancelled_caught
            assert not handle.done()
            release.set()
        assert handle.outcome == "ok"

    async def test_statistics_identity_after_randomized_mix(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """After thousands of ok/error/timeout/cancel tasks the counts match exactly."""
        caplog.set_level(logging.CRITICAL, logger="ctxkit")
        rng = random.Random(20240611)
        release = anyio.Event()
        never = anyio.Event()
        expected = dict.fromkeys(("ok", "error", "timeout", "cancelled"), 0)
        to_cancel: list[ctxkit.BackgroundTask[None]] = []

        async def ok() -> None:
            await release.wait()

        async def error() -> None:
            await release.wait()
            raise Boom("random")

        async with make_runner(limit=50, pending_limit=None) as runner:
            for index in range(2000):
                kind = rng.choice(("ok", "error", "timeout", "cancelled"))
                expected[kind] += 1
                if kind == "ok":
                    runner.spawn(ok)
                elif kind == "error":
                    runner.spawn(error)
                elif kind == "timeout":
                    runner.spawn(wait_for, never, timeout=0.05)
                else:
                    to_cancel.append(runner.spawn(wait_for, never))
                if index % 97 == 0:
                    assert_identity(runner.statistics())
                    await anyio.lowlevel.checkpoint()
                    # cancel some now (running or pending), the rest later
                    while len(to_cancel) > 3:
                        assert to_cancel.pop(rng.randrange(len(to_cancel))).cancel()
                    assert_identity(runner.statistics())
            release.set()
            for handle in to_cancel:
                assert handle.cancel()
                assert_identity(runner.statistics())
            await runner.drain()
            stats = runner.statistics()
        assert_identity(stats)
        assert (stats.ok, stats.error, stats.timeout, stats.cancelled) == (
            expected["ok"],
            expected["error"],
            expected["timeout"],
            expected["cancelled"],
        )
        assert stats.spawned == 2000
        assert stats.running == stats.pending == stats.rejected == 0
        assert all(v > 400 for v in expected.values())


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.anyio
class TestErrors:
    async def test_error_is_recorded_on_the_span(
        self, make_runner: MakeRunner, span_exporter: InMemorySpanExporter
    ) -> None:
        """A failing task's span has status ERROR, an exception event and error.type."""
        async with make_runner() as runner:
            runner.spawn(fail, "broken", name="job")
        (span,) = spans_named(span_exporter, "job")
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "Boom: broken"
        assert span.attributes is not None
        assert span.attributes["error.type"] == "Boom"
        assert span.attributes["ctxkit.task.outcome"] == "error"
        (event,) = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.message"] == "broken"

    async def test_error_is_logged_once_with_traceback_and_trace_id(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The ctxkit logger logs one ERROR with the exception's traceback and the trace id."""
        async with make_runner() as runner:
            handle = runner.spawn(fail, "logged", name="job")
        (record,) = ctxkit_records(caplog, logging.ERROR)
        assert record.exc_info is not None
        assert record.exc_info[1] is handle.exception()
        assert record.exc_info[2] is not None
        assert handle.trace_id is not None
        assert handle.trace_id in record.getMessage()
        assert "'job'" in record.getMessage()

    async def test_on_error_gets_a_task_failure_in_the_task_context(
        self, make_runner: MakeRunner
    ) -> None:
        """on_error gets TaskFailure(task, exception, name, trace_id), in the task's context."""
        failures: list[tuple[ctxkit.TaskFailure, str | None, str | None]] = []

        def on_error(failure: ctxkit.TaskFailure) -> None:
            failures.append((failure, ctxkit.current_trace_id(), request_id.get(None)))

        request_id.set("r-9")
        async with make_runner(on_error=on_error) as runner:
            handle = runner.spawn(fail, "hooked", name="job", vars=[request_id])
        ((failure, trace_id, rid),) = failures
        assert failure.task is handle
        assert failure.exception is handle.exception()
        assert failure.name == "job"
        assert failure.trace_id == handle.trace_id == trace_id
        assert rid == "r-9"

    async def test_exception_in_on_error_is_logged_not_propagated(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A hook that raises is logged on ctxkit; the runner and other tasks go on."""

        def on_error(failure: ctxkit.TaskFailure) -> None:
            raise RuntimeError("hook broke")

        async with make_runner(on_error=on_error) as runner:
            first = runner.spawn(fail, "one")
            second = runner.spawn(return_value, 2)
        assert first.outcome == "error"
        assert second.outcome == "ok"
        hook_records = [
            r for r in ctxkit_records(caplog, logging.ERROR) if "on_error" in r.getMessage()
        ]
        assert len(hook_records) == 1
        assert hook_records[0].exc_info is not None
        assert str(hook_records[0].exc_info[1]) == "hook broke"

    @ASYNCIO_ONLY
    async def test_no_task_exception_was_never_retrieved(self, make_runner: MakeRunner) -> None:
        """On asyncio a failed task never reaches the loop's exception handler, even after gc."""
        with loop_errors() as errors:
            async with make_runner() as runner:
                for index in range(20):
                    runner.spawn(fail, f"e{index}")
            gc.collect()
        assert errors == []
        assert runner.statistics().error == 20

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    @pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
    def test_system_exit_and_keyboard_interrupt_are_reported_then_propagate(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        monkeypatch: pytest.MonkeyPatch,
        backend: str,
        exc_type: type[BaseException],
    ) -> None:
        """SystemExit/KeyboardInterrupt in a task is reported, then ends the run as itself."""
        handles: list[ctxkit.BackgroundTask[None]] = []
        loop_errors: list[dict[str, Any]] = []
        messages = MessageHandler()
        ctxkit_logger = logging.getLogger("ctxkit")
        # keep no LogRecord (its exc_info would keep the asyncio task alive past the gc below)
        monkeypatch.setattr(ctxkit_logger, "propagate", False)
        monkeypatch.setattr(ctxkit_logger, "handlers", [messages])

        async def work() -> None:
            await anyio.lowlevel.checkpoint()  # raised in the loop, not in an eager first step
            raise exc_type(3)

        async def main() -> None:
            if backend == "asyncio":
                loop = asyncio.get_running_loop()
                loop.set_exception_handler(lambda _, context: loop_errors.append(context))
            async with ctxkit.BackgroundRunner(tracer_provider=tracer_provider) as runner:
                handles.append(runner.spawn(work, name="exit"))
                await anyio.sleep_forever()

        with pytest.raises(exc_type) as info:
            anyio.run(main, backend=backend)
        assert type(info.value) is exc_type
        assert handles[0].outcome == "error"
        assert handles[0].exception() is info.value
        trace_id = handles[0].trace_id
        (span,) = spans_named(span_exporter, "exit")
        assert span.status.status_code is StatusCode.ERROR
        del info
        handles.clear()
        gc.collect()
        assert loop_errors == []  # no "Task exception was never retrieved"
        assert [m for m in messages.messages if "failed" in m] == [
            f"background task 'exit' failed: {exc_type.__name__}: 3 [trace_id={trace_id}]"
        ]


# --- spans ---------------------------------------------------------------------------------------


@pytest.mark.anyio
class TestSpans:
    async def test_task_span_name_kind_attributes(
        self, make_runner: MakeRunner, span_exporter: InMemorySpanExporter
    ) -> None:
        """The task span is named after the coroutine, INTERNAL, with the ctxkit attributes."""
        async with make_runner() as runner:
            runner.spawn(return_value, 1)
            runner.spawn(return_value, 2, name="custom")
        (default,) = spans_named(span_exporter, "return_value")
        (custom,) = spans_named(span_exporter, "custom")
        for span, name in ((default, "return_value"), (custom, "custom")):
            assert span.kind is SpanKind.INTERNAL
            assert span.status.status_code is StatusCode.UNSET
            assert dict(span.attributes or {}) == {
                "ctxkit.async": True,
                "ctxkit.task.name": name,
                "ctxkit.task.outcome": "ok",
            }

    async def test_task_span_is_current_and_task_spans_nest(
        self,
        make_runner: MakeRunner,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """Inside the task the task span is current; spans it starts are its children."""
        tracer = tracer_provider.get_tracer("test")

        async def work() -> None:
            with tracer.start_as_current_span("inner"):
                pass

        async with make_runner() as runner:
            handle = runner.spawn(work, name="outer")
        (outer,) = spans_named(span_exporter, "outer")
        (inner,) = spans_named(span_exporter, "inner")
        assert inner.parent is not None
        assert outer.context is not None
        assert inner.parent.span_id == outer.context.span_id
        assert handle.span_context == outer.context
        assert handle.trace_id == hex_id(outer.context)

    async def test_child_propagation(
        self,
        make_runner: MakeRunner,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """propagation="child": the task span is a child of the spawner's span, same trace."""
        tracer = tracer_provider.get_tracer("test")
        seen: list[str | None] = []

        async def work() -> None:
            seen.append(ctxkit.current_trace_id())

        async with make_runner() as runner:
            with tracer.start_as_current_span("request") as request:
                runner.spawn(work, name="task")
        (task_span,) = spans_named(span_exporter, "task")
        assert task_span.parent is not None
        assert task_span.parent.span_id == request.get_span_context().span_id
        assert seen == [hex_id(request.get_span_context())]
        assert not task_span.links

    async def test_link_propagation(
        self,
        make_runner: MakeRunner,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """propagation="link": a new trace whose task span links to the spawner's span."""
        tracer = tracer_provider.get_tracer("test")
        seen: list[str | None] = []

        async def work() -> None:
            seen.append(ctxkit.current_trace_id())

        async with make_runner() as runner:
            with tracer.start_as_current_span("request") as request:
                handle = runner.spawn(work, name="task", propagation="link")
        (task_span,) = spans_named(span_exporter, "task")
        assert task_span.parent is None
        assert hex_id(task_span.context) != hex_id(request.get_span_context())
        assert [link.context for link in task_span.links] == [request.get_span_context()]
        assert seen == [handle.trace_id] == [hex_id(task_span.context)]

    async def test_none_propagation(
        self,
        make_runner: MakeRunner,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """propagation="none": a new trace, no parent and no link."""
        tracer = tracer_provider.get_tracer("test")
        async with make_runner() as runner:
            with tracer.start_as_current_span("request") as request:
                handle = runner.spawn(return_value, 1, name="task", propagation="none")
        (task_span,) = spans_named(span_exporter, "task")
        assert task_span.parent is None
        assert not task_span.links
        assert handle.trace_id == hex_id(task_span.context) != hex_id(request.get_span_context())

    async def test_span_false_keeps_the_spawner_trace(
        self,
        make_runner: MakeRunner,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """span=False: no task span; the task's spans are children of the spawner's span."""
        tracer = tracer_provider.get_tracer("test")
        seen: list[str | None] = []

        async def work() -> None:
            seen.append(ctxkit.current_trace_id())
            with tracer.start_as_current_span("inner"):
                pass

        async with make_runner() as runner:
            with tracer.start_as_current_span("request") as request:
                handle = runner.spawn(work, name="task", span=False)
        assert spans_named(span_exporter, "task") == []
        (inner,) = spans_named(span_exporter, "inner")
        assert inner.parent is not None
        assert inner.parent.span_id == request.get_span_context().span_id
        assert seen == [handle.trace_id] == [hex_id(request.get_span_context())]
        assert handle.span_context == trace.INVALID_SPAN_CONTEXT

    async def test_span_false_without_a_span_gets_a_fake_trace_id(
        self, make_runner: MakeRunner, span_exporter: InMemorySpanExporter
    ) -> None:
        """span=False with no current span: the task carries a fake id, also on the handle."""
        seen: list[str | None] = []

        async def work() -> None:
            seen.append(ctxkit.current_trace_id())

        async with make_runner() as runner:
            handle = runner.spawn(work, span=False)
        assert handle.trace_id is not None
        assert len(handle.trace_id) == 32
        assert seen == [handle.trace_id]
        assert span_exporter.get_finished_spans() == ()

    async def test_root_task_span_without_a_spawner_span(
        self, make_runner: MakeRunner, span_exporter: InMemorySpanExporter
    ) -> None:
        """With no current span, the task span starts a trace of its own."""
        async with make_runner() as runner:
            handle = runner.spawn(return_value, 1, name="task")
        (task_span,) = spans_named(span_exporter, "task")
        assert task_span.parent is None
        assert handle.trace_id == hex_id(task_span.context)

    async def test_waiting_time_is_marked_on_the_span(
        self, make_runner: MakeRunner, span_exporter: InMemorySpanExporter
    ) -> None:
        """Only a task that waited for a slot gets a ctxkit.task.started event on its span."""
        release = anyio.Event()
        async with make_runner(limit=1) as runner:
            runner.spawn(wait_for, release, name="first")
            runner.spawn(return_value, 1, name="second")
            assert runner.statistics().pending == 1
            release.set()
        (first,) = spans_named(span_exporter, "first")
        (second,) = spans_named(span_exporter, "second")
        assert first.events == ()
        assert [e.name for e in second.events] == ["ctxkit.task.started"]
        attributes = second.events[0].attributes
        assert attributes is not None
        assert float(attributes["ctxkit.task.wait_s"]) > 0  # type: ignore[arg-type]


# --- limits --------------------------------------------------------------------------------------


@pytest.mark.anyio
class TestLimits:
    async def test_at_most_limit_run_at_once(self, make_runner: MakeRunner) -> None:
        """With limit=3 three tasks run at once; the others wait until a slot frees up."""
        release = anyio.Event()
        running = 0
        peak = 0

        async def work() -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await release.wait()
            await anyio.lowlevel.checkpoint()
            running -= 1

        async with make_runner(limit=3) as runner:
            for _ in range(10):
                runner.spawn(work)
            stats = runner.statistics()
            assert (stats.running, stats.pending) == (3, 7)
            assert_identity(stats)
            release.set()
        assert peak == 3
        assert runner.statistics().ok == 10

    async def test_pending_tasks_start_in_spawn_order(self, make_runner: MakeRunner) -> None:
        """Waiting tasks start first in, first out."""
        release = anyio.Event()
        order: list[int] = []

        async def work(index: int) -> None:
            order.append(index)

        async with make_runner(limit=1) as runner:
            runner.spawn(wait_for, release)
            for index in range(20):
                runner.spawn(work, index)
            release.set()
        assert order == list(range(20))

    async def test_no_limit(self, make_runner: MakeRunner) -> None:
        """limit=None starts every task at once; none waits."""
        release = anyio.Event()
        async with make_runner(limit=None, pending_limit=0) as runner:
            for _ in range(300):
                runner.spawn(wait_for, release)
            assert (runner.statistics().running, runner.statistics().pending) == (300, 0)
            release.set()

    async def test_full_runner_rejects_and_closes_the_coroutine(
        self, make_runner: MakeRunner
    ) -> None:
        """Past limit + pending_limit, spawn raises RunnerFullError, counted as rejected."""
        release = anyio.Event()
        async with make_runner(limit=1, pending_limit=2) as runner:
            for _ in range(3):
                runner.spawn(wait_for, release)
            coro = return_value(1)
            with pytest.raises(ctxkit.RunnerFullError, match="is full"):
                runner.spawn(coro)
            assert is_closed(coro)
            with pytest.raises(RuntimeError):
                runner.spawn(return_value, 2)
            stats = runner.statistics()
            assert (stats.spawned, stats.running, stats.pending, stats.rejected) == (3, 1, 2, 2)
            assert_identity(stats)
            release.set()
        assert runner.statistics().ok == 3

    async def test_pending_limit_zero(self, make_runner: MakeRunner) -> None:
        """pending_limit=0: when limit tasks run, the next spawn is rejected."""
        release = anyio.Event()
        async with make_runner(limit=1, pending_limit=0) as runner:
            runner.spawn(wait_for, release)
            with pytest.raises(ctxkit.RunnerFullError):
                runner.spawn(return_value, 1)
            release.set()
        assert runner.statistics().rejected == 1

    async def test_cancelled_pending_frees_a_queue_place(self, make_runner: MakeRunner) -> None:
        """Cancelling a pending task makes room for one more spawn."""
        release = anyio.Event()
        async with make_runner(limit=1, pending_limit=1) as runner:
            runner.spawn(wait_for, release)
            pending = runner.spawn(wait_for, release)
            with pytest.raises(ctxkit.RunnerFullError):
                runner.spawn(wait_for, release)
            pending.cancel()
            replacement = runner.spawn(wait_for, release)
            stats = runner.statistics()
            assert (stats.running, stats.pending, stats.cancelled, stats.rejected) == (1, 1, 1, 1)
            assert_identity(stats)
            release.set()
        assert replacement.outcome == "ok"
        assert pending.outcome == "cancelled"

    async def test_cancelled_running_starts_the_next(self, make_runner: MakeRunner) -> None:
        """Cancelling a running task frees its slot for the first pending one."""
        never = anyio.Event()
        second_started = anyio.Event()

        async def second() -> None:
            second_started.set()

        async with make_runner(limit=1) as runner:
            first = runner.spawn(wait_for, never)
            runner.spawn(second)
            await anyio.lowlevel.checkpoint()
            assert runner.statistics().pending == 1
            first.cancel()
            await second_started.wait()
        assert first.outcome == "cancelled"
        assert_identity(runner.statistics())

    async def test_cancellation_mix_keeps_the_identity(self, make_runner: MakeRunner) -> None:
        """Cancelling running, just-started and pending tasks keeps the counts consistent."""
        never = anyio.Event()
        async with make_runner(limit=4, pending_limit=8) as runner:
            handles = [runner.spawn(wait_for, never) for _ in range(12)]
            with pytest.raises(ctxkit.RunnerFullError):
                runner.spawn(wait_for, never)
            handles[0].cancel()  # running, not stepped yet
            handles[11].cancel()  # pending
            assert_identity(runner.statistics())
            await anyio.lowlevel.checkpoint()
            handles[1].cancel()  # running
            handles[5].cancel()  # pending
            assert_identity(runner.statistics())
            await handles[1].wait()
            assert_identity(runner.statistics())
            for handle in handles:
                handle.cancel()
            await runner.drain()
            stats = runner.statistics()
        assert_identity(stats)
        assert (stats.spawned, stats.cancelled, stats.rejected) == (12, 12, 1)
        assert all(h.outcome == "cancelled" for h in handles)


# --- shutdown ------------------------------------------------------------------------------------


@pytest.mark.anyio
class TestShutdown:
    async def test_exit_drains_every_task(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Leaving the block waits for running and pending tasks; an INFO line sums up."""
        caplog.set_level(logging.INFO, logger="ctxkit")
        finished: list[int] = []

        async def work(index: int) -> None:
            await anyio.lowlevel.checkpoint()
            finished.append(index)

        async with make_runner(limit=2) as runner:
            for index in range(6):
                runner.spawn(work, index)
        assert sorted(finished) == list(range(6))
        assert runner.closed
        (summary,) = ctxkit_records(caplog, logging.INFO)
        assert "every task finished" in summary.getMessage()
        assert "ok=6" in summary.getMessage()

    async def test_spawn_after_exit_raises_closed(self, make_runner: MakeRunner) -> None:
        """spawn after the block raises RunnerClosedError and closes the coroutine."""
        async with make_runner() as runner:
            pass
        coro = return_value(1)
        with pytest.raises(ctxkit.RunnerClosedError, match="closed"):
            runner.spawn(coro)
        assert is_closed(coro)
        assert not runner.accepting

    async def test_drain_catches_tasks_spawned_during_it(self, make_runner: MakeRunner) -> None:
        """Tasks spawned by tasks during the drain run; spawns from outside are refused."""
        go = anyio.Event()
        done: list[str] = []
        refused: list[type[BaseException]] = []

        async def grandchild() -> None:
            done.append("grandchild")

        async def child() -> None:
            await anyio.lowlevel.checkpoint()
            ctxkit.spawn(grandchild)
            done.append("child")

        async def via_ctxkit() -> None:
            done.append("via ctxkit.spawn")

        async def parent() -> None:
            await go.wait()
            runner.spawn(child)
            ctxkit.spawn(via_ctxkit)
            done.append("parent")

        async def outside() -> None:
            try:
                assert not runner.accepting  # the block has been left: draining
                for spawn in (runner.spawn, ctxkit.spawn):
                    coro = return_value(1)
                    try:
                        spawn(coro)
                    except ctxkit.RunnerClosedError as exc:
                        refused.append(type(exc))
                    assert is_closed(coro)
            finally:
                go.set()

        async with anyio.create_task_group() as app, make_runner() as runner:
            runner.spawn(parent)
            app.start_soon(outside)
        assert sorted(done) == ["child", "grandchild", "parent", "via ctxkit.spawn"]
        assert refused == [ctxkit.RunnerClosedError, ctxkit.RunnerClosedError]
        stats = runner.statistics()
        assert (stats.spawned, stats.ok, stats.running, stats.pending) == (4, 4, 0, 0)

    async def test_drain_timeout_cancels_the_rest_and_logs_a_summary(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """After drain_timeout, running and pending tasks are cancelled; one WARNING names them."""
        never = anyio.Event()
        coros = [wait_for(never) for _ in range(3)]
        async with make_runner(limit=1, drain_timeout=0.05) as runner:
            running = runner.spawn(coros[0], name="stuck")
            pending = [runner.spawn(coro, name=f"queued{i}") for i, coro in enumerate(coros[1:])]
        assert running.outcome == "cancelled"
        assert [h.outcome for h in pending] == ["cancelled", "cancelled"]
        assert all(is_closed(coro) for coro in coros[1:])
        stats = runner.statistics()
        assert (stats.running, stats.pending, stats.cancelled) == (0, 0, 3)
        (summary,) = [
            r for r in ctxkit_records(caplog, logging.WARNING) if "shut down" in r.getMessage()
        ]
        message = summary.getMessage()
        assert "drain_timeout=0.05s passed" in message
        assert "cancelled 1 running and 2 pending tasks (stuck, queued0, queued1)" in message
        # cancelled by the runner itself: no per-task "cancelled from outside" warning
        assert not [r for r in caplog.records if "from outside" in r.getMessage()]

    async def test_summary_names_at_most_ten_tasks(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The shutdown summary lists ten task names and counts the rest."""
        never = anyio.Event()
        async with make_runner(drain_timeout=0) as runner:
            for index in range(13):
                runner.spawn(wait_for, never, name=f"t{index}")
        (summary,) = ctxkit_records(caplog, logging.WARNING)
        assert ", and 3 more" in summary.getMessage()

    async def test_body_error_still_drains_and_propagates_unchanged(
        self, make_runner: MakeRunner
    ) -> None:
        """An exception leaving the block propagates as it is, after the drain."""
        release = anyio.Event()
        with pytest.raises(Boom, match="body") as info:  # noqa: PT012
            async with make_runner() as runner:
                handle = runner.spawn(wait_for, release)
                release.set()
                raise Boom("body")
        assert type(info.value) is Boom
        assert handle.outcome == "ok"

    async def test_cancelled_body_cancels_tasks_at_once(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """When the block is left by cancellation, the drain is skipped and tasks cancelled."""
        started = anyio.Event()
        never = anyio.Event()

        async def work() -> None:
            started.set()
            await never.wait()

        with anyio.CancelScope() as scope:
            async with make_runner(limit=1) as runner:
                running = runner.spawn(work)
                pending = runner.spawn(return_value, 1)
                await started.wait()
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert (running.outcome, pending.outcome) == ("cancelled", "cancelled")
        assert_identity(runner.statistics())
        assert runner.statistics().cancelled == 2
        assert any(
            "the task holding the runner was cancelled" in r.getMessage()
            for r in ctxkit_records(caplog, logging.WARNING)
        )

    async def test_drain_method_waits_and_keeps_accepting(self, make_runner: MakeRunner) -> None:
        """drain() waits for every task (also ones spawned meanwhile); the runner stays open."""
        finished: list[str] = []

        async def second() -> None:
            await anyio.lowlevel.checkpoint()  # also with eager tasks, after "first"
            finished.append("second")

        async def first() -> None:
            await anyio.lowlevel.checkpoint()
            runner.spawn(second)
            finished.append("first")

        async with make_runner() as runner:
            runner.spawn(first)
            await runner.drain()
            assert finished == ["first", "second"]
            assert runner.accepting
            await runner.drain()  # nothing to wait for

    async def test_drain_timeout_raises_and_tasks_go_on(self, make_runner: MakeRunner) -> None:
        """drain(timeout) raises TimeoutError when tasks remain; they keep running."""
        release = anyio.Event()
        async with make_runner() as runner:
            handle = runner.spawn(wait_for, release)
            with pytest.raises(TimeoutError):
                await runner.drain(0.01)
            assert not handle.done()
            release.set()
        assert handle.outcome == "ok"

    @pytest.mark.parametrize("timeout", [-1, "1"])
    async def test_drain_bad_timeout(self, make_runner: MakeRunner, timeout: object) -> None:
        """drain() rejects a negative or non-number timeout."""
        async with make_runner() as runner:
            with pytest.raises((TypeError, ValueError)):
                await runner.drain(timeout)  # type: ignore[arg-type]

    async def test_tasks_spawned_during_the_cancel_phase_are_refused(
        self, make_runner: MakeRunner
    ) -> None:
        """A task cancelled at shutdown cannot spawn new work from its finally block."""
        never = anyio.Event()
        refused: list[BaseException] = []
        coros: list[Coroutine[Any, Any, Any]] = []

        async def work() -> None:
            try:
                await never.wait()
            finally:
                coro = return_value(1)
                coros.append(coro)
                try:
                    runner.spawn(coro)
                except ctxkit.RunnerClosedError as exc:
                    refused.append(exc)

        async with make_runner(drain_timeout=0) as runner:
            runner.spawn(work)
            await anyio.lowlevel.checkpoint()
        assert len(refused) == 1
        assert is_closed(coros[0])
        stats = runner.statistics()
        assert (stats.spawned, stats.running, stats.pending, stats.cancelled) == (1, 0, 0, 1)

    async def test_task_ignoring_cancellation_is_reported(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A task that outlives cancel_timeout is named in the summary as still running."""
        never = anyio.Event()
        release = anyio.Event()

        async def stubborn() -> None:
            try:
                await never.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    await release.wait()

        async with make_runner(drain_timeout=0, cancel_timeout=0.02) as runner:
            handle = runner.spawn(stubborn)
            await anyio.lowlevel.checkpoint()
        (summary,) = ctxkit_records(caplog, logging.WARNING)
        assert "1 ignored cancellation and are still running" in summary.getMessage()
        assert not handle.done()
        assert_identity(runner.statistics())
        release.set()
        # It was cancelled; that it ran its cleanup to the end does not make it "ok".
        assert await handle.wait() == "cancelled"
        assert_identity(runner.statistics())
