"""Tests for background tasks that run a task group of their own (a nursery, a TaskGroup).

Cancelling such a task, by ``cancel()``, by its ``timeout`` or by the runner's shutdown,
cancels the group's children too, and the task ends "cancelled" or "timeout" however the
group reports the cancellation (on trio, a nursery raises a group of ``Cancelled``): never
"error", and the runner's block raises nothing. A child that fails makes the task fail with
the child's exception, with no cancellation in what is reported.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import weakref
from collections.abc import Callable, Coroutine

import anyio
import pytest
import trio

import ctxkit

from ._support import TRIO_ONLY, MakeRunner, assert_identity

pytestmark = pytest.mark.anyio

WAITERS = 3  # two children and the group's own body

Child = Callable[[], Coroutine[object, object, None]]


class Waiters:
    """The tasks of one group: each waits forever; ``started`` is set once all of them run."""

    def __init__(self, *, fail_on_cancel: bool = False) -> None:
        self.started = anyio.Event()
        self.running = 0
        self.cleaned = 0
        self.fail_on_cancel = fail_on_cancel

    async def wait_forever(self) -> None:
        self.running += 1
        if self.running == WAITERS:
            self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.cleaned += 1
            if self.fail_on_cancel and self.cleaned == 1:
                raise ValueError("cleanup failed")

    async def raise_once_started(self, error: BaseException) -> None:
        """Raise ``error`` once the other waiters run (this one stands in for the last)."""
        self.running += 1
        if self.running == WAITERS:
            self.started.set()
        await self.started.wait()
        raise error


async def trio_nursery(waiters: Waiters, child: Child) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiters.wait_forever)
        nursery.start_soon(child)
        await waiters.wait_forever()


async def nested_trio_nurseries(waiters: Waiters, child: Child) -> None:
    async def inner() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            await waiters.wait_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inner)
        await waiters.wait_forever()


async def anyio_task_group(waiters: Waiters, child: Child) -> None:
    async with anyio.create_task_group() as group:
        group.start_soon(waiters.wait_forever)
        group.start_soon(child)
        await waiters.wait_forever()


async def asyncio_task_group(waiters: Waiters, child: Child) -> None:
    async with asyncio.TaskGroup() as group:
        group.create_task(waiters.wait_forever())
        group.create_task(child())
        await waiters.wait_forever()


Grouped = Callable[[Waiters, Child], Coroutine[object, object, None]]

#: Each kind of group on the backends it runs on (asyncio.TaskGroup and nurseries on one only).
GROUPS = pytest.mark.parametrize(
    ("anyio_backend", "grouped"),
    [
        pytest.param("trio", trio_nursery, id="trio-nursery"),
        pytest.param("trio", nested_trio_nurseries, id="trio-nested-nurseries"),
        pytest.param("asyncio", anyio_task_group, id="asyncio-anyio-task-group"),
        pytest.param("trio", anyio_task_group, id="trio-anyio-task-group"),
        pytest.param("asyncio", asyncio_task_group, id="asyncio-TaskGroup"),
    ],
)

#: How the task is cancelled, and the outcome that gives.
CANCELLERS = pytest.mark.parametrize(
    ("canceller", "outcome"),
    [("cancel", "cancelled"), ("timeout", "timeout"), ("shutdown", "cancelled")],
)


async def run_until_cancelled(
    make_runner: MakeRunner,
    grouped: Grouped,
    waiters: Waiters,
    canceller: str,
    failures: list[ctxkit.TaskFailure],
) -> tuple[ctxkit.BackgroundTask[None], ctxkit.RunnerStatistics]:
    """Run ``grouped`` as a task, cancel it by ``canceller`` once its group runs, leave the block.

    Leaving the block raising anything fails the calling test.
    """
    async with make_runner(
        on_error=failures.append, drain_timeout=0.01 if canceller == "shutdown" else 10.0
    ) as runner:
        handle = runner.spawn(
            grouped,
            waiters,
            waiters.wait_forever,
            name="grouped",
            timeout=0.05 if canceller == "timeout" else None,
        )
        if canceller == "timeout":
            await handle.wait()  # (waiting for `started` could outlast a deadline passed first)
        else:
            await waiters.started.wait()
        if canceller == "cancel":
            assert handle.cancel() is True
            await handle.wait()
        # "shutdown": leaving the block cancels it once drain_timeout has passed
    return handle, runner.statistics()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ctxkit" and r.levelno >= logging.ERROR]


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions in ``exc``, nested groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


class TestCancelledTaskWithAGroup:
    @GROUPS
    @CANCELLERS
    async def test_ends_cancelled_or_timeout_never_error(
        self,
        make_runner: MakeRunner,
        caplog: pytest.LogCaptureFixture,
        grouped: Grouped,
        canceller: str,
        outcome: str,
    ) -> None:
        """A task whose group's children wait forever, cancelled by cancel(), its timeout or the
        runner's shutdown, ends "cancelled" ("timeout"), its children cancelled too: no ERROR
        log, no on_error call, nothing raised from the runner's block, counted once."""
        waiters = Waiters()
        failures: list[ctxkit.TaskFailure] = []
        handle, stats = await run_until_cancelled(
            make_runner, grouped, waiters, canceller, failures
        )
        assert handle.outcome == outcome
        with pytest.raises(
            ctxkit.TaskTimeoutError if outcome == "timeout" else ctxkit.TaskCancelledError
        ):
            handle.result()
        assert waiters.running == waiters.cleaned == WAITERS
        assert errors_logged(caplog) == []
        assert failures == []
        assert_identity(stats)
        assert (stats.spawned, stats.running, stats.pending, stats.error) == (1, 0, 0, 0)
        assert (stats.cancelled, stats.timeout) == ((0, 1) if outcome == "timeout" else (1, 0))

    @GROUPS
    @CANCELLERS
    async def test_a_child_failing_as_it_is_cancelled_makes_the_task_fail(
        self,
        make_runner: MakeRunner,
        caplog: pytest.LogCaptureFixture,
        grouped: Grouped,
        canceller: str,
        outcome: str,
    ) -> None:
        """A child raising ValueError while the task is cancelled makes it end "error", with the
        ValueError and no cancellation reported (log, on_error), and the block raises nothing."""
        waiters = Waiters(fail_on_cancel=True)
        failures: list[ctxkit.TaskFailure] = []
        handle, stats = await run_until_cancelled(
            make_runner, grouped, waiters, canceller, failures
        )
        assert handle.outcome == "error"
        error = handle.exception()
        assert error is not None
        assert [type(leaf) for leaf in leaves(error)] == [ValueError]
        assert waiters.cleaned == WAITERS
        (record,) = errors_logged(caplog)
        assert record.exc_info is not None
        assert record.exc_info[1] is error
        assert [failure.exception for failure in failures] == [error]
        assert_identity(stats)
        assert (stats.spawned, stats.error, stats.cancelled, stats.timeout) == (1, 1, 0, 0)

    @TRIO_ONLY
    async def test_a_cancelled_nursery_leaves_no_reference_cycle(
        self, make_runner: MakeRunner
    ) -> None:
        """The group of Cancelled a nursery raises does not keep the task's coroutine alive
        through the backend's frame until the cyclic GC runs."""
        waiters = Waiters()
        coro = trio_nursery(waiters, waiters.wait_forever)
        freed = weakref.ref(coro)
        gc.collect()
        gc.disable()
        try:
            async with make_runner() as runner:
                handle = runner.spawn(coro, span=False)
                del coro
                await waiters.started.wait()
                handle.cancel()
                assert await handle.wait() == "cancelled"
                for _ in range(3):
                    await anyio.lowlevel.checkpoint()
                assert freed() is None, gc.get_referrers(freed())
        finally:
            gc.enable()


