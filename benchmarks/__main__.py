"""Run the benchmark suite: ``python -m benchmarks [--quick] [--json PATH] [--cases 1,3]``."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import sys
import time
from typing import TYPE_CHECKING, Any

from ._harness import Settings, set_seed, targets_markdown

if TYPE_CHECKING:
    from ._harness import CaseResult

#: Case number -> (module, what it measures).
CASES: dict[str, tuple[str, str]] = {
    "1": ("case_spawn", "spawn without span vs create_task, TaskGroup, aiojobs, anyio"),
    "2": ("case_span", "spawn with a span per task vs opentelemetry-instrumentation-asyncio"),
    "3": ("case_clone", "clone / clone_without_span vs copy_context and a hand-built Context"),
    "4": ("case_propagation", "inject / extract / consume vs OpenTelemetry's propagate"),
    "5": ("case_memory", "memory per pending task"),
    "6": ("case_scaling", "cost per task from 1e3 to 1e6 tasks; drain and cancel at shutdown"),
    "7": ("case_trio", "spawn on trio vs nursery.start_soon and anyio"),
    "8": ("case_celery", "Celery per-job overhead vs opentelemetry-instrumentation-celery"),
    "9": ("case_threads", "spawn from a thread; ContextExecutor vs a plain executor"),
    "10": ("case_procrastinate", "procrastinate per-job overhead vs procrastinate alone"),
    "11": ("case_dramatiq", "dramatiq per-job overhead vs dramatiq without ctxkit"),
    "12": ("case_arq", "arq per-job overhead vs arq without ctxkit (run in .venv-arq)"),
}

_PACKAGES = (
    "ctxkit-async",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-asyncio",
    "opentelemetry-instrumentation-celery",
    "celery",
    "procrastinate",
    "dramatiq",
    "arq",
    "aiojobs",
    "anyio",
    "trio",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Return what the results depend on: interpreter, CPU, packages, date."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "python_full": sys.version,
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "packages": versions,
    }


def _parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}"
        )
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="ctxkit benchmarks: interleaved rounds, ratios to a baseline of the same "
        "round. Cases: " + "; ".join(f"{k}: {v[1]}" for k, v in CASES.items()),
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and smaller sizes (under a minute)"
    )
    parser.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument(
        "--markdown",
        metavar="PATH",
        help="write the targets (each beside its floor row) and the tables as Markdown, "
        "the form of benchmarks/RESULTS.md",
    )
    parser.add_argument(
        "--cases",
        type=_parse_cases,
        default=list(CASES),
        metavar="1,3,...",
        help="which cases to run (default: all)",
    )
    parser.add_argument(
        "--rounds", type=int, metavar="N", help="measured rounds per case (overrides defaults)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed of the per-round shuffled order of variants (default: a random one, printed)",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    settings = Settings(quick=args.quick, rounds=args.rounds)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    set_seed(seed)
    # The shutdown cases cancel tasks on purpose; ctxkit says so at WARNING. Keep errors.
    logging.getLogger("ctxkit").setLevel(logging.ERROR)

    info = machine()
    mode = "quick" if args.quick else "full"
    print(f"ctxkit benchmarks ({mode}) -- {info['date']}")
    print(f"Python {info['python']} ({info['implementation']}) on {info['platform']}")
    print(f"CPU: {info['cpu']} x {info['cpus']}; load average {info['load_average']}")
    print("Packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    print(f"Seed of the per-round variant order: {seed} (rerun with --seed {seed})")
    print("Read the 'x baseline' column (median of per-round ratios), not the absolute times.")
    print()

    results: list[CaseResult] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for case in args.cases:
        module = importlib.import_module(f"benchmarks.{CASES[case][0]}")
        t0 = time.perf_counter()
        case_results: list[CaseResult] = module.run(settings)
        timings[case] = time.perf_counter() - t0
        for result in case_results:
            print(result.table())
        print(f"  (case {case} took {timings[case]:.1f} s)\n", flush=True)
        results.extend(case_results)
    total = time.perf_counter() - started

    targets = [t for r in results for t in r.targets]
    met = sum(t.met for t in targets)
    print(f"Targets: {met} of {len(targets)} met. Total {total:.1f} s.")
    for t in targets:
        print(t.line())

    if args.json:
        payload = {
            "mode": mode,
            "argv": sys.argv[1:] if argv is None else argv,
            "seed": seed,
            "machine": info,
            "seconds": {"total": total, **timings},
            "cases": [r.as_json() for r in results],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"\nWrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("## Targets\n\n" + targets_markdown(results) + "\n## Tables\n\n")
            f.write("\n".join(r.markdown() for r in results))
        print(f"Wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
