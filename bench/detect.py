"""Benchmark: time to a named crash per fault, hardened vs stock, measured in one run.

For every case of the selected suites: the hardening runtime's outcome and ``t_detect``
(last rank's exit minus the fault's fire time; median, min and max of ``--repeat``
runs), next to what the same fault does with the runtime switched off (profile
``hardened: false``: meta as a plain object broadcast, torch's default process-group timeouts, no parity,
watchdog, digests, lifecycle checks or gates): a crash with an unnamed error, a hang
(a rank still alive at the ``--stock-cap`` deadline; gloo's own timeout is 1800 s,
NCCL's 600 s), or silent drift (every rank exits 0).

With ``--launchers process,torchrun`` every hardened case also runs under torchrun
(``--launcher torchrun``: the same faults in the same run), and a second table gives what
a case costs to start under each launcher: from asking for the case until every rank's
Session has begun (spawn or fork, ``import torch``), and the control case's wall time.

    python bench/detect.py [--suites compile,operator] [--repeat 3] [--stock-cap 30] [--launchers process,torchrun]
    python bench/detect.py --suites pp --ranks 3 --no-stock   # the pipeline half (bench/results/detect_pp.md)

``--no-stock`` leaves the stock column out (the pipeline has no stock counterpart: with
the runtime off there is no pipeline to run). ``hardening manual`` reads the t_detect
column of every ``bench/results/detect*.md``.
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
    parser.add_argument("--launchers", default="process", help="comma-separated: process, torchrun")
    parser.add_argument("--ranks", type=int, default=2, help="world size (the pp suite's PP1 cases need 3)")
    parser.add_argument("--no-stock", action="store_true", help="skip the runtime-off runs (and their column)")
    args = parser.parse_args()

    suites = [c for name in args.suites.split(",") for c in get_suite(name) if c.min_ranks <= args.ranks]
    cases: list[Case] = [c for c in suites if c.fault]
    controls = [c for c in suites if not c.fault and not c.workload]
    if args.only:
        cases = [c for c in cases if c.id in args.only.split(",")]
    launchers = args.launchers.split(",")
    stock_profile = load_profile(
        "cpu", {"hardened": False, "timeouts.case": args.stock_cap, "timeouts.detect": args.stock_cap, "world.ranks": args.ranks}
    )
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    hardened: dict[str, dict[str, list[CaseResult]]] = {name: {c.id: [] for c in cases} for name in launchers}
    startup: dict[str, list[tuple[float, float]]] = {name: [] for name in launchers}
    stock: dict[str, CaseResult] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in launchers:
            profile = load_profile("cpu", {"world.launcher": name, "world.ranks": args.ranks})
            with Runner(profile, run_dir=Path(tmp) / f"hardened-{name}", progress=progress) as runner:
                for i in range(args.repeat):
                    for case in controls[:1] + cases:
                        asked = time.time()
                        result = runner.run_case(case)
                        begun = [r.started_at for r in result.ranks if r.started_at]
                        if case in controls and len(begun) == len(result.ranks):
                            startup[name].append((max(begun) - asked, result.wall_s))
                        else:
                            hardened[name][case.id].append(result)
                    progress(f"hardened ({name}) round {i + 1}/{args.repeat} done")
        if not args.no_stock:
            with Runner(stock_profile, run_dir=Path(tmp) / "stock", progress=progress) as runner:
                for case in cases:
                    progress(f"stock {case.id} ...")
                    stock[case.id] = runner.run_case(case)

    rows = []
    for case in cases:
        first = hardened[launchers[0]][case.id]
        row = [case.id, case.fault, f"{first[0].outcome.value} {_verdicts(first)}", _ranks(first[0])]
        for name in launchers:
            runs = hardened[name][case.id]
            row.append(_median(r.t_detect for r in runs) + ("" if name == launchers[0] else f" {_verdicts(runs)}"))
        rows.append(row + ([] if args.no_stock else [_stock_story(stock[case.id], args.stock_cap)]))
    import torch

    print(
        f"torch {torch.__version__}, {stock_profile.world.ranks} ranks, gloo on CPU, "
        f"{args.repeat} hardened runs per case and launcher, "
        + ("no stock runs" if args.no_stock else f"stock cap {args.stock_cap:g}s")
        + f", total {time.time() - started:.0f}s"
    )
    print(
        tabulate(
            rows,
            headers=["case", "fault", "hardened", "ranks end with"]
            + [f"t_detect s, {name} (median, min–max)" for name in launchers] + ([] if args.no_stock else ["stock (runtime off)"]),
            tablefmt="github",
            disable_numparse=True,
        )
    )
    if not controls:
        return  # no plain control case in these suites: nothing to time a start with
    print()
    print(
        tabulate(
            [[name, _median(b for b, _ in startup[name]), _median(w for _, w in startup[name])] for name in launchers],
            headers=["launcher", "case asked → every rank's Session begun, s", f"control case {controls[0].id} wall, s"],
            tablefmt="github",
            disable_numparse=True,
        )
    )


def _median(values) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})" if values else "—"


def _verdicts(runs: list[CaseResult]) -> str:
    return "/".join(sorted({r.verdict.value for r in runs})).upper()


if __name__ == "__main__":
    main()
