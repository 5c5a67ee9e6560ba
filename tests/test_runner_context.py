"""What a background task carries: the entered context's own trace, values freed as soon as
the task ends, and a clone cache that hits for selections of any size.
"""

from __future__ import annotations

import contextvars
import gc
import weakref
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry import context as otel_context

import ctxkit
from ctxkit import _clone, propagation

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from ._support import MakeRunner

pytestmark = pytest.mark.anyio


class TestEnteredContextSource:
    """clone and inject with context= an entered context carry that context's own trace."""

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


class TestCarriedValuesAreFreed:
    """A finished task lets go of its carried values at once, with no help from the cyclic GC."""

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
    """The clone cache hits for a selection of any size and sees a changed value at once."""

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
