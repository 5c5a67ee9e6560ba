"""How the runner calls the loop's task factory, whatever signature the factory has.

From Python 3.14 ``loop.create_task(coro, name=..., context=...)`` passes its keywords on to the
task factory; before, it passed ``context`` alone and named the task itself. A factory written
for either protocol gets ctxkit's tasks, each running in its clone and carrying its name; the
shape is read once per factory object; a factory that cannot be called as asyncio calls one is
refused with a ``TypeError`` that names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import ctxkit

from ._support import ASYNCIO_ONLY, assert_identity, is_closed, noop, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._support import MakeRunner

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

PY314 = sys.version_info >= (3, 14)

carried: contextvars.ContextVar[str] = contextvars.ContextVar("carried")
not_carried: contextvars.ContextVar[str] = contextvars.ContextVar("not_carried")

Factory = Callable[..., Any]


class Calls:
    """What a factory was called with: the keywords, and ``carried`` as the factory ran."""

    def __init__(self) -> None:
        self.keywords: list[dict[str, Any]] = []
        self.carried: list[str | None] = []

    def record(self, keywords: dict[str, Any]) -> None:
        self.keywords.append(keywords)
        self.carried.append(carried.get(None))


def positional(calls: Calls) -> Factory:
    """The oldest shape, ``(loop, coro)``: no context, no name."""

    def factory(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
        calls.record({})
        return asyncio.Task(coro, loop=loop)

    return factory


def context_only(calls: Calls) -> Factory:
    """Python 3.11's documented shape, ``(loop, coro, context=None)``."""

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Any, context: contextvars.Context | None = None
    ) -> asyncio.Task[Any]:
        calls.record({"context": context})
        return asyncio.Task(coro, loop=loop, context=context)

    return factory


