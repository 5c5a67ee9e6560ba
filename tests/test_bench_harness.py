"""The benchmark harness: per-round ratios, and the shuffled order it records."""

from __future__ import annotations

import pytest

from benchmarks import _harness
from benchmarks._harness import Target, Variant, measure_sync


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
