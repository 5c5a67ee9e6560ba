"""The benchmark harness: per-round ratios, the shuffled order it records, targets beside their
floor rows; and the benchmark scripts' variants, run small."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry import trace

import ctxkit
from benchmarks import _harness
from benchmarks._common import VARS, set_vars
from benchmarks._harness import Target, Variant, measure_sync, targets_markdown
from ctxkit import _clone

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def _run(seed: int, rounds: int = 8) -> _harness.CaseResult:
    _harness.set_seed(seed)
    figures = {"a": 100, "b": 200, "c": 300}
    variants = [Variant(name, lambda f=f: f, 10) for name, f in figures.items()]
    return measure_sync(
        "t", "test", variants, baseline="a", rounds=rounds, targets=[Target("c/a", "c", "a", 3)]
    )


def test_ratios_are_per_round_against_the_baseline() -> None:
    result = _run(1)
    assert result.row("b").ratio == pytest.approx(2.0)
    assert result.row("a").median == pytest.approx(10.0)  # per op: 100 over 10 ops
    assert result.targets[0].met


def test_each_round_runs_every_variant_once_in_a_recorded_order() -> None:
    result = _run(1)
    assert len(result.orders) == 1 + 8  # the warm-up round, then the measured ones
    assert all(sorted(order) == ["a", "b", "c"] for order in result.orders)
    assert len({tuple(order) for order in result.orders}) > 1  # shuffled, not fixed
    assert result.as_json()["orders"] == result.orders


def test_the_same_seed_gives_the_same_order() -> None:
    assert _run(7).orders == _run(7).orders
    assert _run(7).orders != _run(8).orders


class TestFloors:
    def test_a_target_reports_its_floor_over_the_same_ref(self) -> None:
        """A target's floor ratio is the floor variant over the target's ref, round by round."""
        _harness.set_seed(1)
        figures = {"bare": 100, "floor": 150, "ctxkit": 180}
        variants = [Variant(name, lambda f=f: f, 10) for name, f in figures.items()]
        target = Target("ctxkit <= 2x bare", "ctxkit", "bare", 2.0, floor="floor")
        result = measure_sync("t", "test", variants, baseline="bare", rounds=3, targets=[target])
        (measured,) = result.targets
        assert measured.ratio == pytest.approx(1.8)
        assert measured.floor_ratio == pytest.approx(1.5)
        assert "floor 1.50x: floor" in measured.line()
        assert measured.as_json()["floor_ratio_median"] == pytest.approx(1.5)

    def test_a_target_without_a_floor_says_none(self) -> None:
        (measured,) = _run(1).targets
        assert measured.floor_ratio is None
        assert "floor" not in measured.line()
        assert measured.as_json()["floor"] is None

    def test_the_markdown_summary_puts_each_target_beside_its_floor(self) -> None:
        _harness.set_seed(1)
        variants = [Variant(n, lambda f=f: f, 1) for n, f in (("a", 10), ("b", 30), ("f", 25))]
        targets = [
            Target("b <= 2x a", "b", "a", 2.0, floor="f"),
            Target("b < 4x a", "b", "a", 4.0, strict=True),
            Target("b <= 1.3x f", "b", "f", 1.3, floor="f"),
        ]
        result = measure_sync("9", "t", variants, baseline="a", rounds=2, targets=targets)
        table = targets_markdown([result]).splitlines()
        assert table[4].endswith("| 1.20x (1.20-1.20) | <= 1.3x | met | the ref |")
        assert result.targets[2].line().endswith("; the ref is the floor)")
        assert (
            table[2]
            == "| 9 | b <= 2x a | b / a | 3.00x (3.00-3.00) | <= 2x | **missed** | 2.50x f |"
        )
        assert table[3] == "| 9 | b < 4x a | b / a | 3.00x (3.00-3.00) | < 4x | met |  |"
        assert "**missed**" not in result.markdown()  # the verdicts are in the summary only

    @pytest.mark.parametrize(
        ("target", "unknown"),
        [
            (Target("t", "nope", "a", 1.0), "nope"),
            (Target("t", "a", "a", 1.0, floor="gone"), "gone"),
        ],
    )
    def test_a_target_naming_no_variant_fails_before_the_first_round(
        self, target: Target, unknown: str
    ) -> None:
        ran: list[str] = []

        def run() -> int:
            ran.append("a")
            return 1

        with pytest.raises(ValueError, match=unknown):
            measure_sync("t", "t", [Variant("a", run, 1)], baseline="a", rounds=1, targets=[target])
        assert ran == []


class TestShapesOfVars:
    """Every spawn case passes the 4 vars as a tuple, as a list, and registered."""

    @pytest.mark.parametrize(
        "name",
        [
            "ctxkit.spawn (limit=None), vars list",
            "ctxkit.spawn (limit=100, default), vars list",
            "ctxkit.spawn (limit=None), registered vars",
            "ctxkit.spawn (limit=None), per request, vars list",
        ],
    )
    def test_case_1_runs_each_shape_and_leaves_nothing_registered(self, name: str) -> None:
        from benchmarks import case_spawn

        async def main() -> float:
            set_vars()
            (variant,) = [v for v in case_spawn.variants(20) if v.name == name]
            figure = variant.run()
            assert not isinstance(figure, int | float)
            return await figure

        assert asyncio.run(main()) > 0
        assert _clone.registered() == ()

    @pytest.mark.parametrize(
        "name",
        [
            "ctxkit.spawn (limit=None), vars list",
            "ctxkit.spawn (limit=100, default), vars list",
            "ctxkit.spawn (limit=None), registered vars",
        ],
    )
    def test_case_7_runs_each_shape_on_trio(self, name: str) -> None:
        import trio

        from benchmarks import case_trio

        async def main() -> float:
            set_vars()
            (variant,) = [v for v in case_trio.variants(20) if v.name == name]
            figure = variant.run()
            assert not isinstance(figure, int | float)
            return await figure

        assert trio.run(main) > 0
        assert _clone.registered() == ()

    def test_each_list_row_is_read_against_its_tuple_row(self) -> None:
        from benchmarks import case_spawn, case_trio

        async def names() -> dict[str, str | None]:
            return {v.name: v.ref for v in case_spawn.variants(10)}

        refs = asyncio.run(names())
        refs.update({f"trio {v.name}": v.ref for v in case_trio.variants(10)})
        lists = {name: ref for name, ref in refs.items() if "vars list" in name}
        assert len(lists) == 5
        for name, ref in lists.items():
            assert ref is not None
            assert name.removeprefix("trio ").replace(", vars list", "") == ref


class TestSpanFloor:
    @pytest.mark.parametrize("started", ["at spawn", "in the task"])
    def test_the_wrapper_span_matches_ctxkits_task_span(
        self,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        started: str,
    ) -> None:
        """The floor's span (and the one started in the task) has the name, kind, parent and
        attributes of ctxkit's task span, and is current in the task."""
        from benchmarks.case_span import in_task_span, spawn_in_span

        tracer = tracer_provider.get_tracer("test")

        def start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
            if started == "at spawn":
                return spawn_in_span(coro, tracer)
            return asyncio.create_task(in_task_span(coro, tracer))

        seen: list[trace.Span] = []

        async def work() -> None:
            seen.append(trace.get_current_span())

        async def main() -> None:
            set_vars()
            async with ctxkit.BackgroundRunner(tracer_provider=tracer_provider):
                with tracer.start_as_current_span("request"):
                    await ctxkit.spawn(work(), vars=VARS, span=True).wait()
                    await start(work())

        asyncio.run(main())
        theirs, ours, request = span_exporter.get_finished_spans()
        assert (ours.name, ours.kind, ours.parent) == (theirs.name, theirs.kind, theirs.parent)
        assert ours.parent is not None
        assert ours.parent.span_id == request.context.span_id
        assert dict(ours.attributes or {}) == dict(theirs.attributes or {})
        assert dict(ours.attributes or {}) == {
            "ctxkit.async": True,
            "ctxkit.task.name": "TestSpanFloor.test_the_wrapper_span_matches_ctxkits_task_span"
            ".<locals>.work",
            "ctxkit.task.outcome": "ok",
        }
        assert [s.get_span_context() for s in seen] == [theirs.context, ours.context]

    def test_the_wrapper_records_an_error(
        self, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
    ) -> None:
        from benchmarks.case_span import in_task_span

        async def fail() -> None:
            raise ValueError("boom")

        async def main() -> None:
            await asyncio.create_task(in_task_span(fail(), tracer_provider.get_tracer("t")))

        asyncio.run(main())
        (span,) = span_exporter.get_finished_spans()
        assert (span.attributes or {})["ctxkit.task.outcome"] == "error"
        assert span.status.status_code is trace.StatusCode.ERROR
        assert [event.name for event in span.events] == ["exception"]

    def test_case_2_compares_ctxkit_with_the_floor(self) -> None:
        from benchmarks import case_span

        (target,) = [t for t in case_span.TARGETS if t.ref == case_span.FLOOR_TASK]
        assert (target.variant, target.limit) == (case_span.CTXKIT, 1.15)
        assert target.floor == target.ref
        setup = case_span._Setup()
        try:
            names = [v.name for v in case_span.variants(10, setup)]
        finally:
            setup.shutdown()
        assert {
            case_span.FLOOR_TASK,
            case_span.LAZY_TASK,
            case_span.CTXKIT,
            case_span.CTXKIT_LIST,
        } <= set(names)


