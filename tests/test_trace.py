from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from opentelemetry import trace

from ctxkit import _trace

if TYPE_CHECKING:
    import pytest
    from opentelemetry.sdk.trace import TracerProvider


class _SlottedProvider(trace.TracerProvider):
    """A provider that cannot be weakly referenced (no ``__weakref__`` slot)."""

    __slots__ = ()

    def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
        return trace.NoOpTracer()


class TestGetTracer:
    def test_global_provider_gives_the_proxy_tracer(self) -> None:
        """With no provider the tracer follows the global provider (a proxy, made once)."""
        assert _trace.get_tracer(None) is _trace.get_tracer(None)

    def test_tracer_per_provider_is_cached(self, tracer_provider: TracerProvider) -> None:
        """The same provider gives the same tracer, named after ctxkit."""
        tracer = _trace.get_tracer(tracer_provider)
        assert _trace.get_tracer(tracer_provider) is tracer
        assert tracer.instrumentation_info.name == "ctxkit"  # type: ignore[attr-defined]

    def test_provider_without_weakref_still_works(self) -> None:
        """A provider that cannot be weakly referenced is asked every time, never cached."""
        provider = _SlottedProvider()
        assert isinstance(_trace.get_tracer(provider), trace.NoOpTracer)


class TestFakeTraceId:
    def test_format(self) -> None:
        """A fake trace id is 32 lowercase hex characters."""
        assert re.fullmatch(r"[0-9a-f]{32}", _trace.new_fake_trace_id())

    def test_all_zero_is_drawn_again(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An all-zero slot of the random pool is skipped, never returned."""
        pool = bytes(16) + bytes(range(16)) * 255
        monkeypatch.setattr("ctxkit._trace.os.urandom", lambda n: pool[:n])
        monkeypatch.setattr("ctxkit._trace._id_counter", itertools.count())
        monkeypatch.setattr("ctxkit._trace._id_pool", (-1, b""))
        assert _trace.new_fake_trace_id() == bytes(range(16)).hex()

    def test_ids_are_distinct_across_pools_and_threads(self) -> None:
        """Ids drawn from many threads at once, across several pools, are all different."""
        per_thread = 3 * _trace._POOL_IDS

        def draw() -> list[str]:
            return [_trace.new_fake_trace_id() for _ in range(per_thread)]

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda _: draw(), range(4)))
        ids = [value for result in results for value in result]
        assert len(set(ids)) == len(ids) == 4 * per_thread
