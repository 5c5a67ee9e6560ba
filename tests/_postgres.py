"""A real PostgreSQL for the procrastinate tests, on a free loopback port, stopped at the end.

The ``postgres_dsn`` fixture runs ``initdb`` and ``pg_ctl start`` in a temporary data directory
(trust authentication, user ``postgres``, listening on 127.0.0.1 only, its Unix socket inside
the data directory), applies procrastinate's schema and yields the connection string. The
programs come from Debian's package (``/usr/lib/postgresql/<version>/bin``, not on PATH);
``scripts/ensure-postgres.sh`` installs it when they are missing.

PostgreSQL refuses to run as root. When the tests run as root (CI and the development machine
do), the data directory is made in the system temporary directory (not under pytest's, which
only root may enter), given to the unprivileged ``nobody`` user, and ``initdb``/``pg_ctl`` run
as that user through ``runuser``, or ``setpriv`` where ``runuser`` is missing. Otherwise they
run as the current user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ._servers import REPO, TIMEOUT, free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

UNPRIVILEGED = "nobody"


def postgres_bindir() -> Path:
    """Return the directory of ``initdb`` and ``pg_ctl``, installing PostgreSQL if needed."""
    for attempt in range(2):
        found = _find_bindir()
        if found is not None:
            return found
        if attempt == 0:
            subprocess.run(
                ["bash", str(REPO / "scripts" / "ensure-postgres.sh")], check=False, timeout=900
            )
    pytest.fail(
        "initdb/pg_ctl not found and scripts/ensure-postgres.sh could not install them; "
        "run that script as root or install Debian's postgresql"
    )


def _find_bindir() -> Path | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).parent
    return None


def _as_user_prefix() -> tuple[list[str], int | None, int | None]:
    """Return the command prefix that drops root, and the uid/gid to own the data directory."""
    if os.geteuid() != 0:
        return [], None, None
    user = pwd.getpwnam(UNPRIVILEGED)
    if shutil.which("runuser") is not None:
        return ["runuser", "-u", UNPRIVILEGED, "--"], user.pw_uid, user.pw_gid
    return (
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"],
        user.pw_uid,
        user.pw_gid,
    )


def _run(prefix: list[str], command: list[str], log: Path) -> None:
    result = subprocess.run(
        [*prefix, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=TIMEOUT * 6,
        check=False,
        cwd="/",
    )
    if result.returncode != 0:
        details = result.stdout.decode(errors="replace")
        if log.exists():
            details += "\n" + log.read_text(errors="replace")
        pytest.fail(f"{command[0]} exited with {result.returncode}:\n{details}")


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    import psycopg
    from procrastinate.schema import SchemaManager

    bindir = postgres_bindir()
    prefix, uid, gid = _as_user_prefix()
    root = Path(tempfile.mkdtemp(prefix="ctxkit-pg-"))
    data = root / "data"
    log = root / "postgres.log"
    if uid is not None and gid is not None:
        os.chown(root, uid, gid)
    port = free_port()
    started = False
    try:
        _run(
            prefix,
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            log,
        )
        started = True
        _run(
            prefix,
            [
                str(bindir / "pg_ctl"),
                "start",
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                str(int(TIMEOUT * 3)),
                "-o",
                f"-p {port} -h 127.0.0.1 -k {data} -c fsync=off",
            ],
            log,
        )
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with psycopg.connect(dsn, autocommit=True) as connection:
                    connection.execute(SchemaManager.get_schema())
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # polling another process's socket, not synchronising tasks
        yield dsn
    finally:
        if started:
            with contextlib.suppress(Exception):
                subprocess.run(
                    [*prefix, str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=TIMEOUT * 3,
                    check=False,
                    cwd="/",
                )
        shutil.rmtree(root, ignore_errors=True)
