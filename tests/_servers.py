"""Servers the integration tests run next to the suite: a real Redis on a free loopback port.

Shared by the taskiq and Celery tests (each module starts its own, in a temporary directory,
and stops it at the end). Import the ``redis_url`` fixture into a test module to use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0  # seconds, for anything that waits on Redis or a worker


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        subprocess.run(
            ["bash", str(REPO / "scripts" / "ensure-redis.sh")], check=False, timeout=900
        )
        binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH and scripts/ensure-redis.sh could not install it; "
            "run that script as root or install Debian's redis-server"
        )
    return binary


def stop(*processes: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop processes started with start_new_session=True, and whatever they started.

    Each process's session (its group id is its pid) gets SIGTERM at once, so all shut down
    in parallel; a group still there once its leader exited, or after ``timeout``, gets SIGKILL.
    Only the sessions this module started are signalled.
    """
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = redis_binary()
    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = directory / "redis.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(directory),
                "--appendonly",
                "no",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"redis-server exited with {process.returncode}:\n{log.read_text()}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not answer in {TIMEOUT}s:\n{log.read_text()}")
                time.sleep(0.02)  # polling another process's socket, not synchronising tasks
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)
