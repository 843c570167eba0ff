"""The ``hardening`` command: suite, list, triage, doctor. Exit codes are chosen here only."""

from __future__ import annotations

import argparse
import enum
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tabulate import tabulate

if TYPE_CHECKING:
    from hardening.results import SuiteResult


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # a case failed
    INTERRUPTED = 2
    INTERNAL_ERROR = 3
    USAGE_ERROR = 4  # bad profile, unknown suite / fault / case / target
    NO_CASES = 5
    INDETERMINATE = 6  # only unknown verdicts besides passes


def exit_code_for(result: "SuiteResult") -> ExitCode:
    from hardening.results import Outcome, Verdict

    if result.interrupted:
        return ExitCode.INTERRUPTED
    if result.harness_error or any(c.outcome is Outcome.HARNESS_ERROR for c in result.cases):
        return ExitCode.INTERNAL_ERROR
    if not result.cases:
        return ExitCode.NO_CASES
    if any(c.verdict is Verdict.FAIL for c in result.cases):
        return ExitCode.FAILED
    if any(c.verdict is Verdict.UNKNOWN for c in result.cases):
        return ExitCode.INDETERMINATE
    return ExitCode.OK


class UsageError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hardening",
        description="Fault-inject a tensor-parallel torch.compile region and check every fault crashes fast, by name.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("suite", help="run a suite of cases (compile, all)")
    s.add_argument("name", help="suite name: compile, or all")
    s.add_argument("--ranks", type=int, help="number of ranks (overrides world.ranks)")
    s.add_argument("--profile", help="shipped profile name (cpu, premerge, h200) or a YAML file; default cpu")
    s.add_argument("--only", help="comma-separated case ids, e.g. control,C-01")
    s.add_argument("--target", help="region factory module:function or file.py:function (overrides region.target)")
    s.add_argument(
        "--torch-trace", action="store_true",
        help="every rank writes torch's structured compile trace to rank<r>/torch_trace/ (for tlparse)",
    )  # fmt: skip
    s.add_argument("--json", metavar="FILE", help="write the JSON report here")
    s.add_argument("--junit", metavar="FILE", help="write a JUnit XML report here")
    s.add_argument("--artifacts", metavar="DIR", help="run directory (default .hardening/runs/<time>-<suite>)")
    ls = sub.add_parser("list", help="show the operator matrix: id, fault, expectation, budget")
    ls.add_argument("suite", nargs="?", default="all")
    t = sub.add_parser("triage", help="py-spy stacks of live processes, side by side")
    t.add_argument("pids", nargs="+", type=int)
    t.add_argument("--native", action="store_true", help="include native frames")
    t.add_argument("--out", metavar="DIR", help="save each dump in DIR")
    sub.add_parser("doctor", help="check torch, backends, py-spy/ptrace and compilers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "suite":
            return _suite(args)
        if args.command == "list":
            return _list(args)
        if args.command == "triage":
            return _triage(args)
        if args.command == "doctor":
            return _doctor()
    except UsageError as exc:
        print(f"hardening: usage error: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except KeyboardInterrupt:
        print("hardening: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    raise AssertionError(args.command)


def _select_cases(name: str, only: str | None, world_size: int) -> list:
    from hardening.suites import get_suite

    try:
        cases = get_suite(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if only:
        wanted = [i.strip() for i in only.split(",") if i.strip()]
        known = {c.id for c in cases}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise UsageError(f"unknown case id(s) {unknown} in suite {name!r}; known: {', '.join(sorted(known))}")
        cases = [c for c in cases if c.id in wanted]
    runnable = [c for c in cases if c.min_ranks <= world_size]
    for case in cases:
        if case not in runnable:
            print(f"hardening: skipping {case.id}: needs {case.min_ranks} ranks, have {world_size}", file=sys.stderr)
    return runnable


def _validate(profile, cases) -> None:
    """Everything that can be wrong with the request is found before a process starts."""
    from hardening.inject import FaultSpecError, validate_spec
    from hardening.reference import validate_dims
    from hardening.region import load_factory

    for case in cases:
        if case.fault:
            try:
                validate_spec(case.fault, world_size=profile.world.ranks)
            except FaultSpecError as exc:
                raise UsageError(f"case {case.id}: {exc}") from None
    try:
        load_factory(profile.region.target)
        if profile.region.target == "hardening.reference:build":
            validate_dims(profile.region.dims, profile.world.ranks)
    except ValueError as exc:
        raise UsageError(f"{profile.source}: key 'region': {exc}") from None
    if profile.world.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{profile.source}: key 'world.device' is cuda but no CUDA device is visible here")


def _suite(args: argparse.Namespace) -> int:
    from hardening.profile import ProfileError, load_profile

    overrides = {}
    if args.ranks is not None:
        overrides["world.ranks"] = args.ranks
    if args.target:
        overrides["region.target"] = args.target
    if args.torch_trace:
        overrides["triage.torch_trace"] = True
    try:
        profile = load_profile(args.profile, overrides)
    except ProfileError as exc:
        raise UsageError(str(exc)) from None
    cases = _select_cases(args.name, args.only, profile.world.ranks)
    if not cases:
        print("hardening: no cases selected", file=sys.stderr)
        return ExitCode.NO_CASES
    _validate(profile, cases)

    from hardening.reports import render_table, write_json, write_junit
    from hardening.runner import HarnessError, Runner

    run_dir = Path(args.artifacts or Path(".hardening") / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.name}")
    run_dir = run_dir.resolve()  # reports name files that must open from anywhere
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"--artifacts {run_dir} exists and is not empty")
    # SIGTERM (a CI cancel) ends the run like Ctrl-C: ranks torn down, partial report written.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print(
        f"hardening: suite {args.name}, {len(cases)} case(s), {profile.world.ranks} ranks, "
        f"profile {profile.name} ({profile.world.backend}/{profile.world.device}, compile "
        f"{profile.compile.backend if profile.compile.enabled else 'off'}"
        f"{', fullgraph' if profile.compile.fullgraph else ''}), run dir {run_dir}",
        file=sys.stderr,
    )
    from hardening.results import SuiteResult

    try:
        with Runner(profile, run_dir=run_dir) as runner:
            result = runner.run_suite(args.name, cases, profile_name=profile.name)
    except HarnessError as exc:
        result = SuiteResult(suite=args.name, profile=profile.name, num_ranks=profile.world.ranks, run_dir=str(run_dir))
        result.harness_error = str(exc)
    except KeyboardInterrupt:
        result = SuiteResult(suite=args.name, profile=profile.name, num_ranks=profile.world.ranks, run_dir=str(run_dir))
        result.interrupted = True
    _link_latest(run_dir)
    print(render_table(result))
    if args.json:
        write_json(result, args.json)
    if args.junit:
        write_junit(result, args.junit)
    write_json(result, run_dir / "result.json")
    return exit_code_for(result)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _link_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    try:
        if latest.is_symlink():
            latest.unlink()
        if not latest.exists():
            latest.symlink_to(run_dir.name)
    except OSError:
        pass


def _list(args: argparse.Namespace) -> int:
    from hardening.suites import get_suite

    try:
        cases = get_suite(args.suite)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    rows = [
        [c.id, c.suite, c.fault or "—", c.expect.describe(), f"{c.expect.budget_s:g}s" if c.expect.crash else "—", c.title]
        for c in cases
    ]
    print(tabulate(rows, headers=["id", "suite", "fault", "must happen", "budget", "what"], tablefmt="simple"))
    return ExitCode.OK


def _triage(args: argparse.Namespace) -> int:
    from hardening import triage

    problem = triage.ptrace_problem()
    if problem:
        print(f"hardening: cannot dump stacks here: {problem}", file=sys.stderr)
        return ExitCode.INTERNAL_ERROR
    dumps = triage.dump_all({f"pid {p}": p for p in args.pids}, out_dir=args.out, native=args.native, timeout=15.0)
    for dump in dumps.values():
        print(f"== {dump.label} ({'ok' if dump.ok else 'FAILED'}) ==\n{dump.text.rstrip()}\n")
    print(triage.side_by_side(dumps))
    return ExitCode.OK if all(d.ok for d in dumps.values()) else ExitCode.FAILED


def _doctor() -> int:
    from hardening.doctor import run_doctor

    ok, text = run_doctor()
    print(text)
    return ExitCode.OK if ok else ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
