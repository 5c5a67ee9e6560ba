"""The eager-task-factory test mode (``CTXKIT_TEST_EAGER=1``) really reaches every test loop.

``.ci/run`` runs the suite once more on Python 3.12+ with ``CTXKIT_TEST_EAGER=1``; these tests
prove that the loops of pytest-asyncio, of the anyio pytest plugin and of ``asyncio.run`` then
use ``asyncio.eager_task_factory`` -- and that they do not in a normal run -- so an eager run
that passes is not a normal run under another name.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from .conftest import eager_mode


def _expected_factory() -> object:
    if sys.version_info >= (3, 12):
        return asyncio.eager_task_factory if eager_mode() else None
    assert not eager_mode(), "conftest refuses eager mode before 3.12"
    return None


async def _observe() -> tuple[object, bool]:
    """Return the running loop's task factory and whether a new task ran its first step inline."""
    steps: list[str] = []

    async def first_step() -> None:
        steps.append("ran")

    task = asyncio.get_running_loop().create_task(first_step())
    inline = bool(steps)
    await task
    return asyncio.get_running_loop().get_task_factory(), inline


class TestEagerMode:
    @pytest.mark.asyncio
    async def test_pytest_asyncio_loop(self) -> None:
        """A pytest-asyncio test loop has the eager factory exactly in eager mode."""
        factory, inline = await _observe()
        assert factory is _expected_factory()
        assert inline is eager_mode()

    @pytest.mark.anyio
    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_anyio_plugin_loop(self) -> None:
        """An anyio-plugin test loop on asyncio has the eager factory exactly in eager mode."""
        factory, inline = await _observe()
        assert factory is _expected_factory()
        assert inline is eager_mode()

    def test_asyncio_run_loop(self) -> None:
        """``asyncio.run`` inside a test (the demo, examples) gets an eager loop too."""
        factory, inline = asyncio.run(_observe())
        assert factory is _expected_factory()
        assert inline is eager_mode()
