"""Benchmark: what a case pays to start its ranks, fork server vs fresh processes.

Prints one table measured in this run: the wall time for N fresh interpreters to import
what a rank needs (what a spawn-per-case runner pays on every case), against the wall
time of a whole parity-only case (C-01: launch, init, parity, exit) through the
runner's fork server, and the fork server's one-time start.

    python bench/startup.py [--ranks 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

RANK_IMPORTS = (
    "import torch, torch._dynamo, torch.distributed, torch.distributed._functional_collectives, "
    "hardening.harness.worker, hardening.harness.reference"
)


def fresh_imports(ranks: int) -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_IMPORTS]) for _ in range(ranks)]
    for p in procs:
        if p.wait(timeout=300) != 0:
            raise SystemExit("fresh import failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from hardening.harness.profile import load_profile
    from hardening.harness.runner import Runner
    from hardening.suites import get_suite

    profile = load_profile("cpu", {"world.ranks": args.ranks})
    case = next(c for c in get_suite("compile") if c.id == "C-01")
    spawn = [fresh_imports(args.ranks) for _ in range(args.repeat)]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with Runner(profile, run_dir=Path(tmp), progress=lambda line: None) as runner:
            server_start = time.perf_counter() - started
            forked = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                result = runner.run_case(case)
                forked.append(time.perf_counter() - t0)
                assert result.verdict.value == "pass", result.reason
    spawn_s, forked_s = statistics.median(spawn), statistics.median(forked)
    rows = [
        [f"fresh spawn: {args.ranks} interpreters import the rank stack (per case)", f"{spawn_s:.2f}"],
        [f"fork server: whole C-01 case, {args.ranks} ranks launched to exit (per case)", f"{forked_s:.2f}"],
        ["fork server: one-time start (runner + server import, in parallel)", f"{server_start:.2f}"],
        ["per-case start cost saved, ratio spawn / fork server", f"{spawn_s / forked_s:.0f}x"],
    ]
    print(f"median of {args.repeat} runs, {args.ranks} ranks, torch imported fresh each spawn")
    print(tabulate(rows, headers=["what", "seconds"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
