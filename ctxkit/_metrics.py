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

Thread rules: the runners of one meter may run on several loops and threads (a
``RunnerThread`` beside the app's loop), and the metric reader calls back on a thread of its
own. An ``Instruments``' ``lock`` guards its series' ``finished`` counts and its maps of series
and names: ``count_finished`` and ``series`` take it, and so do the callbacks that read them.
The map of watched runners is changed by ``watch`` and by a weak reference's callback (one
dict store or pop each, under the same lock) and copied under it by the gauges' callbacks.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Final

from opentelemetry import metrics

from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._task import RunnerView

__all__ = ["Instruments", "Series", "instruments_for"]

_NAME: Final = "ctxkit"
#: Distinct task names a meter records; later names fold into ``OVERFLOW_NAME``.
MAX_TASK_NAMES: Final = 256
#: The ``ctxkit.task.name`` of tasks whose name came after the first ``MAX_TASK_NAMES``.
OVERFLOW_NAME: Final = "ctxkit.other"


class Series:
    """One series of ``ctxkit.tasks.finished`` and ``ctxkit.task.duration``: a name and outcome.

    ``attributes`` is shared and never mutated; ``finished`` counts the tasks that ended so,
    in every runner of the meter (the finished counter observes it), changed and read under
    the lock of the ``Instruments`` it belongs to.
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
        "lock",
        "rejected",
        "wait",
    )

    def __init__(self, meter: metrics.Meter) -> None:
        #: Guards the series' counts, the maps of series and names, and the watched runners.
        self.lock = lock = threading.Lock()
        # Runners whose tasks the gauges count, by id (weak: a dropped runner counts no more).
        self._runners: dict[int, weakref.ref[RunnerView]] = {}
        runners = self._runners
        meter.create_observable_up_down_counter(
            "ctxkit.tasks.active",
            callbacks=[lambda options: _observe(runners, lock, "running")],
            unit="{task}",
            description="Background tasks running now",
        )
        meter.create_observable_up_down_counter(
            "ctxkit.tasks.pending",
            callbacks=[lambda options: _observe(runners, lock, "pending")],
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
            callbacks=[lambda options: _observe_finished(by_outcome, overflow, lock)],
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

    def count_finished(self, name: str, outcome: str) -> dict[str, str]:
        """Count a task of ``name`` that ended with ``outcome``; return its series' attributes."""
        with self.lock:
            series = self.by_outcome[outcome].get(name) or self._new_series(name, outcome)
            series.finished += 1
        return series.attributes

    def series(self, name: str, outcome: str) -> Series:
        """Return the series of a task name and outcome (made on first use); see ``_new_series``."""
        with self.lock:
            return self.by_outcome[outcome].get(name) or self._new_series(name, outcome)

    def _new_series(self, name: str, outcome: str) -> Series:
        """Make the series of a name and outcome not seen yet (under ``lock``).

        The cardinality is bounded: the first ``MAX_TASK_NAMES`` distinct names are recorded
        as they are; every later one as ``OVERFLOW_NAME`` (a name built per call, such as
        ``f"email-{user_id}"``, would otherwise make a new time series per task).
        """
        if name not in self._names:
            if len(self._names) >= MAX_TASK_NAMES:
                return self._overflow[outcome]
            self._names.add(name)
        value = self.by_outcome[outcome][name] = Series(name, outcome)
        return value

    def watch(self, runner: RunnerView) -> None:
        """Count ``runner``'s running and pending tasks in the gauges from now on."""
        key = id(runner)
        runners, lock = self._runners, self.lock

        def forget(ref: weakref.ref[RunnerView]) -> None:
            with lock:
                if runners.get(key) is ref:
                    del runners[key]

        with lock:
            runners[key] = weakref.ref(runner, forget)


def _observe(
    runners: dict[int, weakref.ref[RunnerView]], lock: threading.Lock, attribute: str
) -> Iterable[metrics.Observation]:
    """Observe the sum of one ``statistics()`` field (running or pending) of all ``runners``."""
    with lock:
        refs = list(runners.values())
    total = 0
    for ref in refs:
        runner = ref()
        if runner is not None:
            total += getattr(runner.statistics(), attribute)
    return (metrics.Observation(total),)


def _observe_finished(
    by_outcome: dict[str, dict[str, Series]], overflow: dict[str, Series], lock: threading.Lock
) -> Iterable[metrics.Observation]:
    """Observe every series' count of finished tasks (cumulative: counts never decrease)."""
    with lock:
        every = [
            (series.finished, series.attributes)
            for series in (
                *(series for by_name in by_outcome.values() for series in by_name.values()),
                *overflow.values(),
            )
            if series.finished
        ]
    return [metrics.Observation(finished, attributes) for finished, attributes in every]


#: The instruments of each provider (and of the global one); made once each, under the lock.
_global: Instruments | None = None
_by_provider: weakref.WeakKeyDictionary[metrics.MeterProvider, Instruments] = (
    weakref.WeakKeyDictionary()
)
_made_lock = threading.Lock()


def instruments_for(provider: metrics.MeterProvider | None) -> Instruments:
    """Return the instruments of ctxkit's meter from ``provider`` (None: the global one).

    Made once per provider, whichever threads open runners at the same time.
    """
    global _global
    with _made_lock:
        if provider is None:
            if _global is None:
                _global = Instruments(metrics.get_meter(_NAME, __version__))
            return _global
        result = _by_provider.get(provider)
        if result is None:
            result = _by_provider[provider] = Instruments(provider.get_meter(_NAME, __version__))
        return result
