"""The runner's OpenTelemetry metrics: the ``ctxkit`` meter and its six instruments.

- ``ctxkit.tasks.active`` (UpDownCounter, ``{task}``): tasks running now.
- ``ctxkit.tasks.pending`` (UpDownCounter, ``{task}``): tasks waiting for a free slot.
- ``ctxkit.tasks.finished`` (Counter, ``{task}``): ended tasks, by ``ctxkit.task.name`` and
  ``ctxkit.task.outcome``.
- ``ctxkit.tasks.rejected`` (Counter, ``{task}``): spawns refused because the runner was full.
- ``ctxkit.task.duration`` (Histogram, ``s``): how long tasks ran (start to end), same
  attributes as finished.
- ``ctxkit.task.wait`` (Histogram, ``s``): how long tasks waited for a free slot (0.0 for a
  task that started at spawn).
"""

from __future__ import annotations

import weakref
from typing import Final

from opentelemetry import metrics

from ._version import __version__

__all__ = ["Instruments", "instruments_for"]

_NAME: Final = "ctxkit"
_MAX_ATTRIBUTE_SETS: Final = 1024


class Instruments:
    """The six instruments of one meter, plus a bounded cache of attribute sets."""

    __slots__ = ("_attributes", "active", "duration", "finished", "pending", "rejected", "wait")

    def __init__(self, meter: metrics.Meter) -> None:
        self.active = meter.create_up_down_counter(
            "ctxkit.tasks.active", unit="{task}", description="Background tasks running now"
        )
        self.pending = meter.create_up_down_counter(
            "ctxkit.tasks.pending",
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
        self._attributes: dict[tuple[str, str], dict[str, str]] = {}

    def attributes(self, name: str, outcome: str) -> dict[str, str]:
        """Return the (shared, never mutated) attribute dict for a task name and outcome."""
        key = (name, outcome)
        try:
            return self._attributes[key]
        except KeyError:
            value = {"ctxkit.task.name": name, "ctxkit.task.outcome": outcome}
            if len(self._attributes) < _MAX_ATTRIBUTE_SETS:
                self._attributes[key] = value
            return value


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
