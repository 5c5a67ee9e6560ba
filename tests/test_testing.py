"""Tests for ctxkit.testing (SpanRecorder, open_runner) and the pytest plugin's fixtures."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import ctxkit
from ctxkit.testing import SpanRecorder, open_runner

from ._support import FILTERWARNINGS

if TYPE_CHECKING:
    from collections.abc import Iterator

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def recorder() -> Iterator[SpanRecorder]:
    with SpanRecorder() as spans:
        yield spans


async def noop() -> None:
    pass


async def fail() -> None:
    raise ValueError("boom")


async def forever() -> None:
    await anyio.sleep_forever()


class TestSpanRecorder:
    def test_records_the_spans_of_its_provider_in_end_order(self, recorder: SpanRecorder) -> None:
        """Spans ended through the recorder's provider are kept, in the order they ended."""
        tracer = recorder.tracer()
        with tracer.start_as_current_span("outer"), tracer.start_as_current_span("inner"):
            pass
        assert [span.name for span in recorder.spans] == ["inner", "outer"]
        assert recorder.exporter.get_finished_spans() == tuple(recorder.spans)
        assert repr(recorder) == "<SpanRecorder 2 finished spans>"

    def test_never_touches_the_global_provider(self, recorder: SpanRecorder) -> None:
        """Spans of the global provider are not recorded; the recorder has its own provider."""
        with trace.get_tracer("elsewhere").start_as_current_span("global"):
            pass
        assert recorder.spans == []
        assert trace.get_tracer_provider() is not recorder.provider

    def test_by_name_and_one(self, recorder: SpanRecorder) -> None:
        """by_name lists spans of a name; one returns the only one or fails with the tree."""
        tracer = recorder.tracer()
        for name in ("a", "b", "b"):
            with tracer.start_as_current_span(name):
                pass
        assert len(recorder.by_name("b")) == 2
        assert recorder.one("a").name == "a"
        with pytest.raises(AssertionError, match=r"exactly one .* named 'b', found 2\ntrace"):
            recorder.one("b")
        with pytest.raises(AssertionError, match="found 0"):
            recorder.one("c")

    def test_get_accepts_every_kind_of_span(self, recorder: SpanRecorder) -> None:
        """get finds the finished span of a live span, a finished span or a SpanContext."""
        with recorder.tracer().start_as_current_span("s") as live:
            pass
        finished = recorder.one("s")
        assert recorder.get(live) is finished
        assert recorder.get(finished) is finished
        assert recorder.get(live.get_span_context()) is finished

    def test_get_fails_for_a_span_that_has_not_ended(self, recorder: SpanRecorder) -> None:
        """A span still open (or from another provider) is not found, and the message says so."""
        span = recorder.tracer().start_span("open")
        with pytest.raises(AssertionError, match="has it ended"):
            recorder.get(span)
        span.end()
        assert recorder.get(span).name == "open"

    def test_rejects_what_is_not_a_span(self, recorder: SpanRecorder) -> None:
        """Anything but a span, SpanContext or task raises TypeError at once."""
        with pytest.raises(TypeError, match="expected a span, a SpanContext or a BackgroundTask"):
            recorder.get("span")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="expected a span"):
            recorder.children_of(object())  # type: ignore[arg-type]

    def test_in_trace_takes_an_int_a_hex_string_or_a_span(self, recorder: SpanRecorder) -> None:
        """in_trace selects the spans of one trace, named by id or by one of its spans."""
        tracer = recorder.tracer()
        with tracer.start_as_current_span("root") as root, tracer.start_as_current_span("child"):
            pass
        with tracer.start_as_current_span("other"):
            pass
        trace_id = root.get_span_context().trace_id
        names = {"root", "child"}
        assert {s.name for s in recorder.in_trace(trace_id)} == names
        assert {s.name for s in recorder.in_trace(f"{trace_id:032x}")} == names
        assert {s.name for s in recorder.in_trace(root)} == names
        with pytest.raises(ValueError, match="32 hex characters, got 'xyz'"):
            recorder.in_trace("xyz")
        with pytest.raises(TypeError, match="expected a trace id or a span, got True"):
            recorder.in_trace(True)

    def test_children_and_assert_child_of(self, recorder: SpanRecorder) -> None:
        """children_of lists direct children; assert_child_of checks trace and parent id."""
        tracer = recorder.tracer()
        with (
            tracer.start_as_current_span("parent") as parent,
            tracer.start_as_current_span("child") as child,
            tracer.start_as_current_span("grandchild"),
        ):
            pass
        with tracer.start_as_current_span("stranger") as stranger:
            pass
        assert [s.name for s in recorder.children_of(parent)] == ["child"]
        recorder.assert_child_of(child, parent)
        with pytest.raises(AssertionError, match=r"'child' has parent [0-9a-f]{16} in trace"):
            recorder.assert_child_of(child, stranger)
        with pytest.raises(AssertionError, match="'parent' has no parent"):
            recorder.assert_child_of(parent, stranger)

    def test_assert_linked(self, recorder: SpanRecorder) -> None:
        """assert_linked passes only for a span link to exactly that span."""
        tracer = recorder.tracer()
        with tracer.start_as_current_span("producer") as producer:
            pass
        with tracer.start_as_current_span("other") as other:
            pass
        with tracer.start_as_current_span(
            "consumer", links=[trace.Link(producer.get_span_context())]
        ) as consumer:
            pass
        recorder.assert_linked(consumer, producer)
        with pytest.raises(AssertionError, match="'consumer' has no link to span"):
            recorder.assert_linked(consumer, other)

    def test_render_draws_one_tree_per_trace(self, recorder: SpanRecorder) -> None:
        """render shows kinds, outcomes, errors, remote parents and links, indented."""
        assert recorder.render() == "(no finished spans)"
        tracer = recorder.tracer()
        remote = trace.SpanContext(
            0x0AF7651916CD43DD8448EB211C80319C,
            0xB7AD6B7169203331,
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        with (
            tracer.start_as_current_span(
                "GET /",
                context=trace.set_span_in_context(trace.NonRecordingSpan(remote)),
                kind=trace.SpanKind.SERVER,
            ) as request,
            tracer.start_as_current_span(
                "task", attributes={"ctxkit.task.outcome": "error"}
            ) as task,
        ):
            task.set_status(StatusCode.ERROR, "ValueError: boom")
        with tracer.start_as_current_span(
            "linked", links=[trace.Link(request.get_span_context())]
        ) as linked:
            pass
        request_id = request.get_span_context().span_id
        assert recorder.render() == "\n".join(
            [
                "trace 0af7651916cd43dd8448eb211c80319c",
                "  GET /  [SERVER, remote parent b7ad6b7169203331]",
                "    task  [INTERNAL, outcome=error, status=ERROR(ValueError: boom)]",
                f"trace {linked.get_span_context().trace_id:032x}",
                "  linked  [INTERNAL]",
                f"    link -> trace 0af7651916cd43dd8448eb211c80319c span {request_id:016x}",
            ]
        )

    def test_clear_and_shutdown(self) -> None:
        """clear forgets spans; after shutdown (or the with block) nothing more is recorded."""
        with SpanRecorder() as recorder:
            tracer = recorder.tracer()
            with tracer.start_as_current_span("a"):
                pass
            recorder.clear()
            assert recorder.spans == []
        with tracer.start_as_current_span("after"):
            pass
        assert recorder.spans == []

    def test_without_the_sdk_says_what_to_install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without opentelemetry-sdk, making a recorder raises ImportError naming the extra."""
        monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
        with pytest.raises(ImportError, match=r"pip install 'ctxkit-async\[sdk\]'"):
            SpanRecorder()


class TestOpenRunner:
    @pytest.mark.anyio
    async def test_spawned_work_is_recorded_and_drained(self, recorder: SpanRecorder) -> None:
        """ctxkit.spawn uses the runner; drain waits; task spans are children of the caller."""
        async with open_runner(recorder) as runner:
            assert ctxkit.current_runner() is runner
            with recorder.tracer().start_as_current_span("request") as request:
                task = ctxkit.spawn(noop)
            await runner.drain()
            assert task.outcome == "ok"
            recorder.assert_child_of(task, request)
            assert recorder.get(task).name == "noop"
        assert runner.closed

    @pytest.mark.anyio
    async def test_a_failed_task_fails_the_block(self, recorder: SpanRecorder) -> None:
        """A task that raised makes the block raise AssertionError with its name and trace id."""
        with pytest.raises(AssertionError) as info:
            async with open_runner(recorder):
                task = ctxkit.spawn(fail)
        message = str(info.value)
        assert f"background task 'fail' raised ValueError('boom') [trace_id={task.trace_id}]" in (
            message
        )
        assert "ctxkit log:\n  background task 'fail' failed: ValueError: boom" in message

    @pytest.mark.anyio
    async def test_expected_failures_pass_with_fail_on_error_false(
        self, recorder: SpanRecorder
    ) -> None:
        """With fail_on_error=False a failed task is left for the test to assert on."""
        async with open_runner(recorder, fail_on_error=False):
            task = ctxkit.spawn(fail)
            assert await task.wait() == "error"
        assert recorder.get(task).status.status_code is StatusCode.ERROR

    @pytest.mark.anyio
    async def test_a_timed_out_task_fails_the_block(self) -> None:
        """A task that timed out counts as a failure."""
        with pytest.raises(AssertionError, match=r"1 background task\(s\) timed out"):
            async with open_runner():
                ctxkit.spawn(forever, timeout=0.01)

    @pytest.mark.anyio
    async def test_work_left_running_is_cancelled_and_fails_the_block(self) -> None:
        """A task still running after drain_timeout is cancelled and reported."""
        with pytest.raises(AssertionError, match=r"1 background task\(s\) were still running"):
            async with open_runner(drain_timeout=0.05):
                task = ctxkit.spawn(forever)
        assert task.outcome == "cancelled"

    @pytest.mark.anyio
    async def test_left_over_work_passes_with_fail_on_cancel_false(self) -> None:
        """With fail_on_cancel=False the leftover task is cancelled quietly."""
        async with open_runner(drain_timeout=0.05, fail_on_cancel=False):
            task = ctxkit.spawn(forever)
        assert task.outcome == "cancelled"

    @pytest.mark.anyio
    async def test_tasks_the_test_cancels_are_no_failure(self) -> None:
        """Cancelling a task in the test is not a leftover, even if it ends during the drain."""
        async with open_runner():
            task = ctxkit.spawn(forever)
            await anyio.lowlevel.checkpoint()
            task.cancel()
        assert task.outcome == "cancelled"

    @pytest.mark.anyio
    async def test_an_error_in_the_block_propagates_and_cancels_at_once(self) -> None:
        """The block's exception propagates unchanged; the tasks are cancelled without a wait."""
        tasks: list[ctxkit.BackgroundTask[None]] = []

        async def body() -> None:
            async with open_runner(drain_timeout=60):
                tasks.append(ctxkit.spawn(forever))
                raise KeyError("in the test")

        with anyio.fail_after(5), pytest.raises(KeyError, match="in the test"):
            await body()
        assert tasks[0].outcome == "cancelled"


# -- the pytest plugin, run with pytester --------------------------------------------------

INI = (
    "\n[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    + FILTERWARNINGS
)


#: The module of the ``pytest11`` entry point pyproject.toml declares.
PLUGIN = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
    "pytest11"
]["ctxkit"]


