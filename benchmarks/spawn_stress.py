"""Repeat the test suite's ``ddp_spawn`` tests (marker ``spawn``) and count failed launches.

Issue "Tests that prove", finding 1: a gloo worker could die with SIGABRT (``terminate called without an
active exception``) after training had finished, about 3 launches in 106. Each round runs every spawn
test once in a fresh pytest process; the script prints the running count and, at the end, launches /
failures / aborts. Run it with nothing else on the machine::

    python benchmarks/spawn_stress.py --launches 100
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=100, help="stop after at least this many test launches")
    parser.add_argument("--log", type=Path, default=None, help="append every round's pytest output here")
    args = parser.parse_args(argv)
    launches = failures = aborts = rounds = 0
    start = time.perf_counter()
    while launches < args.launches:
        rounds += 1
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "spawn", "-p", "no:cacheprovider",
                               "-W", "ignore"], cwd=ROOT, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        if args.log:
            with open(args.log, "a") as f:
                f.write(f"==== round {rounds}\n{out}\n")
        passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", out)) else 0
        failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", out)) else 0
        errors = int(m.group(1)) if (m := re.search(r"(\d+) error", out)) else 0
        launches += passed + failed + errors
        failures += failed + errors
        aborts += out.count("terminate called without an active exception")
        print(f"round {rounds}: {passed} passed, {failed + errors} failed; total {launches} launches, "
              f"{failures} failed, {aborts} aborts, {time.perf_counter() - start:.0f} s", flush=True)
        if passed + failed + errors == 0:
            print(out[-3000:])
            return 2
    print(f"{launches} spawn-test launches in {rounds} rounds: {failures} failed, {aborts} worker aborts")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