def keywords(calls: Calls) -> Factory:
    """Python 3.14's documented shape, ``(loop, coro, **kwargs)``, passed on to the task."""

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        calls.record(kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    return factory


def named_keywords(calls: Calls) -> Factory:
    """``(loop, coro, *, name=None, context=None)``, the shape of 3.12's eager factory."""

    def factory(
        loop: asyncio.AbstractEventLoop,
        coro: Any,
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        calls.record({"name": name, "context": context})
        return asyncio.Task(coro, loop=loop, name=name, context=context)

    return factory


def positional_wrapping(calls: Calls) -> Factory:
    """``(loop, coro)`` running each coroutine inside one of its own, as old Sentry did."""

    def factory(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
        calls.record({})

        async def around() -> Any:
            return await coro

        return asyncio.Task(around(), loop=loop)

    return factory


def positional_partial(calls: Calls) -> Factory:
    """A ``functools.partial`` whose signature is ``(loop, coro)``."""

    def factory(calls: Calls, loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
        calls.record({})
        return asyncio.Task(coro, loop=loop)

    return functools.partial(factory, calls)


class Unreadable:
    """A callable factory whose signature cannot be read: it is called as asyncio calls it."""

    __signature__ = "not a signature"  # inspect.signature raises TypeError

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        self.calls.record(kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)


SHAPES: dict[str, Callable[[Calls], Factory]] = {
    "(loop, coro)": positional,
    "(loop, coro, context=None)": context_only,
    "(loop, coro, **kwargs)": keywords,
    "(loop, coro, *, name=None, context=None)": named_keywords,
    "(loop, coro) wrapping the coroutine": positional_wrapping,
    "partial with (loop, coro) left": positional_partial,
    "no readable signature": Unreadable,
}


@contextlib.contextmanager
def task_factory(factory: Factory | None) -> Iterator[asyncio.AbstractEventLoop]:
    """Set the running loop's task factory for the block; put the loop's own back after.

    Put back while the loop runs: the test runner's loop makes tasks as it closes.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    loop.set_task_factory(factory)
    try:
        yield loop
    finally:
        loop.set_task_factory(previous)


async def look() -> tuple[str | None, str | None, str, object]:
    """What a task sees: both vars, its asyncio task's name and its ctxkit handle."""
    await anyio.lowlevel.checkpoint()  # an eager factory names the task after its first step
    impl = asyncio.current_task()
    assert impl is not None
    return carried.get(None), not_carried.get(None), impl.get_name(), ctxkit.current_task()


class TestEveryShapeGetsTheTasks:
    """A factory of each shape makes the runner's tasks: in the clone, named, found."""

    @pytest.mark.parametrize("shape", list(SHAPES))
    async def test_the_task_runs_in_its_clone_and_is_named(
        self, make_runner: MakeRunner, shape: str
    ) -> None:
        """The factory makes the task; inside, the carried var is seen and the other is not,
        the asyncio task bears the spawn's name and current_task() is the handle."""
        calls = Calls()
        carried.set("request")
        not_carried.set("request")
        with task_factory(SHAPES[shape](calls)):
            async with make_runner() as runner:
                handle = runner.spawn(look, name="looked", vars=[carried])
                seen = await handle
        assert seen == ("request", None, "looked", handle)
        assert len(calls.keywords) == 1
        assert_identity(runner.statistics())

    @pytest.mark.parametrize("shape", ["(loop, coro)", "(loop, coro) wrapping the coroutine"])
    async def test_an_old_factory_runs_in_the_clone(
        self, make_runner: MakeRunner, shape: str
    ) -> None:
        """A factory that takes no context is called inside the clone: the task made there
        copies it, and the factory itself sees the task's vars (not the spawner's)."""
        calls = Calls()
        carried.set("request")
        with task_factory(SHAPES[shape](calls)):
            async with make_runner() as runner:
                handle = runner.spawn(look, name="looked", vars=[])
                seen = await handle
        assert seen == (None, None, "looked", handle)
        assert calls.carried == [None]

    async def test_a_keyword_factory_gets_the_name_and_the_context(
        self, make_runner: MakeRunner
    ) -> None:
        """A factory taking **kwargs gets the context (the task's clone, not the spawner's)
        and, from Python 3.14, the name; before 3.14 the loop names the task it returns."""
        calls = Calls()
        carried.set("request")
        not_carried.set("request")
        with task_factory(keywords(calls)):
            async with make_runner() as runner:
                seen = await runner.spawn(look, name="looked", vars=[carried])
        assert seen[:3] == ("request", None, "looked")
        (received,) = calls.keywords
        assert set(received) == ({"name", "context"} if PY314 else {"context"})
        assert received.get("name", "looked") == "looked"
        context = received["context"]
        assert isinstance(context, contextvars.Context)
        assert context.get(carried) == "request"
        assert not_carried not in context

    @pytest.mark.parametrize("shape", ["(loop, coro)", "(loop, coro, context=None)"])
    async def test_queued_tasks_and_tasks_from_threads_are_made_too(
        self, make_runner: MakeRunner, shape: str
    ) -> None:
        """An old-shape factory also makes the tasks started from the queue and the ones
        spawned from another thread, each named and in its clone."""
        calls = Calls()
        carried.set("request")
        not_carried.set("request")
        release = anyio.Event()
        with task_factory(SHAPES[shape](calls)):
            async with make_runner(limit=1) as runner:
                first = runner.spawn(wait_for, release, name="first")
                queued = runner.spawn(look, name="queued", vars=[carried])
                threaded = await anyio.to_thread.run_sync(
                    functools.partial(runner.spawn, look, name="threaded", vars=[carried])
                )
                release.set()
                await first
                assert (await queued)[:3] == ("request", None, "queued")
                assert (await threaded)[:3] == ("request", None, "threaded")
        assert len(calls.keywords) == 3
        stats = runner.statistics()
        assert_identity(stats)
        assert stats.ok == 3

    async def test_cancel_before_the_first_step_with_an_old_wrapping_factory(
        self, make_runner: MakeRunner
    ) -> None:
        """cancel() right after spawn ends the task "cancelled", its coroutine closed, under
        a (loop, coro) factory that wraps each coroutine."""
        with task_factory(positional_wrapping(Calls())):
            async with make_runner() as runner:
                coro = wait_for(anyio.Event())
                handle = runner.spawn(coro)
                assert handle.cancel() is True
                assert await handle.wait() == "cancelled"
                assert is_closed(coro)
        assert runner.statistics().cancelled == 1


needs_eager = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="asyncio's eager task factories are new in Python 3.12"
)


@needs_eager
class TestEagerFactories:
    """asyncio's own eager factories, whatever their signature on this version."""

    @pytest.mark.parametrize("which", ["eager_task_factory", "create_eager_task_factory"])
    async def test_an_eager_task_runs_in_its_clone_and_is_named(
        self, make_runner: MakeRunner, which: str
    ) -> None:
        """The first step runs inside spawn(); the task sees its clone and bears its name."""
        factory = (
            asyncio.eager_task_factory  # type: ignore[attr-defined]
            if which == "eager_task_factory"
            else asyncio.create_eager_task_factory(asyncio.Task)  # type: ignore[attr-defined]
        )
        steps: list[str | None] = []

        async def first_step() -> tuple[str | None, str | None, str, object]:
            steps.append(carried.get(None))
            return await look()

        carried.set("request")
        not_carried.set("request")
        with task_factory(factory):
            async with make_runner() as runner:
                handle = runner.spawn(first_step, name="eager", vars=[carried])
                assert steps == ["request"]  # ran inside spawn()
                assert await handle == ("request", None, "eager", handle)


class TestFactoryShapeDecidedOnce:
    """The factory's signature is read once per factory object, not on every spawn."""

    async def test_the_signature_is_read_once_per_factory(
        self, make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Five spawns under one factory read its signature once; another factory object is
        read once more, and the no-factory path reads none."""
        read: list[object] = []
        signature = inspect.signature

        def counting(obj: Any, **kwargs: Any) -> inspect.Signature:
            read.append(obj)
            return signature(obj, **kwargs)

        old, new = positional(Calls()), keywords(Calls())
        with task_factory(None) as loop:
            async with make_runner() as runner:
                monkeypatch.setattr(inspect, "signature", counting)
                for _ in range(3):
                    await runner.spawn(noop)
                loop.set_task_factory(old)
                for _ in range(5):
                    await runner.spawn(noop)
                loop.set_task_factory(new)
                for _ in range(5):
                    await runner.spawn(noop)
                monkeypatch.undo()
        assert read == [old, new]
        assert runner.statistics().ok == 13


class TestUnusableFactory:
    """A factory that asyncio itself could not call is refused with a clear TypeError."""

    async def test_spawn_raises_a_type_error_naming_the_factory(
        self, make_runner: MakeRunner
    ) -> None:
        """A factory that needs a third positional argument: spawn raises TypeError naming
        it and the signature to give it; the task ends as an error, its coroutine closed."""

        def needs_three(loop: Any, coro: Any, extra: Any) -> Any:
            raise AssertionError("never called")

        failures: list[ctxkit.TaskFailure] = []
        coro = noop()
        with task_factory(needs_three):
            async with make_runner(on_error=failures.append) as runner:
                with pytest.raises(TypeError, match=r"needs_three.*\(loop, coro, \*\*kwargs\)"):
                    runner.spawn(coro, name="refused")
        assert is_closed(coro)
        assert [f.task.name for f in failures] == ["refused"]
        stats = runner.statistics()
        assert_identity(stats)
        assert (stats.spawned, stats.error) == (1, 1)
