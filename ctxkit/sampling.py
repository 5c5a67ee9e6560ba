"""Sampling that keeps linked consumer traces together with the producer traces they link to.

``ParentBased`` ignores links: a consumer span started in ``propagation="link"`` mode (or a
retried job's later attempt) is a new root, so it gets a sampling decision of its own, and under
ratio sampling most links then point at traces that were dropped. ``LinkAwareSampler`` decides
such a root by its links first. It needs ``opentelemetry-sdk`` (the ``ctxkit-async[sdk]`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        Decision,
        Sampler,
        SamplingResult,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the SDK
    raise ImportError(
        'ctxkit.sampling needs opentelemetry-sdk; install it with pip install "ctxkit-async[sdk]"'
    ) from exc
from opentelemetry import trace

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.context import Context
    from opentelemetry.trace import Link, SpanKind, TraceState
    from opentelemetry.util.types import Attributes

__all__ = ["LinkAwareSampler"]


class LinkAwareSampler(Sampler):
    """Sample a new root that links to a sampled span; otherwise sample like ``ParentBased``.

    Semantics:
        - A span with a valid parent follows the parent's sampled flag, as
          ``ParentBased(root)`` does with its default delegates: sampled parent, recorded and
          sampled; unsampled parent, dropped (remote and local parents alike).
        - A new root with at least one link whose span context is sampled is recorded and
          sampled: a link-mode consumer trace is kept whenever the producer trace it links to
          was kept, whatever the ratio.
        - Any other root is decided by ``root`` (``TraceIdRatioBased(0.1)``, ``ALWAYS_ON``).

        Links count only when they are given at the span's creation (``start_span(links=)``),
        which is how ``ctxkit.propagation.consume`` and the integrations start their spans.
        The decision of a sampled link keeps the root's ``trace_state``.

    Args:
        root: The sampler for roots without a sampled link.

    Raises:
        TypeError: ``root`` is not an OpenTelemetry SDK ``Sampler``.
    """

    def __init__(self, root: Sampler) -> None:
        if not isinstance(root, Sampler):
            raise TypeError(
                f"LinkAwareSampler takes an opentelemetry.sdk.trace.sampling.Sampler as root, "
                f"got {root!r}"
            )
        self._root = root

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """Return the decision for one span (see the class docstring)."""
        parent = trace.get_current_span(parent_context).get_span_context()
        if parent.is_valid:
            delegate = ALWAYS_ON if parent.trace_flags.sampled else ALWAYS_OFF
            return delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        if links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self._root.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """Return a description naming the root sampler."""
        return f"LinkAwareSampler{{root:{self._root.get_description()}}}"
