"""A hypothesis state machine drives one runner on asyncio and on trio.

The event loop runs in a thread behind an anyio blocking portal; each rule is one call into
it. Random spawns (tasks that return, raise, block until released, or run past a timeout),
cancels, releases, drains and the shutdown, on a runner whose ``limit`` and ``pending_limit``
are drawn when it is made. After every step: the statistics identity holds, the counters
equal the outcomes the handles show, no more than ``limit`` tasks run and no more than
``pending_limit`` wait, and every ended task's outcome is one its history allows.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import ctxkit

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

_label: contextvars.ContextVar[int] = contextvars.ContextVar("label")


class _Task:
    """The model of one spawned task: what it does and what may have happened to it."""

    def __init__(self, label: int, kind: str) -> None:
        self.label = label
        self.kind = kind  # "ok", "error", "block", "slow" (runs past its timeout)
        self.release = anyio.Event()
        self.seen_label: int | None = None
        self.cancel_requested = False
        self.released = False
        self.handle: ctxkit.BackgroundTask[Any] | None = None

    def allowed(self) -> set[str]:
        natural = {"ok": "ok", "error": "error", "block": "ok", "slow": "timeout"}[self.kind]
        allowed = {natural}
        if self.kind == "slow" and self.released:
            allowed.add("ok")  # released before its timeout passed
        if self.cancel_requested:
            allowed.add("cancelled")
        return allowed

    async def run(self) -> int:
        self.seen_label = _label.get(None)
        await anyio.lowlevel.checkpoint()
        if self.kind == "error":
            raise ValueError(f"task {self.label} failed on purpose")
        if self.kind in ("block", "slow"):
            await self.release.wait()
        return self.label


class RunnerMachine(RuleBasedStateMachine):
    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(
            self.backend
        )
        self.portal = self._portal_cm.__enter__()
        self.runner: ctxkit.BackgroundRunner | None = None
        self.tasks: list[_Task] = []
        self.closed = False
        self.failures: list[ctxkit.TaskFailure] = []

    tasks_bundle = Bundle("tasks")

    @initialize(
        limit=st.one_of(st.none(), st.integers(1, 4)),
        pending_limit=st.one_of(st.none(), st.integers(0, 4)),
    )
    def open_runner(self, limit: int | None, pending_limit: int | None) -> None:
        self.limit, self.pending_limit = limit, pending_limit
        self.runner = ctxkit.BackgroundRunner(
            limit=limit,
            pending_limit=pending_limit,
            drain_timeout=0.5,
            cancel_timeout=1.0,
            on_error=self.failures.append,
        )
        # Entered and left in one task of the loop, as an ``async with`` block would be.
        self.runner_cm = self.portal.wrap_async_context_manager(self.runner)
        self.runner_cm.__enter__()

    @precondition(lambda self: not self.closed)
    @rule(target=tasks_bundle, kind=st.sampled_from(["ok", "error", "block", "slow"]))
    def spawn(self, kind: str) -> _Task:
        assert self.runner is not None
        model = _Task(len(self.tasks), kind)
        runner = self.runner

        async def spawn_it() -> tuple[bool, ctxkit.BackgroundTask[Any] | None]:
            # Whether it is full, read on the loop right before the spawn: nothing ends in
            # between (read from this thread, a task's timeout could pass meanwhile).
            full = self._full()
            token = _label.set(model.label)
            try:
                return full, runner.spawn(
                    model.run, timeout=0.05 if kind == "slow" else None, name=f"t{model.label}"
                )
            except ctxkit.RunnerFullError:
                return full, None
            finally:
                _label.reset(token)

        full_before, handle = self.portal.call(spawn_it)
        if handle is None:
            assert full_before, "refused although there was room"
            return model  # in the bundle all the same, so that what is drawn stays the same
        assert not full_before, "accepted although full"
        model.handle = handle
        self.tasks.append(model)
        return model

    @precondition(lambda self: not self.closed)
    @rule(model=tasks_bundle)
    def cancel(self, model: _Task) -> None:
        handle = model.handle
        if handle is None:
            return

        async def cancel_it() -> None:  # one call on the loop: nothing ends in between
            was_done = handle.done()
            if not was_done:
                model.cancel_requested = True
            assert handle.cancel() is (not was_done)

        self.portal.call(cancel_it)

    @rule(model=tasks_bundle)
    def release(self, model: _Task) -> None:
        model.released = True
        self.portal.call(self._sync, model.release.set)

    @rule(steps=st.integers(1, 5))
    def let_it_run(self, steps: int) -> None:
        async def checkpoints() -> None:
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()

        self.portal.call(checkpoints)

    @precondition(lambda self: not self.closed)
    @rule()
    def drain_briefly(self) -> None:
        assert self.runner is not None
        runner = self.runner

        async def drain() -> bool:
            try:
                await runner.drain(0.02)
            except TimeoutError:
                return False
            return True

        if self.portal.call(drain):
            stats = runner.statistics()
            assert stats.running == stats.pending == 0

    @precondition(lambda self: not self.closed)
    @rule()
    def shut_down(self) -> None:
        self._close()

    def _close(self) -> None:
        assert self.runner is not None
        self.closed = True
        for model in self.tasks:
            model.cancel_requested = True  # the shutdown cancels what the drain leaves
        self.runner_cm.__exit__(None, None, None)
        stats = self.runner.statistics()
        assert stats.running == stats.pending == 0  # nothing here ignores cancellation
        for model in self.tasks:
            assert model.handle is not None
            assert model.handle.done()

    @staticmethod
    async def _sync(fn: Any) -> Any:
        return fn()

    def _full(self) -> bool:
        assert self.runner is not None
        stats = self.runner.statistics()
        return (
            self.limit is not None
            and stats.running >= self.limit
            and self.pending_limit is not None
            and stats.pending >= self.pending_limit
        )

    @invariant()
    def statistics_add_up(self) -> None:
        if self.runner is not None:
            self.portal.call(self._sync, self._check_statistics)

    def _check_statistics(self) -> None:
        """Check the counters against the handles, on the loop (nothing ends meanwhile)."""
        assert self.runner is not None
        stats = self.runner.statistics()
        assert stats.spawned == (
            stats.ok + stats.error + stats.timeout + stats.cancelled + stats.running + stats.pending
        )
        assert stats.spawned == len(self.tasks)
        outcomes = [m.handle.outcome for m in self.tasks if m.handle is not None]
        assert stats.ok == outcomes.count(ctxkit.TaskOutcome.OK)
        assert stats.error == outcomes.count(ctxkit.TaskOutcome.ERROR)
        assert stats.timeout == outcomes.count(ctxkit.TaskOutcome.TIMEOUT)
        assert stats.cancelled == outcomes.count(ctxkit.TaskOutcome.CANCELLED)
        assert stats.running + stats.pending == outcomes.count(None)
        if self.limit is not None:
            assert stats.running <= self.limit
        if self.pending_limit is not None:
            assert stats.pending <= self.pending_limit
        assert len(self.failures) == stats.error

    @invariant()
    def outcomes_match_history(self) -> None:
        self.portal.call(self._sync, self._check_outcomes)

    def _check_outcomes(self) -> None:
        for model in self.tasks:
            assert model.handle is not None
            outcome = model.handle.outcome
            if outcome is None:
                continue
            assert outcome in model.allowed(), (model.kind, model.cancel_requested, outcome)
            if outcome == "ok":
                assert model.handle.result() == model.label
            if model.seen_label is not None:
                assert model.seen_label == model.label  # its own spawner's var, not another's

    def teardown(self) -> None:
        try:
            if self.runner is not None and not self.closed:
                for model in self.tasks:
                    self.portal.call(self._sync, model.release.set)
                self._close()
        finally:
            self._portal_cm.__exit__(None, None, None)


class AsyncioRunnerMachine(RunnerMachine):
    backend = "asyncio"


class TrioRunnerMachine(RunnerMachine):
    backend = "trio"


_settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("machine", [AsyncioRunnerMachine, TrioRunnerMachine])
def test_runner_state_machine(machine: type[RunnerMachine]) -> None:
    """Random programs of spawns, cancels, releases, drains and a shutdown keep every rule."""
    machine.TestCase.settings = _settings
    machine.TestCase().runTest()
