"""ctxkit: detached, traced background work for asyncio and trio.

Clone the caller's context into a detached one that holds only the ContextVars you select plus
the active OpenTelemetry trace, run background work in it under a supervising runner, and carry
the same context across process boundaries.
"""

from __future__ import annotations

from ._clone import clone as clone
from ._clone import clone_without_span as clone_without_span
from ._clone import register as register
from ._clone import unregister as unregister
from ._errors import CtxkitError as CtxkitError
from ._errors import NoRunnerError as NoRunnerError
from ._errors import RunnerClosedError as RunnerClosedError
from ._errors import RunnerFullError as RunnerFullError
from ._errors import TaskCancelledError as TaskCancelledError
from ._errors import TaskNotDoneError as TaskNotDoneError
from ._errors import TaskTimeoutError as TaskTimeoutError
from ._executor import ContextExecutor as ContextExecutor
from ._executor import bind as bind
from ._handle import BackgroundTask as BackgroundTask
from ._handle import TaskFailure as TaskFailure
from ._logging import TraceIdFilter as TraceIdFilter
from ._runner import BackgroundRunner as BackgroundRunner
from ._runner import current_task as current_task
from ._runner_thread import RunnerThread as RunnerThread
from ._spawn import current_runner as current_runner
from ._spawn import drain as drain
from ._spawn import fire_and_forget as fire_and_forget
from ._spawn import spawn as spawn
from ._task import RunnerStatistics as RunnerStatistics
from ._task import TaskInfo as TaskInfo
from ._task import TaskOutcome as TaskOutcome
from ._trace import current_trace_id as current_trace_id
from ._version import __version__ as __version__

__all__ = [
    "BackgroundRunner",
    "BackgroundTask",
    "ContextExecutor",
    "CtxkitError",
    "NoRunnerError",
    "RunnerClosedError",
    "RunnerFullError",
    "RunnerStatistics",
    "RunnerThread",
    "TaskCancelledError",
    "TaskFailure",
    "TaskInfo",
    "TaskNotDoneError",
    "TaskOutcome",
    "TaskTimeoutError",
    "TraceIdFilter",
    "__version__",
    "bind",
    "clone",
    "clone_without_span",
    "current_runner",
    "current_task",
    "current_trace_id",
    "drain",
    "fire_and_forget",
    "register",
    "spawn",
    "unregister",
]
