"""Background tasks of a FastAPI app on uvicorn under wrk: detached against the stock ones.

``python -m benchmarks.case_background [--rounds 5] [--seconds 4] [--connections 16]``

One uvicorn process per variant of benchmarks/_background_app.py, all started at once on free
loopback ports: ``none`` (no background task), ``stock`` (Starlette's ``BackgroundTasks``),
``detached`` (the same app after ``detach_background_tasks``) and ``handwritten`` (the floor:
``asyncio.create_task`` in a copied context plus a strong set). Each round runs Debian's ``wrk``
(keep-alive connections, installed by scripts/ensure-wrk.sh when missing) against every
variant once, in a shuffled order, after one warm-up pass. It reports each variant's
requests/s and p50/p99 latency as medians over the rounds, and the detached variant's ratios
to the others (per round, then the median), beside the targets: throughput >= 0.95x the
hand-written and the stock variants, p99 <= 1.1x both. No tracer provider is installed, so
spans are OpenTelemetry's no-op ones in every variant.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("none", "stock", "detached", "handwritten")
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_wrk() -> str:
    if shutil.which("wrk") is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure-wrk.sh")], check=True)
    binary = shutil.which("wrk")
    if binary is None:
        sys.exit("wrk is not on PATH and scripts/ensure-wrk.sh could not install it")
    return binary


def start(variant: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "benchmarks._background_app:app"),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--no-access-log", "--log-level", "warning"),
        ],
        cwd=ROOT,
        env={**os.environ, "BENCH_VARIANT": variant},
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    sys.exit(f"uvicorn for {variant} did not listen in 30 s")


def parse_latency(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match.group(1)) * UNITS[match.group(2)]


def run_wrk(wrk: str, port: int, seconds: int, connections: int) -> dict[str, float]:
    output = subprocess.run(
        [
            *(wrk, "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency"),
            f"http://127.0.0.1:{port}/",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}  # type: ignore[union-attr]
    for percentile in ("50", "99"):
        value = re.search(rf"^\s+{percentile}%\s+(\S+)", output, re.MULTILINE)
        assert value, output
        result[f"p{percentile}"] = parse_latency(value.group(1))
    if "Non-2xx" in output or "Socket errors" in output:
        sys.exit(f"wrk saw errors:\n{output}")
    return result


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seed", type=int, default=26)
    args = parser.parse_args()
    wrk = ensure_wrk()
    rng = random.Random(args.seed)
    servers = {variant: start(variant) for variant in VARIANTS}
    rounds: list[dict[str, dict[str, float]]] = []
    print(f"before: {load()}")
    try:
        for variant in VARIANTS:  # warm-up
            run_wrk(wrk, servers[variant][1], 1, args.connections)
        for _ in range(args.rounds):
            order = list(VARIANTS)
            rng.shuffle(order)
            rounds.append(
                {v: run_wrk(wrk, servers[v][1], args.seconds, args.connections) for v in order}
            )
    finally:
        for process, _ in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process, _ in servers.values():
            process.wait(timeout=30)
    print(f"after: {load()}")
    print(
        f"\n{args.rounds} rounds x {args.seconds} s per variant, wrk -t1 -c{args.connections}"
        " (keep-alive), medians over the rounds\n"
    )
    print("| variant | requests/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for variant in VARIANTS:
        rps, p50, p99 = (
            statistics.median(r[variant][key] for r in rounds) for key in ("rps", "p50", "p99")
        )
        print(f"| {variant} | {rps:,.0f} | {p50:.2f} | {p99:.2f} |")
    print("\n| detached against | throughput | target | p50 | p99 | target | met |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for other in ("handwritten", "stock", "none"):
        ratio = {
            key: statistics.median(r["detached"][key] / r[other][key] for r in rounds)
            for key in ("rps", "p50", "p99")
        }
        targeted = other != "none"
        met = ratio["rps"] >= 0.95 and ratio["p99"] <= 1.1
        print(
            f"| {other} | {ratio['rps']:.2f}x | {'>= 0.95x' if targeted else '-'} "
            f"| {ratio['p50']:.2f}x | {ratio['p99']:.2f}x | {'<= 1.1x' if targeted else '-'} "
            f"| {('yes' if met else 'NO') if targeted else '-'} |"
        )


if __name__ == "__main__":
    main()
