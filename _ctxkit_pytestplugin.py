"""The ctxkit pytest plugin (entry point ``pytest11``): fixtures from ``ctxkit.testing``.

``ctxkit_spans`` is a fresh ``SpanRecorder`` per test. ``ctxkit_runner`` is a runner opened by
``ctxkit.testing.open_runner`` on the event loop of the test that asks for it: the runner
fixture is a dispatcher that picks the async fixture of the plugin that drives the test, the
anyio plugin (``@pytest.mark.anyio``, asyncio or trio) or pytest-asyncio
(``@pytest.mark.asyncio``, on the test's ``loop_scope``). The ``ctxkit`` marker passes options
to ``open_runner``.

pytest loads every installed ``pytest11`` plugin in every run, of any project. So this is a
top-level module, outside the ``ctxkit`` package (importing ``ctxkit._anything`` would import
``ctxkit/__init__.py``, all of ctxkit and OpenTelemetry), as Hypothesis ships
``_hypothesis_pytestplugin``: loading it imports pytest and, when installed, pytest-asyncio,
and nothing of ctxkit or OpenTelemetry. ctxkit is imported by the fixtures, when a test first
uses one. A test checks this in a fresh interpreter. ``ctxkit._pytest_plugin`` re-exports
this module, for ``-p ctxkit._pytest_plugin``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

import pytest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from contextlib import AbstractAsyncContextManager

    from ctxkit import BackgroundRunner
    from ctxkit.testing import SpanRecorder

__all__ = [
    "_ctxkit_runner_anyio",
    "ctxkit_runner",
    "ctxkit_spans",
    "pytest_configure",
]

_MARKER_OPTIONS: Final = ("fail_on_error", "fail_on_cancel", "drain_timeout")
_LoopScope = Literal["function", "class", "module", "package", "session"]
_LOOP_SCOPES: Final[tuple[_LoopScope, ...]] = ("function", "class", "module", "package", "session")


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``ctxkit`` marker."""
    config.addinivalue_line(
        "markers",
        "ctxkit(fail_on_error=True, fail_on_cancel=True, drain_timeout=5.0): options of the "
        "ctxkit_runner fixture (see ctxkit.testing.open_runner)",
    )


@pytest.fixture
def ctxkit_spans() -> Iterator[SpanRecorder]:
    """A ``ctxkit.testing.SpanRecorder`` for this test, shut down after it."""
    from ctxkit.testing import SpanRecorder

    with SpanRecorder() as recorder:
        yield recorder


@pytest.fixture
def ctxkit_runner(request: pytest.FixtureRequest) -> BackgroundRunner:
    """An open ``BackgroundRunner`` on the test's event loop, its spans in ``ctxkit_spans``.

    Made by ``ctxkit.testing.open_runner``: after the test it drains, and fails the test if a
    task raised, timed out or was still running after ``drain_timeout`` (options through
    ``@pytest.mark.ctxkit(...)``). Works in async tests run by the anyio plugin
    (``@pytest.mark.anyio``) or by pytest-asyncio (``@pytest.mark.asyncio``).
    """
    node = request.node
    if node.get_closest_marker("anyio") is not None or (
        node.get_closest_marker("asyncio") is None and "anyio_backend" in request.fixturenames
    ):
        return request.getfixturevalue("_ctxkit_runner_anyio")  # type: ignore[no-any-return]
    marker = node.get_closest_marker("asyncio")
    if marker is not None:
        scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
        if scope is None:
            try:
                scope = request.config.getini("asyncio_default_test_loop_scope") or "function"
            except ValueError:  # pragma: no cover - a pytest-asyncio without this option
                scope = "function"
        return request.getfixturevalue(f"_ctxkit_runner_asyncio_{scope}")  # type: ignore[no-any-return]
    pytest.fail(
        f"{request.node.nodeid}: the ctxkit_runner fixture needs an async test run by the anyio "
        "plugin (@pytest.mark.anyio) or by pytest-asyncio (@pytest.mark.asyncio)",
        pytrace=False,
    )


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("ctxkit")
    if marker is None:
        return {}
    if marker.args or set(marker.kwargs) - set(_MARKER_OPTIONS):
        pytest.fail(
            f"{request.node.nodeid}: @pytest.mark.ctxkit takes the keyword arguments "
            f"{', '.join(_MARKER_OPTIONS)}; got {marker.args!r}, {marker.kwargs!r}",
            pytrace=False,
        )
    return dict(marker.kwargs)


def _open_runner(
    request: pytest.FixtureRequest, spans: SpanRecorder
) -> AbstractAsyncContextManager[BackgroundRunner]:
    from ctxkit.testing import open_runner

    options = _options(request)
    return open_runner(
        spans,
        fail_on_error=options.get("fail_on_error", True),
        fail_on_cancel=options.get("fail_on_cancel", True),
        drain_timeout=options.get("drain_timeout", 5.0),
    )


@pytest.fixture
async def _ctxkit_runner_anyio(
    anyio_backend: object, request: pytest.FixtureRequest, ctxkit_spans: SpanRecorder
) -> AsyncIterator[BackgroundRunner]:
    """``ctxkit_runner`` under the anyio plugin (on the test's backend and runner)."""
    async with _open_runner(request, ctxkit_spans) as runner:
        yield runner


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is optional
    pass
else:

    def _asyncio_runner_fixture(scope: _LoopScope) -> object:
        name = f"_ctxkit_runner_asyncio_{scope}"

        @pytest_asyncio.fixture(name=name, loop_scope=scope)
        async def runner_fixture(
            request: pytest.FixtureRequest, ctxkit_spans: SpanRecorder
        ) -> AsyncIterator[BackgroundRunner]:
            async with _open_runner(request, ctxkit_spans) as runner:
                yield runner

        return runner_fixture

    for _scope in _LOOP_SCOPES:
        globals()[f"_ctxkit_runner_asyncio_{_scope}"] = _asyncio_runner_fixture(_scope)
        __all__ += [f"_ctxkit_runner_asyncio_{_scope}"]