def plugin_args() -> list[str]:
    """Load the plugin explicitly when the installed metadata predates its entry point."""
    for entry_point in importlib.metadata.entry_points(group="pytest11"):
        if entry_point.value == PLUGIN:
            return ["-p", "no:cacheprovider"]
    return ["-p", "no:cacheprovider", "-p", "no:ctxkit", "-p", PLUGIN]


#: Prints the top-level ctxkit and opentelemetry modules imported so far, as JSON.
IMPORTED = (
    "import json, sys; print(json.dumps(sorted({name.split('.')[0] for name in sys.modules} "
    "& {'ctxkit', 'opentelemetry'})))"
)


def docs_examples() -> dict[str, str]:
    """The titled code blocks of docs/testing.md, by file name."""
    text = (ROOT / "docs" / "testing.md").read_text()
    return dict(re.findall(r'```python title="([\w.]+)"\n(.*?)```', text, flags=re.DOTALL))


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    return pytester


class TestPlugin:
    def test_is_declared_as_the_ctxkit_entry_point(self) -> None:
        """pyproject.toml declares the plugin under pytest11, so installing ctxkit loads it."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert project["entry-points"]["pytest11"] == {"ctxkit": "_ctxkit_pytestplugin"}

    def test_loading_it_imports_neither_ctxkit_nor_opentelemetry(self) -> None:
        """pytest loads the entry point's module in every run of every project where ctxkit is
        installed: importing it, in a fresh interpreter, imports nothing of ctxkit or
        OpenTelemetry."""
        code = f"import {PLUGIN}; {IMPORTED}"
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(result.stdout) == []

    def test_a_run_imports_ctxkit_only_when_a_fixture_is_used(self, inner: pytest.Pytester) -> None:
        """In a pytest run with the plugin loaded, a test that uses no ctxkit fixture finds
        ctxkit and OpenTelemetry not imported; a later test's ctxkit_spans imports them."""
        inner.makepyfile(
            """
            import sys

            def imported():
                modules = {name.split(".")[0] for name in sys.modules}
                return sorted(modules & {"ctxkit", "opentelemetry"})

            def test_first_without_fixtures():
                assert imported() == []

            def test_then_with_a_fixture(ctxkit_spans):
                assert ctxkit_spans.spans == []
                assert imported() == ["ctxkit", "opentelemetry"]
            """
        )
        inner.runpytest_subprocess(*plugin_args()).assert_outcomes(passed=2)

    def test_the_former_module_still_loads_the_plugin(self, inner: pytest.Pytester) -> None:
        """``-p ctxkit._pytest_plugin`` (the plugin's former home) still gives the fixtures."""
        inner.makepyfile(
            """
            import pytest

            @pytest.mark.ctxkit(drain_timeout=1.0)
            @pytest.mark.anyio
            async def test_it(ctxkit_runner, ctxkit_spans):
                assert ctxkit_spans.spans == []
            """
        )
        args = ["-p", "no:cacheprovider", "-p", "no:ctxkit", "-p", "ctxkit._pytest_plugin"]
        inner.runpytest(*args).assert_outcomes(passed=2)

    def test_docs_example_under_anyio_on_both_backends(self, inner: pytest.Pytester) -> None:
        """The anyio example of docs/testing.md passes on asyncio and on trio."""
        inner.makepyfile(test_signup_anyio=docs_examples()["test_signup_anyio.py"])
        result = inner.runpytest(*plugin_args(), "-v")
        result.assert_outcomes(passed=4)
        result.stdout.fnmatch_lines(["*[[]asyncio[]] PASSED*", "*[[]trio[]] PASSED*"])

    def test_docs_example_under_pytest_asyncio(self, inner: pytest.Pytester) -> None:
        """The pytest-asyncio example passes, on a function and on a module loop_scope."""
        inner.makepyfile(test_signup_asyncio=docs_examples()["test_signup_asyncio.py"])
        inner.runpytest(*plugin_args()).assert_outcomes(passed=2)

    def test_docs_global_provider_recipe(self, inner: pytest.Pytester) -> None:
        """The conftest that installs a session-wide global provider works (own process)."""
        examples = docs_examples()
        inner.makeconftest(examples["conftest.py"])
        inner.makepyfile(test_global_provider=examples["test_global_provider.py"])
        inner.runpytest_subprocess(*plugin_args()).assert_outcomes(passed=2)

    @pytest.mark.parametrize("marker", ["anyio", "asyncio"])
    def test_a_failed_task_fails_the_test_at_teardown(
        self, inner: pytest.Pytester, marker: str
    ) -> None:
        """A background failure the test did not expect is an error, with name and trace id."""
        inner.makepyfile(
            f"""
            import pytest
            import ctxkit

            async def fail() -> None:
                raise ValueError("boom")

            @pytest.fixture
            def anyio_backend():
                return "asyncio"

            @pytest.mark.{marker}
            async def test_spawns(ctxkit_runner):
                ctxkit.spawn(fail)
            """
        )
        result = inner.runpytest(*plugin_args())
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            ["*AssertionError: background task 'fail' raised ValueError('boom') [[]trace_id=*"]
        )

    def test_the_marker_sets_the_options(self, inner: pytest.Pytester) -> None:
        """@pytest.mark.ctxkit(...) reaches open_runner: no failure, a short drain."""
        inner.makepyfile(
            """
            import anyio
            import pytest
            import ctxkit

            async def fail() -> None:
                raise ValueError("boom")

            pytestmark = [
                pytest.mark.anyio,
                pytest.mark.ctxkit(fail_on_error=False, fail_on_cancel=False, drain_timeout=0.01),
            ]

            async def test_expected_failure(ctxkit_runner):
                assert await ctxkit.spawn(fail).wait() == "error"

            async def test_left_running(ctxkit_runner):
                ctxkit.spawn(anyio.sleep_forever)
            """
        )
        inner.runpytest(*plugin_args()).assert_outcomes(passed=4)

    def test_a_bad_marker_is_a_usage_error(self, inner: pytest.Pytester) -> None:
        """Unknown marker arguments are refused with the accepted names."""
        inner.makepyfile(
            """
            import pytest

            @pytest.mark.ctxkit(drain=1)
            @pytest.mark.anyio
            async def test_it(ctxkit_runner):
                pass
            """
        )
        result = inner.runpytest(*plugin_args())
        result.assert_outcomes(errors=2)
        result.stdout.fnmatch_lines(["*takes the keyword arguments fail_on_error*"])

    def test_a_sync_test_cannot_have_a_runner(self, inner: pytest.Pytester) -> None:
        """ctxkit_runner in a sync test is a usage error that names both plugins."""
        inner.makepyfile(
            """
            def test_sync(ctxkit_runner):
                pass

            def test_spans_work_anywhere(ctxkit_spans):
                assert ctxkit_spans.spans == []
            """
        )
        result = inner.runpytest(*plugin_args())
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*needs an async test run by the anyio plugin*"])

    def test_the_marker_is_registered(self, inner: pytest.Pytester) -> None:
        """--strict-markers accepts @pytest.mark.ctxkit, and --markers describes it."""
        result = inner.runpytest(*plugin_args(), "--markers")
        result.stdout.fnmatch_lines(["@pytest.mark.ctxkit(fail_on_error=True*"])
