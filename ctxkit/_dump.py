"""Dump what every runner of a running process is doing, on a signal: no code change needed.

With ``CTXKIT_TASKS_SIGNAL=USR1`` (any signal name) in the environment, the first runner entered
in the main thread installs a handler for that signal, which logs every open runner's
``tasks()`` on the ``ctxkit`` logger: ``kill -USR1 <pid>`` in a container with nothing but a
shell. A signal and a log line, rather than a ``python -m ctxkit ps`` that attaches to the
process: ctxkit's task names, states and trace ids live in the process, and its logs already
go where the operator looks; opt-in, because the signal may be the app's own.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Final

from ._logging import logger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import FrameType

    from ._task import RunnerView

__all__ = ["install_from_environment"]

ENVIRONMENT: Final = "CTXKIT_TASKS_SIGNAL"
_installed: set[int] = set()


def install_from_environment(runners: Callable[[], Iterable[RunnerView]]) -> None:
    """Install the dump handler if the environment asks for it (once, from the main thread).

    ``runners`` returns the open runners of the process when the signal comes.
    """
    name = os.environ.get(ENVIRONMENT)
    if not name or threading.current_thread() is not threading.main_thread():
        return
    number = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(number, int):
        logger.warning("%s=%r names no signal of this platform; no task dump", ENVIRONMENT, name)
        return
    if number in _installed:
        return
    _installed.add(number)

    def dump(signum: int, frame: FrameType | None) -> None:
        log_tasks(runners)

    signal.signal(number, dump)


def log_tasks(runners: Callable[[], Iterable[RunnerView]]) -> None:
    """Log the tasks of every runner ``runners()`` returns, one message per runner."""
    for runner in runners():
        infos = runner.tasks()
        lines = [
            f"  {info.name} {info.state} age={info.age:.1f}s"
            + ("" if info.running_for is None else f" running={info.running_for:.1f}s")
            + f" trace_id={info.trace_id}"
            for info in infos
        ]
        logger.warning("ctxkit tasks of %r:%s", runner, "".join(f"\n{line}" for line in lines))
