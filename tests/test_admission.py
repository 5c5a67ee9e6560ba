"""Admission: every shape of ``vars=`` takes one path, and a returned spawn is counted."""

from __future__ import annotations

import contextvars
import threading
from typing import TYPE_CHECKING, Any

import pytest

import ctxkit
from ctxkit import _clone

from ._support import finished_counts, noop

if TYPE_CHECKING:
    from ._support import MakeRunner


user: contextvars.ContextVar[str] = contextvars.ContextVar("admission_user")
tenant: contextvars.ContextVar[str] = contextvars.ContextVar("admission_tenant")


@pytest.mark.anyio
class TestVarsShapes:
    """A list of vars, a tuple of them and any other iterable share one cached clone plan."""

    @pytest.mark.parametrize(
        "shape", [tuple, list, lambda vars: dict.fromkeys(vars)], ids=["tuple", "list", "dict"]
    )
    async def test_the_selection_is_worked_out_once_per_set_of_vars(
        self, make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch, shape: Any
    ) -> None:
        """Spawning many times with the same vars, in any shape, selects them only once."""
        calls: list[object] = []
        real = _clone.selection

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(_clone, "selection", counting)
        _clone.plans.clear()
        user.set("ada")
        async with make_runner() as runner:
            tasks = [runner.spawn(noop, vars=shape((user, tenant))) for _ in range(5)]
            await runner.drain()
        assert [task.outcome for task in tasks] == ["ok"] * 5
        assert len(calls) == 1

    async def test_a_list_and_its_tuple_give_the_same_plan(self) -> None:
        """``plan_for`` returns the tuple's plan for a list of the same vars."""
        assert _clone.plan_for([user, tenant], "spawn") is _clone.plan_for((user, tenant), "spawn")

    async def test_a_list_carries_its_vars(self, make_runner: MakeRunner) -> None:
        """A task spawned with vars= as a list sees those vars, and no others."""
        user.set("ada")
        tenant.set("acme")

        async def read() -> tuple[str | None, str | None]:
            return user.get(None), tenant.get(None)

        async with make_runner() as runner:
            task = runner.spawn(read, vars=[user])
            assert await task == ("ada", None)

    async def test_a_bad_item_in_a_list_is_still_a_type_error(
        self, make_runner: MakeRunner
    ) -> None:
        """A list holding something else than a ContextVar is refused at the call, by name."""
        async with make_runner() as runner:
            with pytest.raises(TypeError, match="'user'"):
                runner.spawn(noop, vars=[user, "user"])  # type: ignore[list-item]


class TestCountsFromThreads:
    """A spawn from another thread is counted as soon as it has returned."""

    def test_spawns_that_returned_are_counted_at_once(self) -> None:
        """After threads that spawned are joined, ``statistics().spawned`` counts every spawn."""
        with ctxkit.RunnerThread(limit=None) as runner:
            misses = 0
            for _ in range(100):
                before = runner.statistics().spawned
                threads = [threading.Thread(target=runner.spawn, args=(noop,)) for _ in range(4)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                stats = runner.statistics()
                misses += stats.spawned != before + 4
            assert misses == 0
        stats = runner.statistics()
        assert stats.spawned == stats.ok == 400
        assert (stats.running, stats.pending) == (0, 0)

    def test_a_snapshot_sees_an_arriving_spawn_in_one_place(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A task that reaches the loop between a snapshot's reads is not counted twice.

        The snapshot is forced to release the core's lock, let the loop count the handed-over
        task in, and only then go on: ``spawned`` must still count it once (a later snapshot
        would otherwise read lower, as a stress run on 3.14 saw).
        """
        running, gate, arrived = threading.Event(), threading.Event(), threading.Event()

        async def hog() -> None:
            running.set()
            gate.wait(10)  # blocks the runner's loop: the next spawn waits on its way

        with ctxkit.RunnerThread(limit=None) as runner:
            core = runner._core
            real = core.lock
            observer = threading.get_ident()
            armed = False

            class StepLock:
                def __enter__(self) -> None:
                    real.acquire()

                def __exit__(self, *exc_info: object) -> None:
                    real.release()
                    if threading.get_ident() != observer:
                        if core.inbound == 0:
                            arrived.set()
                    elif armed:
                        gate.set()  # the loop goes on and the spawn arrives...
                        assert arrived.wait(10)  # ...before the snapshot reads on

            monkeypatch.setattr(core, "lock", StepLock())
            runner.spawn(hog)
            assert running.wait(10)
            runner.spawn(noop)
            arrived.clear()  # the hog's own arrival set it
            armed = True
            stats = runner.statistics()
            armed = False
            monkeypatch.setattr(core, "lock", real)
        assert (stats.spawned, stats.running, stats.pending) == (2, 1, 1)  # hog; the arriving one

    def test_runners_on_several_threads_share_a_meter_exactly(self) -> None:
        """Two runner threads fed by eight threads at once: every count and metric is exact."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        per_thread = 500
        with (
            ctxkit.RunnerThread(limit=None, meter_provider=provider) as first,
            ctxkit.RunnerThread(limit=None, meter_provider=provider) as second,
        ):
            runners = [first, second]

            def feed(runner: ctxkit.BackgroundRunner) -> None:
                for _ in range(per_thread):
                    runner.spawn(noop, name="shared")

            threads = [threading.Thread(target=feed, args=(runners[i % 2],)) for i in range(8)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                reader.collect()  # the reader's callbacks run while the runners count
                for runner in runners:
                    runner.statistics()
                    runner.tasks()
            for thread in threads:
                thread.join()
        for runner in runners:
            stats = runner.statistics()
            assert (stats.spawned, stats.ok, stats.running, stats.pending) == (
                4 * per_thread,
                4 * per_thread,
                0,
                0,
            )
        assert finished_counts(reader, "shared") == [8 * per_thread]
        provider.shutdown()
