"""The ``ctxkit`` pytest plugin (entry point ``pytest11``): fixtures from ``ctxkit.testing``."""

from __future__ import annotations
