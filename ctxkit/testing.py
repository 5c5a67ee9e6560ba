"""Helpers for testing code that uses ctxkit: recorded spans and a checked runner.

``SpanRecorder`` captures the spans your code and ctxkit finish, in memory, and answers the
questions tests ask of them: by name, by trace, who is whose child, who links to whom.
``open_runner`` opens a ``BackgroundRunner`` for a test, waits for its work at the end and
fails the test if a task raised or had to be cancelled, so fire-and-forget code can be tested
without sleeps. The pytest plugin that ships with ctxkit turns both into fixtures,
``ctxkit_spans`` and ``ctxkit_runner``.

``SpanRecorder`` needs the OpenTelemetry SDK (``pip install 'ctxkit-async[sdk]'``); it is imported
when a recorder is made, never at import time of this module.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any, TypeAlias

from opentelemetry import trace

from ._handle import BackgroundTask
from ._runner import BackgroundRunner, loops

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from types import TracebackType

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ._handle import TaskFailure

__all__ = ["SpanLike", "SpanRecorder", "open_runner"]

SpanLike: TypeAlias = "ReadableSpan | trace.Span | trace.SpanContext | BackgroundTask[Any]"
"""Anything that names one span: a finished or live span, a span context, a task handle."""


def _span_context(span: SpanLike) -> trace.SpanContext:
    if isinstance(span, trace.SpanContext):
        return span
    if isinstance(span, BackgroundTask):
        return span.span_context
    if isinstance(span, trace.Span):
        return span.get_span_context()
    get_span_context = getattr(span, "get_span_context", None)  # an SDK ReadableSpan
    context = get_span_context() if callable(get_span_context) else None
    if isinstance(context, trace.SpanContext):
        return context
    raise TypeError(
        f"expected a span, a SpanContext or a BackgroundTask, got {span!r}; pass the span "
        "itself (from the recorder, or the one `start_as_current_span` gave you)"
    )


def _trace_id_of(trace_id: int | str | SpanLike) -> int:
    if isinstance(trace_id, bool):
        raise TypeError(f"expected a trace id or a span, got {trace_id!r}")
    if isinstance(trace_id, int):
        return trace_id
    if isinstance(trace_id, str):
        try:
            return int(trace_id, 16)
        except ValueError:
            raise ValueError(f"a trace id string is 32 hex characters, got {trace_id!r}") from None
    return _span_context(trace_id).trace_id


class SpanRecorder:
    """Record finished spans in memory and assert on them.

    The recorder owns an SDK ``TracerProvider`` whose spans go, synchronously, to an
    ``InMemorySpanExporter``. Give ``recorder.provider`` to the code under test (for example
    ``BackgroundRunner(tracer_provider=recorder.provider)``, or ``recorder.tracer()`` for your
    own spans); it never touches the global tracer provider, which can be set only once per
    process. Use it as a context manager, or call ``shutdown()`` when done.

    Every method that takes a span accepts a ``SpanLike``: a finished span from this recorder,
    a live span (what ``start_as_current_span`` yields), a ``SpanContext`` or the
    ``BackgroundTask`` that ``ctxkit.spawn`` returned (its task span). Queries return finished
    spans in the order they ended.

    Raises:
        ImportError: The OpenTelemetry SDK is not installed (``pip install 'ctxkit-async[sdk]'``).
    """

    def __init__(self) -> None:
        try:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )
        except ImportError as exc:
            raise ImportError(
                "ctxkit.testing.SpanRecorder needs the OpenTelemetry SDK: "
                "pip install 'ctxkit-async[sdk]' (or opentelemetry-sdk)"
            ) from exc
        self._exporter = InMemorySpanExporter()
        self._provider = TracerProvider()
        self._provider.add_span_processor(SimpleSpanProcessor(self._exporter))

    def __repr__(self) -> str:
        return f"<SpanRecorder {len(self.spans)} finished spans>"

    def __enter__(self) -> SpanRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    @property
    def provider(self) -> TracerProvider:
        """The SDK tracer provider whose finished spans this recorder keeps."""
        return self._provider

    @property
    def exporter(self) -> InMemorySpanExporter:
        """The in-memory exporter behind the recorder."""
        return self._exporter

    def tracer(self, name: str = "test") -> trace.Tracer:
        """Return a tracer of the recorder's provider, for the test's own spans."""
        return self._provider.get_tracer(name)

    @property
    def spans(self) -> list[ReadableSpan]:
        """Every finished span recorded so far, in the order they ended."""
        return list(self._exporter.get_finished_spans())

    def clear(self) -> None:
        """Forget the spans recorded so far."""
        self._exporter.clear()

    def shutdown(self) -> None:
        """Shut the provider down; spans ended afterwards are not recorded."""
        self._provider.shutdown()

    # -- queries ---------------------------------------------------------------------------

    def by_name(self, name: str) -> list[ReadableSpan]:
        """Return the finished spans called ``name``."""
        return [span for span in self.spans if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        """Return the only finished span called ``name``.

        Raises:
            AssertionError: There is no such span, or more than one.
        """
        found = self.by_name(name)
        if len(found) != 1:
            raise AssertionError(
                f"expected exactly one finished span named {name!r}, found {len(found)}\n"
                + self.render()
            )
        return found[0]

    def get(self, span: SpanLike) -> ReadableSpan:
        """Return the finished span that ``span`` names (for example a task's span).

        Raises:
            AssertionError: No such span has finished (yet) in this recorder.
        """
        context = _span_context(span)
        for recorded in self.spans:
            if _same_span(_context(recorded), context):
                return recorded
        raise AssertionError(
            f"no finished span has span id {context.span_id:016x} in trace "
            f"{context.trace_id:032x}; has it ended, and was it made by this recorder's "
            "provider?\n" + self.render()
        )

    def in_trace(self, trace_id: int | str | SpanLike) -> list[ReadableSpan]:
        """Return the finished spans of one trace.

        Args:
            trace_id: The trace id as an int or 32 hex characters (``BackgroundTask.trace_id``,
                ``ctxkit.current_trace_id()``), or any span of the trace.
        """
        wanted = _trace_id_of(trace_id)
        return [span for span in self.spans if _context(span).trace_id == wanted]

    def children_of(self, span: SpanLike) -> list[ReadableSpan]:
        """Return the finished spans whose parent is ``span``."""
        parent = _span_context(span)
        return [child for child in self.spans if _same_span(child.parent, parent)]

    # -- assertions ------------------------------------------------------------------------

    def assert_child_of(self, child: SpanLike, parent: SpanLike) -> None:
        """Assert that ``child`` finished as a child of ``parent`` (same trace, parent id).

        Raises:
            AssertionError: It did not, or ``child`` has not finished.
        """
        recorded = self.get(child)
        expected = _span_context(parent)
        if not _same_span(recorded.parent, expected):
            actual = recorded.parent
            described = (
                "no parent"
                if actual is None
                else f"parent {actual.span_id:016x} in trace {actual.trace_id:032x}"
            )
            raise AssertionError(
                f"span {recorded.name!r} has {described}, not {expected.span_id:016x} in "
                f"trace {expected.trace_id:032x}\n" + self.render()
            )

    def assert_linked(self, span: SpanLike, to: SpanLike) -> None:
        """Assert that ``span`` finished with a span link to ``to``.

        Raises:
            AssertionError: It has no such link, or ``span`` has not finished.
        """
        recorded = self.get(span)
        target = _span_context(to)
        if not any(_same_span(link.context, target) for link in recorded.links):
            raise AssertionError(
                f"span {recorded.name!r} has no link to span {target.span_id:016x} in trace "
                f"{target.trace_id:032x}\n" + self.render()
            )

    # -- rendering -------------------------------------------------------------------------

    def render(self) -> str:
        """Return the recorded spans as an indented tree per trace, for messages and docs.

        A span whose parent was not recorded (a remote parent, from an incoming
        ``traceparent``) is shown as a root with its parent's id.
        """
        spans = self.spans
        if not spans:
            return "(no finished spans)"
        by_trace: dict[int, list[ReadableSpan]] = defaultdict(list)
        for span in spans:
            by_trace[_context(span).trace_id].append(span)
        lines: list[str] = []
        for group in sorted(by_trace.values(), key=lambda g: min(s.start_time or 0 for s in g)):
            lines.append(f"trace {_context(group[0]).trace_id:032x}")
            ids = {_context(span).span_id for span in group}
            children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
            for span in group:
                parent = span.parent.span_id if span.parent else None
                children[parent if parent in ids else None].append(span)
            for root in sorted(children[None], key=lambda s: s.start_time or 0):
                _render(root, children, 1, lines)
        return "\n".join(lines)


def _context(span: ReadableSpan) -> trace.SpanContext:
    context = span.get_span_context()
    assert context is not None
    return context


def _same_span(a: trace.SpanContext | None, b: trace.SpanContext) -> bool:
    return a is not None and a.trace_id == b.trace_id and a.span_id == b.span_id


def _render(
    span: ReadableSpan,
    children: dict[int | None, list[ReadableSpan]],
    depth: int,
    lines: list[str],
) -> None:
    indent = "  " * depth
    notes = [span.kind.name]
    attributes = span.attributes or {}
    if "ctxkit.task.outcome" in attributes:
        notes.append(f"outcome={attributes['ctxkit.task.outcome']!s}")
    if not span.status.is_ok:
        notes.append(f"status=ERROR({span.status.description})")
    if span.parent is not None and depth == 1:
        notes.append(f"remote parent {span.parent.span_id:016x}")
    lines.append(f"{indent}{span.name}  [{', '.join(notes)}]")
    lines.extend(
        f"{indent}  link -> trace {link.context.trace_id:032x} span {link.context.span_id:016x}"
        for link in span.links
    )
    for child in sorted(children[_context(span).span_id], key=lambda s: s.start_time or 0):
        _render(child, children, depth + 1, lines)


class _Records(logging.Handler):
    """Keep the messages of WARNING and ERROR records of the ``ctxkit`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.asynccontextmanager
async def open_runner(
    spans: SpanRecorder | None = None,
    *,
    fail_on_error: bool = True,
    fail_on_cancel: bool = True,
    drain_timeout: float = 5.0,
) -> AsyncIterator[BackgroundRunner]:
    """Open a ``BackgroundRunner`` for a test, and check its tasks when the block ends.

    ``async with open_runner(spans) as runner:`` opens a runner whose task spans go to
    ``spans`` (a ``SpanRecorder``; None means the global tracer provider). While it is open,
    ``ctxkit.spawn`` and ``@ctxkit.fire_and_forget`` in the same event loop use it, as they
    would use the runner of your app's lifespan (it is the first-opened runner of the loop,
    unless the code under test opened one before). Inside the block, ``await
    runner.drain()`` (or ``await ctxkit.drain()``) waits until every task spawned so far,
    and every task those spawned, has ended: then assert on the results.

    Semantics:
        When the block ends without an exception, the runner drains: it waits up to
        ``drain_timeout`` seconds until no task is running or pending, then shuts down,
        cancelling what is left. It then raises ``AssertionError`` if ``fail_on_error`` and
        a task raised or timed out, or if ``fail_on_cancel`` and tasks had to be cancelled;
        the message names the failed tasks with their trace ids and quotes the ``ctxkit``
        log. When the block raises, the runner cancels its tasks at once (a failing test
        does not wait for them) and the exception propagates unchanged. Tasks the test
        cancelled itself are never a failure.

    Args:
        spans: Where task spans go; None means the global tracer provider.
        fail_on_error: Fail when a task raised or timed out (set False when the test
            expects it, and assert on ``task.outcome`` or the span instead).
        fail_on_cancel: Fail when tasks were still running after ``drain_timeout``.
        drain_timeout: Seconds the shutdown waits for the tasks.

    Yields:
        The open runner.

    Raises:
        AssertionError: A check above failed.
    """
    failures: list[TaskFailure] = []
    records = _Records()
    runner = BackgroundRunner(
        drain_timeout=0,  # the drain happens below, and only when the block succeeded
        on_error=failures.append,
        tracer_provider=spans.provider if spans is not None else None,
    )
    left_over = 0
    logger = logging.getLogger("ctxkit")
    logger.addHandler(records)
    # The runner is the test's, not the loop's: once it closes, the loop is as before (a later
    # test on a shared loop still gets the implicit runner, not RunnerClosedError).
    loop_state = loops.current()
    opened_before = loop_state.ever_opened
    try:
        async with runner:
            yield runner
            try:
                await runner.drain(drain_timeout)
            except TimeoutError:
                stats = runner.statistics()
                left_over = stats.running + stats.pending
    finally:
        logger.removeHandler(records)
        loop_state.ever_opened = opened_before
    problems: list[str] = []
    if fail_on_error:
        problems.extend(
            f"background task {failure.name!r} raised {failure.exception!r} "
            f"[trace_id={failure.trace_id}]"
            for failure in failures
        )
        timeouts = runner.statistics().timeout
        if timeouts:
            problems.append(f"{timeouts} background task(s) timed out")
    if fail_on_cancel and left_over:
        problems.append(
            f"{left_over} background task(s) were still running or pending after "
            f"drain_timeout={drain_timeout}s and were cancelled; wait for them in the test, "
            "or raise drain_timeout"
        )
    if problems:
        log = "".join(f"\n  {message}" for message in records.messages)
        raise AssertionError("; ".join(problems) + (f"\nctxkit log:{log}" if log else ""))
