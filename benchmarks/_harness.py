"""Interleaved rounds, per-round ratios, tables and targets.

A *variant* is one way of doing the operation under test; its ``run`` callable does one batch
(setup and teardown included) and returns the measured quantity of that batch -- elapsed
nanoseconds of the timed part, or bytes for the memory case -- for ``ops`` operations. The
harness runs every variant once per round, in an order shuffled anew each round (C A B, B C A,
...) from a recorded seed, with the garbage collector collected before and disabled during each
batch, and divides each variant's figure by the baseline's figure *of the same round*. The
median of those per-round ratios is the number to read: it cancels the drift of a shared
machine, and the shuffle cancels the bias of always running second after the same neighbour
(a warm or a cold cache, a pending collection of the previous batch's garbage).

The seed is the command line's ``--seed`` (a random one when absent, printed and written to the
JSON); each case's order comes from ``Random(f"{seed}-{case}")``, so one case rerun alone with
the same seed gets the same order.
"""

from __future__ import annotations

import gc
import inspect
import random
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

__all__ = [
    "CaseResult",
    "Row",
    "Settings",
    "Target",
    "TargetResult",
    "Variant",
    "best_of",
    "measure",
    "measure_sync",
    "set_seed",
    "skipped",
    "targets_markdown",
]

_seed: int = 0


def set_seed(seed: int) -> None:
    """Seed the per-round order of every case measured after this call."""
    global _seed  # one run has one seed; the cases need not pass it around
    _seed = seed


def _orders(case: str, variants: Sequence[Variant], rounds: int) -> list[list[Variant]]:
    rng = random.Random(f"{_seed}-{case}")
    orders = []
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        orders.append(order)
    return orders


@dataclass(frozen=True)
class Settings:
    """What the command line asked for."""

    quick: bool = False
    rounds: int | None = None

    def pick_rounds(self, full: int, quick: int) -> int:
        """Return ``--rounds`` if given, else this case's default for the mode."""
        if self.rounds is not None:
            return self.rounds
        return quick if self.quick else full


@dataclass(frozen=True)
class Variant:
    """One way of doing the operation: ``run()`` does a batch of ``ops`` and returns its figure."""

    name: str
    run: Callable[[], int | float] | Callable[[], Awaitable[int | float]]
    ops: int
    ref: str | None = None
    """A second variant to compare with (e.g. ctxkit vs aiojobs), besides the baseline."""


@dataclass(frozen=True)
class Target:
    """A goal: the median ratio of ``variant`` to ``ref`` (same rounds) at most ``limit``."""

    text: str
    variant: str
    ref: str
    limit: float
    strict: bool = False
    """True for "below" (<), False for "at most" (<=)."""
    floor: str | None = None
    """The variant doing the same work by hand with public APIs, measured against ``ref`` too:
    what is left for ctxkit when the floor alone is near (or past) the limit. ``ref`` itself
    when the target is judged against its floor."""


@dataclass
class Row:
    """The figures of one variant."""

    name: str
    ops: int
    per_op: list[float]
    ratios: list[float]
    ref: str | None = None
    ref_ratios: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_op)

    @property
    def minimum(self) -> float:
        return min(self.per_op)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ref_ratio(self) -> float | None:
        return statistics.median(self.ref_ratios) if self.ref_ratios else None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ops_per_batch": self.ops,
            "per_op": self.per_op,
            "median": self.median,
            "min": self.minimum,
            "ratios_to_baseline": self.ratios,
            "ratio_median": self.ratio,
            "ratio_min": min(self.ratios),
            "ratio_max": max(self.ratios),
            "ref": self.ref,
            "ratios_to_ref": self.ref_ratios,
            "ref_ratio_median": self.ref_ratio,
        }


