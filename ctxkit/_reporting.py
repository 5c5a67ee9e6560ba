"""How the runner tells the world what happened: task spans ended, log lines, ``on_error``.

Everything here runs after the core's bookkeeping is complete, so an exception raised by the
app's code that it calls (a span processor's ``on_end``, a done-callback, ``on_error``) is
logged and never leaves the runner half-updated, nor escapes into a task (where it would end a
trio run, or go unseen on asyncio). These functions hold no state: the core passes them what
they report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import anyio
from opentelemetry.trace import Status, StatusCode

from ._errors import exception_text
from ._handle import CANCEL_REQUESTED, TaskFailure, run_callback
from ._logging import logger
from ._task import ERROR, OK, TIMEOUT, RunnerStatistics, TaskOutcome
from ._trace import mark_error

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from opentelemetry import trace

    from ._handle import BackgroundTask

__all__ = ["log_summary", "log_teardown", "names", "report", "seconds"]

_SUMMARY_NAMES: Final = 10

#: By ``id()``: ``TaskOutcome`` members hash in Python code (``Enum.__hash__``), ids in C.
OUTCOME_VALUES: Final = {id(outcome): outcome.value for outcome in TaskOutcome}


def report(
    task: BackgroundTask[Any],
    outcome: TaskOutcome,
    value: object,
    on_error: Callable[[TaskFailure], object] | None,
    *,
    torn_down: bool,
) -> None:
    """Tell the world how ``task`` ended: its span, done-callbacks, a log line, ``on_error``.

    Each report is made even when an earlier one raised: that is logged. ``torn_down``: the
    task's loop is going away, and the teardown's summary names the task instead of a line of
    its own for a cancel from outside the runner.
    """
    exception = value if outcome is ERROR else None
    if task._span is not None:
        try:
            _end_span(task, task._span, outcome, exception)  # type: ignore[arg-type]
        except Exception:  # a span processor of the app: the rest is reported all the same
            logger.exception(
                "ending the span of background task %r raised [trace_id=%s]",
                task.name,
                task.trace_id,
            )
    if task._on_done is not None:
        waiters, task._on_done = task._on_done, None
        for waiter in waiters:
            if not isinstance(waiter, anyio.Event):
                run_callback(task, waiter)
    if outcome is OK:
        pass
    elif exception is not None:
        _report_error(task, exception, on_error)  # type: ignore[arg-type]
    elif outcome is TIMEOUT:
        logger.warning(
            "background task %r timed out after %ss and was cancelled [trace_id=%s]",
            task.name,
            task._timeout,
            task.trace_id,
        )
    elif not task._flags & CANCEL_REQUESTED and not torn_down:
        logger.warning(
            "background task %r was cancelled from outside its runner before it finished "
            "[trace_id=%s]",
            task.name,
            task.trace_id,
        )


def _report_error(
    task: BackgroundTask[Any],
    exception: BaseException,
    on_error: Callable[[TaskFailure], object] | None,
) -> None:
    logger.error(
        "background task %r failed: %s: %s [trace_id=%s]",
        task.name,
        type(exception).__qualname__,
        exception_text(exception),
        task.trace_id,
        exc_info=exception,
    )
    if on_error is not None:
        try:
            on_error(TaskFailure(task, exception))
        except Exception:
            logger.exception("the on_error hook %r raised", on_error)


def _end_span(
    task: BackgroundTask[Any],
    span: trace.Span,
    outcome: TaskOutcome,
    exception: BaseException | None,
) -> None:
    try:
        span.set_attribute("ctxkit.task.outcome", OUTCOME_VALUES[id(outcome)])
        if exception is not None:
            mark_error(span, exception)
        elif outcome is TIMEOUT:
            span.set_status(Status(StatusCode.ERROR, f"timed out after {task._timeout}s"))
            span.set_attribute("error.type", "timeout")
    finally:
        span.end()  # whatever failed above: a span never ended is never exported


def log_summary(
    reason: str | None,
    running: list[BackgroundTask[Any]],
    pending: list[BackgroundTask[Any]],
    stuck: list[BackgroundTask[Any]],
    stats: RunnerStatistics,
) -> None:
    """Log the one line a runner's shutdown ends with.

    ``running`` and ``pending``: the tasks the shutdown cancelled; ``stuck``: those still
    running when it gave up waiting; ``reason``: why it had to cancel.
    """
    counts = (
        f"spawned={stats.spawned} ok={stats.ok} error={stats.error} "
        f"timeout={stats.timeout} cancelled={stats.cancelled} rejected={stats.rejected}"
    )
    if not running and not pending:
        if stats.error or stats.timeout or stats.cancelled:
            logger.info("ctxkit runner shut down, no task left to cancel: %s", counts)
        else:
            logger.info("ctxkit runner shut down, every task finished: %s", counts)
        return
    logger.warning(
        "ctxkit runner shut down, %s: cancelled %d running and %d pending tasks (%s)%s; %s",
        reason,
        len(running),
        len(pending),
        names(running + pending),
        f"; {len(stuck)} ignored cancellation and are still running ({names(stuck)})"
        if stuck
        else "",
        counts,
    )


def log_teardown(torn_down: list[str], stats: RunnerStatistics) -> None:
    """Log what the loop's teardown cancelled in an implicit runner (``asyncio.run``'s end)."""
    logger.warning(
        "ctxkit's implicit runner: the event loop shut down and cancelled %d background "
        "tasks (%s); open a BackgroundRunner around the app to drain them instead; "
        "spawned=%d ok=%d error=%d timeout=%d cancelled=%d",
        len(torn_down),
        names(torn_down),
        stats.spawned,
        stats.ok,
        stats.error,
        stats.timeout,
        stats.cancelled,
    )


def names(items: Iterable[BackgroundTask[Any] | str]) -> str:
    """The first names of ``items`` for a log line, and how many more there are."""
    shown = [item if isinstance(item, str) else item.name for item in items]
    text = ", ".join(shown[:_SUMMARY_NAMES])
    if len(shown) > _SUMMARY_NAMES:
        text += f", and {len(shown) - _SUMMARY_NAMES} more"
    return text


def seconds(value: float | None) -> str:
    """A timeout option as a log line shows it (``5.0s``, ``None``)."""
    if value is None:
        return "None"
    return f"{value!r}s"
