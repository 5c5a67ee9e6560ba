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
thread): the gauges from the runners that use the meter, the finished counter from the counts
the runners keep. So they export exactly as synchronous instruments would, but finishing a task
costs an integer increment instead of a metric call. The other three are recorded as things
happen.

Thread rules: the runners of one meter may run on several loops and threads (a
``RunnerThread`` beside the app's loop), and the metric reader calls back on a thread of its
own. So no count is written by two threads:

- Each runner owns a ``Counts``: its per-series counts of finished tasks, written only on that
  runner's loop (``Counts.count``, with no lock on that path). The reader's callback reads them
  (each an int, read whole) from a copy of each map, taken as one operation.
- An ``Instruments``' ``lock`` guards everything else that several threads change: the shared
  ``Series`` (made once per name and outcome, and their ``retired`` totals), the set of names,
  and the map of watched runners. When a runner is garbage-collected (nothing writes its counts
  any more), its counts are added to the ``retired`` totals under the lock, so the counter
  never goes down.
- The weak reference's callback that reports a collected runner takes no lock: the cyclic
  garbage collector runs wherever an allocation triggers it, so also inside a ``with lock``
  block of the same thread, where taking the lock again would deadlock. The callback only
  appends to ``_retiring`` (a ``deque``, whose ``append`` and ``popleft`` are thread-safe as
  documented); whoever next holds the lock moves those counts to ``retired`` and forgets the
  runner (``_settle``), in one step for the reader's snapshot.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING, Final

from opentelemetry import metrics

from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._task import RunnerView

__all__ = ["Counts", "Instruments", "Series", "Tally", "instruments_for"]

_NAME: Final = "ctxkit"
#: Distinct task names a meter records; later names fold into ``OVERFLOW_NAME``.
MAX_TASK_NAMES: Final = 256
#: The ``ctxkit.task.name`` of tasks whose name came after the first ``MAX_TASK_NAMES``.
OVERFLOW_NAME: Final = "ctxkit.other"


class Series:
    """One series of ``ctxkit.tasks.finished`` and ``ctxkit.task.duration``: a name and outcome.

    Shared by every runner of the meter. ``attributes`` is never mutated; ``retired`` counts
    the tasks that ended so in runners since collected (changed and read under the lock of the
    ``Instruments`` it belongs to).
    """

    __slots__ = ("attributes", "retired")

    def __init__(self, name: str, outcome: str) -> None:
        self.attributes: Final = {"ctxkit.task.name": name, "ctxkit.task.outcome": outcome}
        self.retired = 0


class Tally:
    """One runner's count of one ``Series``: written only on the runner's loop."""

    __slots__ = ("attributes", "finished", "series")

    def __init__(self, series: Series) -> None:
        self.series: Final = series
        self.attributes: Final = series.attributes
        self.finished = 0


class Counts:
    """The finished tasks of one runner, by task name and outcome (see the thread rules).

    ``by_outcome`` maps an outcome and a task name to its ``Tally``; only the runner's loop
    adds to it (through ``tally``) and counts (``Tally.finished += 1``).
    """

    __slots__ = ("_instruments", "by_outcome")

    def __init__(self, instruments: Instruments) -> None:
        self._instruments = instruments
        self.by_outcome: Final[dict[str, dict[str, Tally]]] = {outcome: {} for outcome in OUTCOMES}

    def tally(self, name: str, outcome: str) -> Tally:
        """Return this runner's tally of a task name and outcome (made on first use)."""
        by_name = self.by_outcome[outcome]
        tally = by_name.get(name)
        if tally is None:
            series = self._instruments.series(name, outcome)
            # Names past the bound share the overflow series: one tally of it per name seen.
            tally = by_name[name] = Tally(series)
        return tally

    def tallies(self) -> list[Tally]:
        """Return every tally (from any thread: each map is copied in one operation)."""
        return [tally for by_name in self.by_outcome.values() for tally in by_name.copy().values()]


#: The outcomes a task ends with, as metric attribute values.
OUTCOMES: Final = ("ok", "error", "timeout", "cancelled")


class Instruments:
    """The six instruments of one meter, the runners it observes, and its series."""

    __slots__ = (
        "__weakref__",
        "_names",
        "_overflow",
        "_retiring",
        "_runners",
        "_series",
        "duration",
        "lock",
        "rejected",
        "wait",
    )

    def __init__(self, meter: metrics.Meter) -> None:
        #: Guards the series, the set of names and the watched runners (see the thread rules).
        self.lock = threading.Lock()
        #: Runners whose tasks the instruments count, by id, with their counts (weak: a
        #: collected runner's counts are retired).
        self._runners: dict[int, tuple[weakref.ref[RunnerView], Counts]] = {}
        #: Collected runners not settled yet: appended by the weak references' callbacks with
        #: no lock, emptied under ``lock`` by ``_settle``.
        self._retiring: deque[tuple[int, weakref.ref[RunnerView], Counts]] = deque()
        meter.create_observable_up_down_counter(
            "ctxkit.tasks.active",
            callbacks=[lambda options: self._observe("running")],
            unit="{task}",
            description="Background tasks running now",
        )
        meter.create_observable_up_down_counter(
            "ctxkit.tasks.pending",
            callbacks=[lambda options: self._observe("pending")],
            unit="{task}",
            description="Background tasks waiting for a free slot",
        )
        #: Outcome -> task name -> its series (the overflow series are not in it).
        self._series: dict[str, dict[str, Series]] = {outcome: {} for outcome in OUTCOMES}
        self._overflow = {outcome: Series(OVERFLOW_NAME, outcome) for outcome in OUTCOMES}
        meter.create_observable_counter(
            "ctxkit.tasks.finished",
            callbacks=[lambda options: self._observe_finished()],
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
        with self.lock:
            by_name = self._series[outcome]
            series = by_name.get(name)
            if series is not None:
                return series
            if name not in self._names:
                if len(self._names) >= MAX_TASK_NAMES:
                    return self._overflow[outcome]
                self._names.add(name)
            series = by_name[name] = Series(name, outcome)
            return series

    def watch(self, runner: RunnerView, counts: Counts) -> None:
        """Observe ``runner``'s gauges and its ``counts`` (made from these instruments)."""
        key = id(runner)
        retiring = self._retiring

        def retire(ref: weakref.ref[RunnerView]) -> None:
            retiring.append((key, ref, counts))  # no lock: see the thread rules

        with self.lock:
            self._settle()  # a collected runner of the same id is forgotten first
            self._runners[key] = (weakref.ref(runner, retire), counts)

    def _settle(self) -> None:
        """Retire the counts of the runners collected since (the caller holds ``lock``).

        A runner still in ``_runners`` is counted through its ``Counts``; once settled, through
        ``retired``: the move is made under the lock, so a snapshot sees it in one place.
        """
        retiring = self._retiring
        while retiring:
            key, ref, counts = retiring.popleft()
            if self._runners.get(key, (None,))[0] is ref:
                del self._runners[key]
            for tally in counts.tallies():
                tally.series.retired += tally.finished

    def _watched(self) -> list[tuple[weakref.ref[RunnerView], Counts]]:
        with self.lock:
            self._settle()
            return list(self._runners.values())

    def _observe(self, attribute: str) -> Iterable[metrics.Observation]:
        """Observe the sum of one ``statistics()`` field (running or pending) of the runners."""
        total = 0
        for ref, _ in self._watched():
            runner = ref()
            if runner is not None:
                total += getattr(runner.statistics(), attribute)
        return (metrics.Observation(total),)

    def _observe_finished(self) -> Iterable[metrics.Observation]:
        """Observe every series' count of finished tasks (cumulative: it never decreases)."""
        totals: dict[int, tuple[dict[str, str], int]] = {}
        with self.lock:
            self._settle()
            watched = list(self._runners.values())
            every = [
                *(series for by_name in self._series.values() for series in by_name.values()),
                *self._overflow.values(),
            ]
            for series in every:
                totals[id(series)] = (series.attributes, series.retired)
        for _, counts in watched:
            for tally in counts.tallies():
                # (A series made since the snapshot above has retired nothing before it.)
                attributes, total = totals.get(id(tally.series), (tally.attributes, 0))
                totals[id(tally.series)] = (attributes, total + tally.finished)
        return [
            metrics.Observation(total, attributes) for attributes, total in totals.values() if total
        ]


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