@dataclass
class TargetResult:
    """A target and the median ratio measured for it."""

    target: Target
    ratio: float
    ratios: list[float]
    floor_ratios: list[float] = field(default_factory=list)
    """The floor's per-round ratios to the same ``ref`` (empty: the target names no floor)."""

    @property
    def floor_ratio(self) -> float | None:
        return statistics.median(self.floor_ratios) if self.floor_ratios else None

    @property
    def met(self) -> bool:
        if self.target.strict:
            return self.ratio < self.target.limit
        return self.ratio <= self.target.limit

    def line(self) -> str:
        op = "<" if self.target.strict else "<="
        verdict = "MET   " if self.met else "MISSED"
        floor = ""
        if self.target.floor == self.target.ref:
            floor = "; the ref is the floor"
        elif self.floor_ratio is not None:
            floor = f"; floor {self.floor_ratio:.2f}x: {self.target.floor}"
        return (
            f"  [{verdict}] {self.target.text}: {self.target.variant} / {self.target.ref} = "
            f"{self.ratio:.2f}x (target {op} {self.target.limit:g}x; "
            f"rounds {min(self.ratios):.2f}-{max(self.ratios):.2f}{floor})"
        )

    def markdown(self, case: str) -> str:
        """Return this target of case ``case`` as a row of ``targets_markdown``'s table."""
        op = "<" if self.target.strict else "<="
        verdict = "met" if self.met else "**missed**"
        floor = ""
        if self.target.floor == self.target.ref:
            floor = "the ref"
        elif self.floor_ratio is not None:
            floor = f"{self.floor_ratio:.2f}x {self.target.floor}"
        return (
            f"| {case} | {self.target.text} | {self.target.variant} / {self.target.ref} "
            f"| {self.ratio:.2f}x ({min(self.ratios):.2f}-{max(self.ratios):.2f}) "
            f"| {op} {self.target.limit:g}x | {verdict} | {floor} |"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "text": self.target.text,
            "variant": self.target.variant,
            "ref": self.target.ref,
            "limit": self.target.limit,
            "strict": self.target.strict,
            "ratio_median": self.ratio,
            "ratios": self.ratios,
            "met": self.met,
            "floor": self.target.floor,
            "floor_ratios": self.floor_ratios,
            "floor_ratio_median": self.floor_ratio,
        }


@dataclass
class CaseResult:
    """Everything one case measured."""

    case: str
    title: str
    unit: str
    baseline: str
    rounds: int
    rows: list[Row] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    orders: list[list[str]] = field(default_factory=list)
    """The order the variants ran in, per round (warm-up rounds first)."""

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def table(self) -> str:
        """Return the plain-text table printed on the terminal."""
        head = f"Case {self.case}: {self.title}"
        if self.skipped is not None:
            return f"{head}\n  SKIPPED: {self.skipped}\n"
        lines = [head, f"  baseline: {self.baseline}; {self.rounds} rounds; unit: {self.unit}"]
        width = max(len(r.name) for r in self.rows)
        lines.append(
            f"  {'variant':<{width}}  {'median':>11}  {'min':>11}  {'x baseline':>10}  "
            f"{'(rounds)':>11}  vs ref"
        )
        for r in self.rows:
            spread = f"{min(r.ratios):.2f}-{max(r.ratios):.2f}"
            ref = f"{r.ref_ratio:.2f}x {r.ref}" if r.ref_ratio is not None else ""
            lines.append(
                f"  {r.name:<{width}}  {_num(r.median):>11}  {_num(r.minimum):>11}  "
                f"{r.ratio:>9.2f}x  {spread:>11}  {ref}"
            )
        lines.extend(t.line() for t in self.targets)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        """Return the same table as Markdown (the targets go to ``targets_markdown``)."""
        head = f"### Case {self.case}: {self.title}\n"
        if self.skipped is not None:
            return f"{head}\nSkipped: {self.skipped}\n"
        lines = [
            head,
            f"Baseline: {self.baseline}; {self.rounds} rounds; unit: {self.unit}.\n",
            f"| variant | median {self.unit} | min {self.unit} | x baseline (median) "
            "| x baseline (range over rounds) | vs ref (median) |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            ref = f"{r.ref_ratio:.2f}x {r.ref}" if r.ref_ratio is not None else ""
            lines.append(
                f"| {r.name} | {_num(r.median)} | {_num(r.minimum)} | {r.ratio:.2f}x "
                f"| {min(r.ratios):.2f}-{max(r.ratios):.2f} | {ref} |"
            )
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "title": self.title,
            "unit": self.unit,
            "baseline": self.baseline,
            "rounds": self.rounds,
            "skipped": self.skipped,
            "rows": [r.as_json() for r in self.rows],
            "targets": [t.as_json() for t in self.targets],
            "notes": self.notes,
            "orders": self.orders,
        }


def targets_markdown(results: Sequence[CaseResult]) -> str:
    """Return every target of ``results`` as one Markdown table, each beside its floor row."""
    lines = [
        "| case | target | measured | median (rounds) | limit | verdict "
        "| floor row, over the same ref |",
        "|---|---|---|---:|---:|---|---|",
    ]
    lines.extend(t.markdown(r.case) for r in results for t in r.targets)
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


#: Sub-batches of a micro-benchmark batch; the fastest one stands for the batch (timeit's habit).
CHUNKS = 5


