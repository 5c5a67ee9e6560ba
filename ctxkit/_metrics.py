"""The runner's OpenTelemetry metrics: the ``ctxkit`` meter and its six instruments.

- ``ctxkit.tasks.active`` (ObservableUpDownCounter, ``{task}``): tasks running now.
- ``ctxkit.tasks.pending`` (ObservableUpDownCounter, ``{task}``): tasks waiting for a free slot.

The two gauges are observed at collection time from the runners that use the meter (a
callback, run on the metric reader's thread), so spawning and finishing a task costs no call
for them; the other four are recorded as things happen.
- ``ctxkit.tasks.finished`` (Counter, ``{task}``): ended tasks, by ``ctxkit.task.name`` and
  ``ctxkit.task.outcome``. At most 256 distinct task names per meter are recorded; later
  names are recorded as ``ctxkit.other``, so names built per call cannot grow the metric
  without bound.
- ``ctxkit.tasks.rejected`` (Counter, ``{task}``): spawns refused because the runner was full.
- ``ctxkit.task.duration`` (Histogram, ``s``): how long tasks ran (start to end), same
  attributes as finished.
- ``ctxkit.task.wait`` (Histogram, ``s``): how long tasks waited for a free slot (0.0 for a
  task that started at spawn).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Final

from opentelemetry import metrics

from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._runner import BackgroundRunner

__all__ = ["Instruments", "instruments_for"]

_NAME: Final = "ctxkit"
#: Distinct task names a meter records; later names fold into ``OVERFLOW_NAME``.
MAX_TASK_NAMES: Final = 256
#: The ``ctxkit.task.name`` of tasks whose name came after the first ``MAX_TASK_NAMES``.
OVERFLOW_NAME: Final = "ctxkit.other"


class Instruments:
    """The six instruments of one meter, the runners it observes, and cached attribute sets."""

    __slots__ = (
        "__weakref__",
        "_names",
        "_overflow",
        "_runners",
        "by_outcome",
        "duration",
        "finished",
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
        self.finished = meter.create_counter(
            "ctxkit.tasks.finished", unit="{task}", description="Background tasks that ended"
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
        #: Outcome -> task name -> the (shared, never mutated) attribute dict of both.
        self.by_outcome: dict[str, dict[str, dict[str, str]]] = {
            outcome: {} for outcome in ("ok", "error", "timeout", "cancelled")
        }
        #: The task names recorded so far (at most ``MAX_TASK_NAMES``).
        self._names: set[str] = set()
        self._overflow = {
            outcome: {"ctxkit.task.name": OVERFLOW_NAME, "ctxkit.task.outcome": outcome}
            for outcome in self.by_outcome
        }

    def attributes(self, name: str, outcome: str) -> dict[str, str]:
        """Return the (shared, never mutated) attribute dict for a task name and outcome.

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
        value = by_name[name] = {"ctxkit.task.name": name, "ctxkit.task.outcome": outcome}
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
