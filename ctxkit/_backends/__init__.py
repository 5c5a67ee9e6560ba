"""How a runner's tasks start and stop on an event loop: ``open_backend`` picks one of two.

``_base.py`` holds the interface the core programs against (``Backend``) and what both
backends share; ``_asyncio.py`` and ``_trio.py`` implement it. This module only looks at the
running loop and returns the backend for it (trio is imported only when a trio run is on).
"""

from __future__ import annotations

import sys
from asyncio import _get_running_loop
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._task import TaskOutcome
    from ._base import Backend

__all__ = ["open_backend"]


def open_backend(
    started: Callable[[object, object], bool],
    finished: Callable[[object, TaskOutcome, object], None],
    *,
    watch_unstarted: bool = False,
) -> Backend:
    """Return a backend bound to the event loop running in this thread.

    ``watch_unstarted`` (asyncio) also accounts for tasks that the loop cancels before their
    first step (``asyncio.run`` does at its end), which never run their wrapper.

    Raises:
        RuntimeError: No asyncio loop or trio run is running in this thread.
    """
    loop = _get_running_loop()
    if loop is not None:
        from ._asyncio import AsyncioBackend

        return AsyncioBackend(loop, started, finished, watch_unstarted)
    if _trio_running():
        from ._trio import TrioBackend

        return TrioBackend(started, finished)
    raise RuntimeError("no asyncio event loop or trio run is running in this thread")


def _trio_running() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True
