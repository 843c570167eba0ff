"""Benchmark: time to a named crash per fault, hardened vs stock, measured in one run.

For every case of the selected suites: the hardening runtime's outcome and ``t_detect``
(last rank's exit minus the fault's fire time; median, min and max of ``--repeat``
runs), next to what the same fault does with the runtime switched off (profile
``hardened: false``: meta as a plain object broadcast, torch's default process-group timeouts, no parity,
watchdog, digests, lifecycle checks or gates): a crash with an unnamed error, a hang
(a rank still alive at the ``--stock-cap`` deadline; gloo's own timeout is 1800 s,
NCCL's 600 s), or silent drift (every rank exits 0).

    python bench/detect.py [--suites compile,operator] [--repeat 3] [--stock-cap 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from hardening.harness.cases import Case
from hardening.harness.profile import load_profile
from hardening.harness.results import CaseResult, Outcome
from hardening.harness.runner import Runner
from hardening.suites import get_suite


def _ranks(result: CaseResult) -> str:
    parts = []
    for r in result.ranks:
        if r.alive_at_deadline:
            parts.append(f"r{r.rank} alive")
        elif r.exit_code == 0:
            parts.append(f"r{r.rank} ok")
        else:
            parts.append(f"r{r.rank} {r.error_class or r.signal or r.exit_code}")
    return " · ".join(parts)


def _stock_story(result: CaseResult, cap: float) -> str:
    if result.outcome is Outcome.HUNG:
        return f"hang: still blocked at the {cap:g}s cap ({_ranks(result)})"
    if result.outcome in (Outcome.SURVIVED, Outcome.COMPLETED):
        return "silent: every rank exited 0"
    if result.outcome is Outcome.NOT_FIRED:
        return "fault point not reached"
    first = min((r for r in result.ranks if r.exit_code not in (0, None)), key=lambda r: r.exited_at or 1e18, default=None)
    msg = (first.message.splitlines() or [""])[0][:70] if first else ""
    when = f" in {result.t_detect:.2f}s" if result.t_detect is not None else ""
    return f"crash{when}, unnamed: {_ranks(result)}" + (f" ({msg})" if msg else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default="compile,operator")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stock-cap", type=float, default=30.0, help="seconds before a stock case counts as hung")
    parser.add_argument("--only", help="comma-separated case ids")
    args = parser.parse_args()

    cases: list[Case] = [c for name in args.suites.split(",") for c in get_suite(name) if c.fault]
    if args.only:
        cases = [c for c in cases if c.id in args.only.split(",")]
    hardened_profile = load_profile("cpu")
    stock_profile = load_profile(
        "cpu", {"hardened": False, "timeouts.case": args.stock_cap, "timeouts.detect": args.stock_cap}
    )
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    hardened: dict[str, list[CaseResult]] = {c.id: [] for c in cases}
    stock: dict[str, CaseResult] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        with Runner(hardened_profile, run_dir=Path(tmp) / "hardened", progress=progress) as runner:
            for i in range(args.repeat):
                for case in cases:
                    hardened[case.id].append(runner.run_case(case))
                progress(f"hardened round {i + 1}/{args.repeat} done")
        with Runner(stock_profile, run_dir=Path(tmp) / "stock", progress=progress) as runner:
            for case in cases:
                progress(f"stock {case.id} ...")
                stock[case.id] = runner.run_case(case)

    rows = []
    for case in cases:
        runs = hardened[case.id]
        times = [r.t_detect for r in runs if r.t_detect is not None]
        verdicts = {r.verdict.value for r in runs}
        t = f"{statistics.median(times):.2f} ({min(times):.2f}–{max(times):.2f})" if times else "—"
        rows.append(
            [case.id, case.fault, f"{runs[0].outcome.value} {'/'.join(sorted(verdicts)).upper()}", _ranks(runs[0]), t,
             _stock_story(stock[case.id], args.stock_cap)]  # fmt: skip
        )
    import torch

    print(
        f"torch {torch.__version__}, {hardened_profile.world.ranks} ranks, gloo on CPU, "
        f"{args.repeat} hardened runs per case, stock cap {args.stock_cap:g}s, total {time.time() - started:.0f}s"
    )
    print(
        tabulate(
            rows,
            headers=["case", "fault", "hardened", "ranks end with", "t_detect s median (min–max)", "stock (runtime off)"],
            tablefmt="github",
            disable_numparse=True,
        )
    )


if __name__ == "__main__":
    main()