class TestFailingChild:
    @GROUPS
    async def test_a_failing_child_makes_the_task_fail_with_its_exception(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture, grouped: Grouped
    ) -> None:
        """A child raising ValueError while the others wait ends the task "error" with that
        ValueError reported once (log, on_error) and no cancellation; the block raises nothing."""
        waiters = Waiters()
        failures: list[ctxkit.TaskFailure] = []
        async with make_runner(on_error=failures.append) as runner:
            child = functools.partial(waiters.raise_once_started, ValueError("child failed"))
            handle = runner.spawn(grouped, waiters, child)
            assert await handle.wait() == "error"
        error = handle.exception()
        assert error is not None
        assert [type(leaf) for leaf in leaves(error)] == [ValueError]
        assert str(leaves(error)[0]) == "child failed"
        assert waiters.cleaned == WAITERS - 1  # the failing child has no cleanup
        (record,) = errors_logged(caplog)
        assert record.exc_info is not None
        assert record.exc_info[1] is error
        assert [failure.exception for failure in failures] == [error]
        stats = runner.statistics()
        assert_identity(stats)
        assert (stats.spawned, stats.error, stats.cancelled, stats.timeout) == (1, 1, 0, 0)


class TestFatalChild:
    @pytest.mark.parametrize("while_cancelled", [False, True])
    def test_a_system_exit_in_a_child_is_reported_then_ends_the_block(
        self, make_runner: MakeRunner, caplog: pytest.LogCaptureFixture, while_cancelled: bool
    ) -> None:
        """A SystemExit raised in a nursery's child (also while the task is being cancelled)
        ends the task "error", then the runner's block and the run, as the group holding it,
        with no Cancelled in it."""
        handles: list[ctxkit.BackgroundTask[None]] = []
        waiters = Waiters()

        async def exit_child() -> None:
            if while_cancelled:
                try:
                    await waiters.wait_forever()
                finally:
                    raise SystemExit(3)
            await waiters.raise_once_started(SystemExit(3))

        async def main() -> None:
            async with make_runner() as runner:
                handles.append(runner.spawn(trio_nursery, waiters, exit_child))
                await waiters.started.wait()
                if while_cancelled:
                    handles[0].cancel()
                with trio.fail_after(10):  # the task's SystemExit cancels this wait
                    await trio.sleep_forever()

        with pytest.raises(BaseExceptionGroup) as info:
            trio.run(main)
        assert [type(leaf) for leaf in leaves(info.value)] == [SystemExit]
        (handle,) = handles
        assert handle.outcome == "error"
        assert handle.exception() is info.value
        assert len(errors_logged(caplog)) == 1