def test_the_per_call_benchmark_runs_and_finds_every_handle(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m benchmarks.calls`` measures lookups that find the handle (it raises if one
    answers None, as it would outside a background task or past a removed task factory)."""
    from benchmarks import calls

    assert calls.main(["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "ctxkit.current_task(), wrapping task factory" in out
    assert "trio.lowlevel.current_task()" in out


def test_the_layers_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import layers

    assert layers.main(["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "7. row 6, at most 100 running" in out
    assert "ctxkit.spawn (limit=100)" in out


def test_the_paired_benchmark_runs_against_this_very_commit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import paired

    assert paired.main(["HEAD", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "ctxkit here (limit=100)" in out
    assert "ctxkit at HEAD (limit=None)" in out
    assert "ctxkit here (limit=None), vars list" in out
    assert "ctxkit at HEAD (limit=100), registered vars" in out
    assert _clone.registered() == ()


def test_the_paired_benchmark_runs_the_shapes_asked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import paired

    assert paired.main(["HEAD", "--vars", "list", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "ctxkit here (limit=None), vars list" in out
    assert "ctxkit here (limit=None)  " not in out  # the tuple's row, padded in the table
    assert "registered vars" not in out


def test_the_paired_benchmark_refuses_an_unknown_shape(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import paired

    with pytest.raises(SystemExit):
        paired.main(["HEAD", "--vars", "tuple,set"])
    assert "unknown shape(s) set" in capsys.readouterr().err


def test_the_paired_benchmark_compares_clones(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import paired

    assert paired.main(["HEAD", "--case", "clone", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "clone_without_span here, 4 vars, same source" in out
    assert "clone_without_span at HEAD, 4 vars, new source" in out


def test_the_paired_benchmark_runs_on_trio(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import paired

    assert paired.main(["HEAD", "--case", "trio", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "trio nursery.start_soon" in out
    assert "ctxkit here (limit=100)" in out
    assert "ctxkit here (limit=100), vars list" in out
    assert "ctxkit at HEAD (limit=None), registered vars" in out
