"""Tests for the ctxkit.fire_and_forget decorator."""

from __future__ import annotations

import gc
import inspect
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import ctxkit

from ._support import TRIO_ONLY, MakeRunner

if TYPE_CHECKING:
    from collections.abc import Iterator

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

request_id: ContextVar[str] = ContextVar("test_decorator.request_id")
tenant: ContextVar[str] = ContextVar("test_decorator.tenant")


@contextmanager
def no_unawaited_coroutines() -> Iterator[None]:
    """Fail if a coroutine made in the block is finalized without being awaited or closed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


@ctxkit.fire_and_forget
async def double(value: int) -> int:
    """Return twice ``value``, in the background."""
    return value * 2


@ctxkit.fire_and_forget(name="audit", vars=[request_id])
async def audit(event: str, *, seen: list[tuple[str, str | None]]) -> None:
    """Record ``event`` with the request id it sees."""
    seen.append((event, request_id.get(None)))


# --- decoration ----------------------------------------------------------------------------------


class TestDecoration:
    def test_keeps_name_doc_and_signature(self) -> None:
        """The wrapper keeps __name__, __qualname__, __doc__, __wrapped__ and the signature."""
        assert double.__name__ == "double"
        assert double.__qualname__ == "double"
        assert double.__doc__ == "Return twice ``value``, in the background."
        assert double.__module__ == __name__
        wrapped = double.__wrapped__  # type: ignore[attr-defined]
        assert inspect.iscoroutinefunction(wrapped)
        assert str(inspect.signature(double)) == "(value: 'int') -> 'int'"
        assert str(inspect.signature(audit)) == (
            "(event: 'str', *, seen: 'list[tuple[str, str | None]]') -> 'None'"
        )

    def test_the_wrapper_is_not_a_coroutine_function(self) -> None:
        """Calling the decorated function returns a handle at once, so it is a plain function."""
        assert not inspect.iscoroutinefunction(double)

    @pytest.mark.parametrize("bare", [True, False], ids=["bare", "with-options"])
    def test_non_async_function_raises_at_decoration(self, bare: bool) -> None:
        """Decorating a plain function, a lambda or an async generator raises TypeError."""

        def plain() -> None:
            pass

        async def agen() -> Any:
            yield 1

        decorate: Any = ctxkit.fire_and_forget if bare else ctxkit.fire_and_forget(name="x")
        for fn in (plain, lambda: None, agen, print):
            with pytest.raises(TypeError, match="async def"):
                decorate(fn)

    @pytest.mark.parametrize(
        ("options", "error"),
        [
            ({"timeout": -1}, ValueError),
            ({"timeout": "1"}, TypeError),
            ({"propagation": "sideways"}, ValueError),
            ({"span": False, "propagation": "link"}, ValueError),
            ({"span": "yes"}, TypeError),
            ({"name": 1}, TypeError),
            ({"vars": ["test_decorator.request_id"]}, TypeError),
            ({"runner": "default"}, TypeError),
        ],
    )
    def test_bad_option_raises_at_decoration(
        self, options: dict[str, Any], error: type[Exception]
    ) -> None:
        """A bad option raises when the decorator is made, before any function is decorated."""
        with pytest.raises(error):
            ctxkit.fire_and_forget(**options)


# --- calls ---------------------------------------------------------------------------------------


@pytest.mark.anyio
class TestCalls:
    async def test_bare_decorator_spawns_and_returns_the_handle(
        self, make_runner: MakeRunner, span_exporter: InMemorySpanExporter
    ) -> None:
        """Each call spawns a task named after the function and returns its handle."""
        async with make_runner():
            first: ctxkit.BackgroundTask[int] = double(2)
            second = double(5)
            assert isinstance(first, ctxkit.BackgroundTask)
            assert first is not second
        assert (first.result(), second.result()) == (4, 10)
        assert first.name == "double"
        assert [s.name for s in span_exporter.get_finished_spans()] == ["double", "double"]

    async def test_options_apply_to_each_call(self, make_runner: MakeRunner) -> None:
        """Decorator options (name, vars) hold for every call."""
        seen: list[tuple[str, str | None]] = []
        async with make_runner():
            request_id.set("r-1")
            handle = audit("login", seen=seen)
            request_id.set("r-2")
            audit("logout", seen=seen)
        assert handle.name == "audit"
        assert sorted(seen) == [("login", "r-1"), ("logout", "r-2")]

    async def test_context_is_captured_at_call_time(self, make_runner: MakeRunner) -> None:
        """A call's task sees the caller's values at the call, even if it waits for a slot."""
        release = anyio.Event()
        seen: list[tuple[str, str | None]] = []

        @ctxkit.fire_and_forget
        async def block() -> None:
            await release.wait()

        async with make_runner(limit=1) as runner:
            block()
            request_id.set("at-call")
            audit("queued", seen=seen)
            assert runner.statistics().pending == 1
            request_id.set("changed")
            release.set()
        assert seen == [("queued", "at-call")]

    async def test_registered_vars_are_read_at_call_time(self, make_runner: MakeRunner) -> None:
        """Vars unregistered or registered after decoration count from the next call."""
        seen: list[str | None] = []
        ctxkit.register(tenant)

        @ctxkit.fire_and_forget
        async def record() -> None:
            seen.append(tenant.get(None))

        tenant.set("acme")
        async with make_runner() as runner:
            record()
            await runner.drain()
            ctxkit.unregister(tenant)
            record()
            await runner.drain()
            ctxkit.register(tenant)
            record()
        assert seen == ["acme", None, "acme"]

    async def test_runner_option_targets_that_runner(self, make_runner: MakeRunner) -> None:
        """runner= sends every call to that runner, not to the first-opened one."""
        async with make_runner() as first, make_runner() as second:

            @ctxkit.fire_and_forget(runner=second)
            async def job() -> None:
                pass

            job()
            double(1)
        assert (first.statistics().spawned, second.statistics().spawned) == (1, 1)

    async def test_timeout_option(self, make_runner: MakeRunner) -> None:
        """timeout= makes a call's task end "timeout" when it runs too long."""
        never = anyio.Event()

        @ctxkit.fire_and_forget(timeout=0.05)
        async def slow() -> None:
            await never.wait()

        async with make_runner():
            handle = slow()
        assert handle.outcome == "timeout"

    async def test_decorated_method(self, make_runner: MakeRunner) -> None:
        """A decorated async method spawns with self bound."""

        class Service:
            def __init__(self) -> None:
                self.calls: list[int] = []

            @ctxkit.fire_and_forget
            async def notify(self, value: int) -> None:
                self.calls.append(value)

        service = Service()
        async with make_runner():
            handle = service.notify(3)
        assert service.calls == [3]
        assert handle.name.endswith("Service.notify")

    async def test_wrong_arguments_raise_and_spawn_nothing(self, make_runner: MakeRunner) -> None:
        """Calling with wrong arguments raises TypeError in the caller; nothing is spawned."""
        async with make_runner() as runner:
            with pytest.raises(TypeError):
                double()  # type: ignore[call-arg]
        assert runner.statistics().spawned == 0

    async def test_call_after_shutdown_raises_and_leaks_nothing(
        self, make_runner: MakeRunner
    ) -> None:
        """A call on a closed runner raises RunnerClosedError and leaves no unawaited coroutine."""
        runner = make_runner()
        async with runner:
            pass

        @ctxkit.fire_and_forget(runner=runner)
        async def job() -> None:
            pass

        with no_unawaited_coroutines():
            with pytest.raises(ctxkit.RunnerClosedError):
                job()
            with pytest.raises(ctxkit.RunnerClosedError):
                double(1)

    async def test_full_runner_raises_and_leaks_nothing(self, make_runner: MakeRunner) -> None:
        """A call on a full runner raises RunnerFullError and closes the coroutine it made."""
        release = anyio.Event()

        @ctxkit.fire_and_forget
        async def block() -> None:
            await release.wait()

        async with make_runner(limit=1, pending_limit=0) as runner:
            block()
            with no_unawaited_coroutines(), pytest.raises(ctxkit.RunnerFullError):
                double(1)
            release.set()
        assert runner.statistics().rejected == 1

    @TRIO_ONLY
    async def test_no_runner_on_trio(self) -> None:
        """On trio with no open runner a call raises NoRunnerError and makes no coroutine."""
        with no_unawaited_coroutines(), pytest.raises(ctxkit.NoRunnerError):
            double(1)
