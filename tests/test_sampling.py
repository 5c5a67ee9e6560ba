"""Tests for ctxkit.sampling.LinkAwareSampler, alone and behind propagation="link" consumers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, TraceFlags

from ctxkit.propagation import consume, inject
from ctxkit.sampling import LinkAwareSampler

if TYPE_CHECKING:
    from collections.abc import Iterator

    from opentelemetry.context import Context

JOBS = 2000


def span_context(sampled: bool, trace_id: int = 0xABC, remote: bool = True) -> SpanContext:
    return SpanContext(
        trace_id=trace_id,
        span_id=0x123,
        is_remote=remote,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )


def parent(sampled: bool, remote: bool = True) -> Context:
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context(sampled, remote=remote)))


class TestDecisions:
    @pytest.mark.parametrize("remote", [True, False])
    def test_a_valid_parent_decides(self, remote: bool) -> None:
        """A span with a valid parent follows the parent's flag, whatever its links say."""
        sampler = LinkAwareSampler(ALWAYS_OFF)
        sampled = sampler.should_sample(parent(True, remote), 1, "s")
        assert sampled.decision is Decision.RECORD_AND_SAMPLE
        dropped = sampler.should_sample(
            parent(False, remote),
            1,
            "s",
            links=[Link(span_context(True))],
        )
        assert dropped.decision is Decision.DROP

    def test_a_root_with_a_sampled_link_is_sampled(self) -> None:
        """A new root with one sampled link among unsampled ones is recorded and sampled, and
        keeps its attributes."""
        sampler = LinkAwareSampler(ALWAYS_OFF)
        result = sampler.should_sample(
            None,
            1,
            "process q",
            attributes={"a": 1},
            links=[Link(span_context(False)), Link(span_context(True, trace_id=7))],
        )
        assert result.decision is Decision.RECORD_AND_SAMPLE
        assert dict(result.attributes or {}) == {"a": 1}

    @pytest.mark.parametrize("root", [ALWAYS_ON, ALWAYS_OFF])
    def test_other_roots_go_to_the_root_sampler(self, root: Sampler) -> None:
        """A root without links, or with unsampled links only, is decided by root."""
        sampler = LinkAwareSampler(root)
        expected = root.should_sample(None, 1, "s").decision
        assert sampler.should_sample(None, 1, "s").decision is expected
        unsampled = [Link(span_context(False))]
        assert sampler.should_sample(None, 1, "s", links=unsampled).decision is expected

    def test_description_and_argument_check(self) -> None:
        """The description names the root; a root that is not a Sampler raises TypeError."""
        assert LinkAwareSampler(ALWAYS_ON).get_description() == (
            "LinkAwareSampler{root:AlwaysOnSampler}"
        )
        with pytest.raises(TypeError, match="Sampler"):
            LinkAwareSampler(0.1)  # type: ignore[arg-type]


# --- ratio sampling with link-mode consumers -------------------------------------------------


def provider(sampler: Sampler) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    result = TracerProvider(sampler=sampler)
    result.add_span_processor(SimpleSpanProcessor(exporter))
    return result, exporter


@pytest.fixture
def producer() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    result = provider(ParentBased(TraceIdRatioBased(0.1)))
    yield result
    result[0].shutdown()


def run_jobs(
    producer_provider: TracerProvider, consumer_sampler: Sampler
) -> tuple[set[str], set[str], set[str]]:
    """Produce JOBS root send spans and consume each in link mode on the other side.

    Returns the trace ids of the producers kept, of the producers dropped, and the producer
    trace ids that kept consumer traces link to.
    """
    consumer_provider, consumer_exporter = provider(consumer_sampler)
    tracer = producer_provider.get_tracer("producer")
    kept: set[str] = set()
    dropped: set[str] = set()
    try:
        for _ in range(JOBS):
            with tracer.start_as_current_span("send q", kind=trace.SpanKind.PRODUCER) as send:
                carrier: dict[str, str] = inject({})
            context = send.get_span_context()
            (kept if context.trace_flags.sampled else dropped).add(f"{context.trace_id:032x}")
            with consume(carrier, "q", propagation="link", tracer_provider=consumer_provider):
                pass
        linked = {
            str((span.attributes or {})["ctxkit.linked_trace_id"])
            for span in consumer_exporter.get_finished_spans()
        }
    finally:
        consumer_provider.shutdown()
    return kept, dropped, linked


class TestRatioSampling:
    def test_parent_based_loses_most_linked_consumer_traces(
        self, producer: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """With ParentBased(TraceIdRatioBased(0.1)) on both sides, a link-mode consumer trace
        gets its own decision: most consumers of kept producers are dropped, and some kept
        consumer traces link to producers that were dropped."""
        kept, dropped, linked = run_jobs(producer[0], ParentBased(TraceIdRatioBased(0.1)))
        assert 100 < len(kept) < 300  # about 10% of 2000
        assert len(kept - linked) > len(kept) // 2
        assert linked & dropped

    def test_link_aware_keeps_every_consumer_of_a_kept_producer(
        self, producer: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """With LinkAwareSampler(ParentBased(TraceIdRatioBased(0.1))) on the consumer side,
        every consumer trace of a kept producer is kept; consumers of dropped producers are
        kept only as the root ratio picks them on their own."""
        kept, dropped, linked = run_jobs(
            producer[0], LinkAwareSampler(ParentBased(TraceIdRatioBased(0.1)))
        )
        assert kept <= linked
        assert len(linked & dropped) < len(dropped) // 4

    def test_link_aware_with_always_off_root_keeps_exactly_the_linked(
        self, producer: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        """With LinkAwareSampler(ALWAYS_OFF) on a link-mode consumer, a consumer trace is kept
        exactly when its producer trace is: never for a dropped one."""
        kept, dropped, linked = run_jobs(producer[0], LinkAwareSampler(ALWAYS_OFF))
        assert linked == kept
        assert not linked & dropped
