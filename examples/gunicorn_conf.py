"""gunicorn settings for examples/flask_app.py: one ctxkit.RunnerThread per worker process.

The runner thread is started after the fork (a thread does not survive ``fork()``) and stopped
when the worker exits, which drains its tasks and logs the summary line.
"""

from __future__ import annotations

import os
from typing import Any

import ctxkit

workers = int(os.environ.get("WORKERS", "2"))
graceful_timeout = 30  # more than the runner's drain_timeout + cancel_timeout

_runner_thread: ctxkit.RunnerThread | None = None


def post_fork(server: Any, worker: Any) -> None:
    global _runner_thread
    _runner_thread = ctxkit.RunnerThread(drain_timeout=float(os.environ.get("DRAIN_TIMEOUT", 20)))
    _runner_thread.start()


def worker_exit(server: Any, worker: Any) -> None:
    if _runner_thread is not None:
        _runner_thread.stop()
