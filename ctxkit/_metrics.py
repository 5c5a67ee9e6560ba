"""The runner's OpenTelemetry metrics: the ``ctxkit`` meter and its six instruments.

- ``ctxkit.tasks.active`` (ObservableUpDownCounter, ``{task}``): tasks running now.
- ``ctxkit.tasks.pending`` (ObservableUpDownCounter, ``{task}``): tasks waiting for a free slot.
- ``ctxkit.tasks.finished`` (ObservableCounter, ``{task}``): ended tasks, by
  ``ctxkit.task.name`` and ``ctxkit.task.outcome``. At most 256 distinct task names per meter
  are recorded; later names are recorded as ``ctxkit.other``, so names built per call cannot
  grow the metric without bound.
- ``ctxkit.tasks.rejected`` (Counter, ``{task}``): spawns refused because the runner was full.
- ``ctxkit.task.duration`` (Histogram, ``s``): how long tasks ran (start to end), same
  attributes as finished.
- ``ctxkit.task.wait`` (Histogram, ``s``): how long tasks waited for a free slot (0.0 for a
  task that started at spawn).

The first three are observed at collection time (a callback, run on the metric reader's
thread): the gauges from the runners that use the meter, the finished counter from the
counts the runners keep per series (a ``Series``, shared by every runner of the meter, never
decreasing). So they export exactly as synchronous instruments would, but finishing a task
costs an integer increment instead of a metric call. The other three are recorded as things
happen.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Final

from opentelemetry import metrics

from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._runner import BackgroundRunner

__all__ = ["Instruments", "Series", "instruments_for"]

_NAME: Final = "ctxkit"
#: Distinct task names a meter records; later names fold into ``OVERFLOW_NAME``.
MAX_TASK_NAMES: Final = 256
#: The ``ctxkit.task.name`` of tasks whose name came after the first ``MAX_TASK_NAMES``.
OVERFLOW_NAME: Final = "ctxkit.other"


class Series:
    """One series of ``ctxkit.tasks.finished`` and ``ctxkit.task.duration``: a name and outcome.

    ``attributes`` is shared and never mutated; ``finished`` counts the tasks that ended so,
    in every runner of the meter (the finished counter observes it).
    """

    __slots__ = ("attributes", "finished")

    def __init__(self, name: str, outcome: str) -> None:
        self.attributes: Final = {"ctxkit.task.name": name, "ctxkit.task.outcome": outcome}
        self.finished = 0


class Instruments:
    """The six instruments of one meter, the runners it observes, and its series."""

    __slots__ = (
        "__weakref__",
        "_names",
        "_overflow",
        "_runners",
        "by_outcome",
        "duration",
        "rejected",
        "wait",
    )

    def __init__(self, meter: metrics.Meter) -> None:
        # Runners whose tasks the gauges count, by id (weak: a dropped runner counts no more).
        self._runners: dict[int, weakref.ref[BackgroundRunner]] = {}
        runners = self._runners
        meter.create_observable_up_down_counter(
            "ctxkit.tasks.active",
            callbacks=[lambda options: _observe(runners, "running")],
            unit="{task}",
            description="Background tasks running now",
        )
        meter.create_observable_up_down_counter(
            "ctxkit.tasks.pending",
            callbacks=[lambda options: _observe(runners, "pending")],
            unit="{task}",
            description="Background tasks waiting for a free slot",
        )
        #: Outcome -> task name -> its series (the overflow series are not in it).
        self.by_outcome: dict[str, dict[str, Series]] = {
            outcome: {} for outcome in ("ok", "error", "timeout", "cancelled")
        }
        self._overflow = {outcome: Series(OVERFLOW_NAME, outcome) for outcome in self.by_outcome}
        by_outcome, overflow = self.by_outcome, self._overflow
        meter.create_observable_counter(
            "ctxkit.tasks.finished",
            callbacks=[lambda options: _observe_finished(by_outcome, overflow)],
            unit="{task}",
            description="Background tasks that ended",
        )
        self.rejected = meter.create_counter(
            "ctxkit.tasks.rejected",
            unit="{task}",
            description="Spawns refused because the runner was full",
        )
        self.duration = meter.create_histogram(
            "ctxkit.task.duration", unit="s", description="How long background tasks ran"
        )
        self.wait = meter.create_histogram(
            "ctxkit.task.wait",
            unit="s",
            description="How long background tasks waited between spawn and start",
        )
        #: The task names recorded so far (at most ``MAX_TASK_NAMES``).
        self._names: set[str] = set()

    def series(self, name: str, outcome: str) -> Series:
        """Return the series of a task name and outcome (made on first use).

        The cardinality is bounded: the first ``MAX_TASK_NAMES`` distinct names are recorded
        as they are; every later one as ``OVERFLOW_NAME`` (a name built per call, such as
        ``f"email-{user_id}"``, would otherwise make a new time series per task).
        """
        by_name = self.by_outcome[outcome]
        try:
            return by_name[name]
        except KeyError:
            pass
        if name not in self._names:
            if len(self._names) >= MAX_TASK_NAMES:
                return self._overflow[outcome]
            self._names.add(name)
        value = by_name[name] = Series(name, outcome)
        return value

    def watch(self, runner: BackgroundRunner) -> None:
        """Count ``runner``'s running and pending tasks in the gauges from now on."""
        key = id(runner)
        runners = self._runners
        runners[key] = weakref.ref(runner, lambda ref: runners.pop(key, None))


def _observe(
    runners: dict[int, weakref.ref[BackgroundRunner]], attribute: str
) -> Iterable[metrics.Observation]:
    """Observe the sum of one ``statistics()`` field (running or pending) of all ``runners``."""
    while True:
        try:  # the reader's thread may see the dict change (a runner opens or is freed)
            refs = list(runners.values())
            break
        except RuntimeError:  # pragma: no cover - a race of a few instructions
            continue
    total = 0
    for ref in refs:
        runner = ref()
        if runner is not None:
            total += getattr(runner.statistics(), attribute)
    return (metrics.Observation(total),)


def _observe_finished(
    by_outcome: dict[str, dict[str, Series]], overflow: dict[str, Series]
) -> Iterable[metrics.Observation]:
    """Observe every series' count of finished tasks (cumulative: counts never decrease)."""
    while True:
        try:  # the reader's thread may see a dict grow (a task name seen for the first time)
            every = [series for by_name in by_outcome.values() for series in by_name.values()]
            break
        except RuntimeError:  # pragma: no cover - a race of a few instructions
            continue
    every.extend(overflow.values())
    return [
        metrics.Observation(series.finished, series.attributes)
        for series in every
        if series.finished
    ]


_global: Instruments | None = None
_by_provider: weakref.WeakKeyDictionary[metrics.MeterProvider, Instruments] = (
    weakref.WeakKeyDictionary()
)


def instruments_for(provider: metrics.MeterProvider | None) -> Instruments:
    """Return the instruments of ctxkit's meter from ``provider`` (None: the global one)."""
    global _global
    if provider is None:
        if _global is None:
            _global = Instruments(metrics.get_meter(_NAME, __version__))
        return _global
    try:
        return _by_provider[provider]
    except KeyError:
        result = Instruments(provider.get_meter(_NAME, __version__))
        _by_provider[provider] = result
        return result