def best_of(run_chunk: Callable[[int, int], int], ops: int, chunks: int = CHUNKS) -> float:
    """Time ``ops`` operations as ``chunks`` equal sub-batches and keep the fastest.

    ``run_chunk(start, stop)`` runs operations ``start`` to ``stop`` and returns its elapsed
    ns. The result is the fastest sub-batch scaled to ``ops`` operations: a microsecond-long
    operation on a shared machine is otherwise at the mercy of any burst of other load.
    """
    size = ops // chunks
    if size * chunks != ops:
        raise ValueError(f"{ops} operations do not split into {chunks} equal chunks")
    return min(run_chunk(i * size, (i + 1) * size) for i in range(chunks)) * chunks


def skipped(case: str, title: str, reason: str) -> CaseResult:
    """Return the result of a case that could not run, saying why."""
    return CaseResult(case, title, "", "", 0, skipped=reason)


class _Collector:
    def __init__(
        self, variants: Sequence[Variant], baseline: str, targets: Sequence[Target]
    ) -> None:
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {names}")
        if baseline not in names:
            raise ValueError(f"baseline {baseline!r} is not a variant")
        # Checked before the first round, not after the last: a misspelt name fails at once.
        named = [v.ref for v in variants]
        named += [n for t in targets for n in (t.variant, t.ref, t.floor)]
        unknown = sorted({n for n in named if n is not None and n not in names})
        if unknown:
            raise ValueError(f"refs, targets or floors name no variant: {unknown}")
        self.variants = variants
        self.baseline = baseline
        self.per_op: dict[str, list[float]] = {n: [] for n in names}
        self.orders: list[list[str]] = []

    def summarize(
        self,
        case: str,
        title: str,
        unit: str,
        rounds: int,
        targets: Sequence[Target],
        notes: Sequence[str],
    ) -> CaseResult:
        base = self.per_op[self.baseline]
        result = CaseResult(case, title, unit, self.baseline, rounds, notes=list(notes))
        result.orders = self.orders
        for v in self.variants:
            mine = self.per_op[v.name]
            row = Row(v.name, v.ops, mine, [a / b for a, b in zip(mine, base, strict=True)])
            if v.ref is not None:
                row.ref = v.ref
                row.ref_ratios = _ratios(mine, self.per_op[v.ref])
            result.rows.append(row)
        for t in targets:
            ratios = _ratios(self.per_op[t.variant], self.per_op[t.ref])
            floor = [] if t.floor is None else _ratios(self.per_op[t.floor], self.per_op[t.ref])
            result.targets.append(TargetResult(t, statistics.median(ratios), ratios, floor))
        return result


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


async def measure(
    case: str,
    title: str,
    variants: Sequence[Variant],
    *,
    baseline: str,
    rounds: int,
    warmup: int = 1,
    unit: str = "ns/op",
    targets: Sequence[Target] = (),
    notes: Sequence[str] = (),
    between: Callable[[], Awaitable[None]] | None = None,
) -> CaseResult:
    """Measure async (or sync) variants in interleaved rounds inside the running event loop.

    ``warmup`` rounds run first and are thrown away. ``between``, when given, is awaited
    after every batch (untimed): a place to let background threads settle.
    """
    collector = _Collector(variants, baseline, targets)
    for i, order in enumerate(_orders(case, variants, warmup + rounds)):
        collector.orders.append([v.name for v in order])
        for v in order:
            figure = await _one_async(v)
            if between is not None:
                await between()
            if i >= warmup:
                collector.per_op[v.name].append(figure / v.ops)
    return collector.summarize(case, title, unit, rounds, targets, notes)


def measure_sync(
    case: str,
    title: str,
    variants: Sequence[Variant],
    *,
    baseline: str,
    rounds: int,
    warmup: int = 1,
    unit: str = "ns/op",
    targets: Sequence[Target] = (),
    notes: Sequence[str] = (),
) -> CaseResult:
    """Measure synchronous variants in interleaved rounds."""
    collector = _Collector(variants, baseline, targets)
    for i, order in enumerate(_orders(case, variants, warmup + rounds)):
        collector.orders.append([v.name for v in order])
        for v in order:
            figure = _one_sync(v)
            if i >= warmup:
                collector.per_op[v.name].append(figure / v.ops)
    return collector.summarize(case, title, unit, rounds, targets, notes)


async def _one_async(variant: Variant) -> float:
    gc.collect()
    gc.disable()
    try:
        figure = variant.run()
        if inspect.isawaitable(figure):
            figure = await figure
    finally:
        gc.enable()
    return float(figure)


def _one_sync(variant: Variant) -> float:
    gc.collect()
    gc.disable()
    try:
        figure = variant.run()
    finally:
        gc.enable()
    if inspect.isawaitable(figure):
        raise TypeError(f"variant {variant.name!r} is async; use measure()")
    return float(figure)
