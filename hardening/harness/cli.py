"""The ``hardening`` command: suite, baseline, list, fault, triage, doctor, manual. Exit codes are chosen here only."""

from __future__ import annotations

import argparse
import enum
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hardening.harness.interrupt import StopRequest

if TYPE_CHECKING:
    from hardening.harness.results import SuiteResult


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # a case failed
    INTERRUPTED = 2
    INTERNAL_ERROR = 3
    USAGE_ERROR = 4  # bad profile, unknown suite / fault / case / target
    NO_CASES = 5
    INDETERMINATE = 6  # only unknown verdicts besides passes


def exit_code_for(result: "SuiteResult") -> ExitCode:
    from hardening.harness.results import Outcome, Verdict

    if result.interrupted:
        return ExitCode.INTERRUPTED
    if result.harness_error or any(c.outcome is Outcome.HARNESS_ERROR for c in result.cases):
        return ExitCode.INTERNAL_ERROR
    if not result.cases:
        return ExitCode.NO_CASES
    if any(c.verdict is Verdict.FAIL for c in result.cases):
        return ExitCode.FAILED
    if any(c.verdict is Verdict.UNKNOWN for c in result.cases):
        return ExitCode.INDETERMINATE  # skipped verdicts are neither: a fault that cannot apply here
    return ExitCode.OK


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad flag, which here means "interrupted": make it 4."""

    def error(self, message: str) -> NoReturn:
        print(f"hardening: usage error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE_ERROR)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hardening",
        description="Fault-inject a tensor-parallel torch.compile region and check every fault crashes fast, by name.",
    )
    from hardening import __version__

    p.add_argument("--version", action="version", version=f"hardening {__version__}")
    from hardening.harness.profile import DEFAULT_PROFILE, available_profiles
    from hardening.suites import SUITES

    suites = ", ".join([*SUITES, "all"])  # generated: help never falls behind the suites
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("suite", help=f"run a suite of cases ({suites})")
    s.add_argument("name", help=f"suite name: {suites}")
    profiles = f"shipped profile name ({', '.join(available_profiles())}) or a YAML file; default {DEFAULT_PROFILE}"
    _add_run_flags(s, ("--ranks", "--profile", "--only", "--target", "--program", "--torch-trace", "--baseline"), profile=profiles)
    _add_run_flags(s, ("--fail-on-improvement", "--keep-artifacts", "--launcher", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id"))
    s.add_argument("--json", metavar="FILE", help="write the JSON report here")
    s.add_argument("--junit", metavar="FILE", help="write a JUnit XML report here")
    _add_run_flags(s, ("--artifacts",))
    b = sub.add_parser("baseline", help="record what a region compiles to, per rank, for suite --baseline")
    b.add_argument("action", choices=["update"], help="update: run the control case and write its entries")
    b.add_argument("--out", metavar="FILE", required=True, help="the baseline file (other regions' entries are kept)")
    _add_run_flags(b, ("--target", "--profile", "--ranks", "--artifacts"), profile=profiles)
    ls = sub.add_parser("list", help="show the operator matrix: id, fault, expectation, budget")
    ls.add_argument("suite", nargs="?", default="all")
    f = sub.add_parser("fault", help="check a fault spec (name:rank=N:call=K) and say what it does")
    f.add_argument("spec", help="e.g. stall:rank=1:call=3")
    f.add_argument("--ranks", type=int, help="number of ranks (overrides world.ranks)")
    f.add_argument("--profile", help="profile whose ranks and calls the spec must fit; default cpu")
    t = sub.add_parser("triage", help="py-spy stacks of live processes, side by side")
    t.add_argument("pids", nargs="+", type=int)
    t.add_argument("--native", action="store_true", help="include native frames")
    t.add_argument("--out", metavar="DIR", help="save each dump in DIR")
    sub.add_parser("doctor", help="check torch, backends, py-spy/ptrace and compilers")
    from hardening.harness.manual import DEFAULT_OUT, DEFAULT_RESULTS

    m = sub.add_parser("manual", help="generate the operator manual from the code (--check: fail if the committed one differs)")
    m.add_argument("--check", action="store_true", help="regenerate in memory and exit 1 if --out differs (for CI)")
    m.add_argument("--out", metavar="FILE", default=DEFAULT_OUT, help=f"the manual (default {DEFAULT_OUT})")
    m.add_argument("--results", metavar="DIR", default=DEFAULT_RESULTS, help=f"benchmark results to read (default {DEFAULT_RESULTS})")
    return p


RUN_FLAGS: dict[str, dict[str, Any]] = {
    "--ranks": dict(type=int, metavar="N", help="number of ranks (overrides world.ranks)"),
    "--profile": dict(metavar="NAME|FILE", help="shipped profile name or a YAML file; default cpu"),
    "--only": dict(metavar="IDS", help="comma-separated case ids, e.g. C-00,C-01 (see hardening list)"),
    "--target": dict(metavar="MOD:FN", help="region factory module:function or file.py:function (overrides region.target)"),
    "--program": dict(
        metavar="FILE.py", help="run your own program (a Session under @hr.record) on every rank instead of a region"
    ),
    "--torch-trace": dict(
        action="store_true",
        help="every rank writes torch's structured compile trace to rank<r>/torch_trace/ (for tlparse), passing cases too",
    ),
    "--baseline": dict(
        metavar="FILE",
        help="compare what the region compiles to with FILE (hardening baseline update): fail on a new break, "
        "graph, recompile or collective",
    ),
    "--fail-on-improvement": dict(
        action="store_true", help="with --baseline: also fail when the region compiles better than FILE records"
    ),
    "--keep-artifacts": dict(
        action="store_true",
        help="keep every compiled rank's depyf dump and torch_trace/, passing cases too (default: failing cases only)",
    ),
    "--artifacts": dict(metavar="DIR", help="run directory (default .hardening/runs/<time>-<command>)"),
    "--launcher": dict(
        choices=("process", "torchrun"),
        help="process: the runner's own fork server (default); torchrun: every case under torch.distributed.run "
        "(c10d rendezvous, the agent's store, --max-restarts 0)",
    ),
    "--nnodes": dict(type=int, metavar="N", help="with --launcher torchrun: split --ranks evenly over N nodes, one runner each"),
    "--node-rank": dict(type=int, metavar="K", help="with --nnodes: this runner's node, 0..N-1 (node 0 writes the report)"),
    "--rdzv-endpoint": dict(metavar="HOST:PORT", help="with --nnodes: where the nodes meet; node 0 listens there"),
    "--rdzv-id": dict(metavar="TOKEN", help="with --nnodes: the run's token, the same on every node; every key lives under it"),
}
"""The flags that shape a run, shared by ``suite``, ``baseline update`` and the pytest
plugin (as ``--hardening-<name>``): one help text each, one meaning."""


def _add_run_flags(parser: argparse.ArgumentParser, flags: tuple[str, ...], *, profile: str | None = None) -> None:
    """``flags`` of :data:`RUN_FLAGS` on ``parser``; ``profile``: a ``--profile`` help that
    names the shipped profiles (the table's stays free of imports, for the plugin)."""
    for flag in flags:
        kwargs = dict(RUN_FLAGS[flag])
        if flag == "--profile" and profile is not None:
            kwargs["help"] = profile
        parser.add_argument(flag, **kwargs)


def main(argv: list[str] | None = None) -> int:
    # First, before anything slow: from here on a stop signal is a request the runner
    # honours at a safe point, never an exception that can land anywhere.
    stop = StopRequest().install()
    # torch warns at import when numpy is absent (it does not depend on it): noise here.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (4, from _Parser.error)
        return int(exc.code or 0)
    try:
        if args.command == "suite":
            return _suite(args, stop)
        if args.command == "baseline":
            return _baseline_update(args, stop)
        if args.command == "list":
            return _list(args)
        if args.command == "fault":
            return _fault(args)
        if args.command == "triage":
            return _triage(args)
        if args.command == "doctor":
            return _doctor()
        if args.command == "manual":
            return _manual(args)
        raise AssertionError(args.command)
    except UsageError as exc:
        print(f"hardening: usage error: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except BrokenPipeError:  # `hardening list | head`: the reader left; that is not an error
        _silence_stdout()
        return ExitCode.OK
    except KeyboardInterrupt:  # SIGINT ignored at start and raised by hand, or a subcommand without a runner
        print("hardening: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the catch-all: one line, the traceback in a file
        print(f"hardening: internal error: {type(exc).__name__}: {exc} ({_save_traceback(None)})", file=sys.stderr)
        return ExitCode.INTERNAL_ERROR


def run() -> NoReturn:
    """The console script: ``main``, then exit with its code whatever signal comes late."""
    code = main()
    StopRequest.ignore_from_now()
    sys.exit(code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _save_traceback(run_dir: Path | None) -> str:
    """Write the current exception's traceback to a file; 'traceback in FILE'."""
    text = traceback.format_exc()
    try:
        if run_dir is not None and run_dir.is_dir():
            path = run_dir / "internal_error.txt"
            path.write_text(text)
        else:
            fd, name = tempfile.mkstemp(prefix="hardening-internal-error-", suffix=".txt")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            path = Path(name)
        return f"traceback in {path}"
    except OSError:
        return "traceback could not be saved"


def _select_cases(name: str, only: str | None, world_size: int) -> list:
    from hardening.suites import get_suite

    try:
        cases = get_suite(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if only is not None:
        wanted = [i.strip() for i in only.split(",") if i.strip()]
        if not wanted:
            raise UsageError(f"--only {only!r} names no case; give ids such as C-00,C-01 (see hardening list)")
        known = {c.id for c in cases}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise UsageError(f"--only: unknown case id(s) {unknown} in suite {name!r}; known: {', '.join(sorted(known))}")
        cases = [c for c in cases if c.id in wanted]
    runnable = [c for c in cases if c.min_ranks <= world_size]
    skipped = ", ".join(f"{c.id} (needs {c.min_ranks})" for c in cases if c not in runnable)
    if not runnable:
        print(f"hardening: no cases selected: with {world_size} rank(s) every case is skipped: {skipped}", file=sys.stderr)
    elif skipped:
        print(f"hardening: skipping case(s) that need more than {world_size} rank(s): {skipped}", file=sys.stderr)
    return runnable


def _load_profile(args: argparse.Namespace):
    """The profile with the command line's overrides; a bad value names its flag."""
    from hardening.harness.profile import ProfileError, load_profile

    if args.profile is not None and not args.profile.strip():
        raise UsageError("--profile: empty value")
    overrides, flags = {}, {}
    for key, flag, value in (
        ("world.ranks", "--ranks", getattr(args, "ranks", None)),
        ("region.target", "--target", getattr(args, "target", None)),
        ("program", "--program", _program_path(getattr(args, "program", None), getattr(args, "target", None))),
        ("triage.torch_trace", "--torch-trace", getattr(args, "torch_trace", False) or None),
        ("triage.artifacts", "--keep-artifacts", "always" if getattr(args, "keep_artifacts", False) else None),
        ("world.launcher", "--launcher", getattr(args, "launcher", None)),
        ("world.nnodes", "--nnodes", getattr(args, "nnodes", None)),
        ("world.node_rank", "--node-rank", getattr(args, "node_rank", None)),
        ("world.rdzv_endpoint", "--rdzv-endpoint", getattr(args, "rdzv_endpoint", None)),
        ("world.rdzv_id", "--rdzv-id", getattr(args, "rdzv_id", None)),
    ):
        if value is not None:
            if isinstance(value, str) and not value.strip():
                raise UsageError(f"{flag}: empty value")
            overrides[key], flags[key] = value, flag
    try:
        return load_profile(args.profile, overrides, flags=flags)
    except ProfileError as exc:
        raise UsageError(str(exc)) from None


def _program_path(program: str | None, target: str | None) -> str | None:
    """``--program``: an existing .py file, as an absolute path (ranks need not share the cwd)."""
    if program is None:
        return None
    if target is not None:
        raise UsageError("--program and --target exclude each other: a program builds its own model")
    path = Path(program).expanduser()
    if not program.endswith(".py"):
        raise UsageError(f"--program {program}: must be a .py file")
    if not path.is_file():
        raise UsageError(f"--program {program}: {'not a regular file' if path.exists() else 'file not found'}")
    return str(path.resolve())


def _validate(profile, cases, args: argparse.Namespace) -> str:
    """Everything that can be wrong with the request, found before a process starts and
    without running user code; returns how to name the target in later messages."""
    from hardening.inject import FaultSpecError, validate_spec
    from hardening.harness.reference import validate_dims
    from hardening.harness.region import parse_target

    # A program runs as many calls as it likes: only the harness's own loop is bounded by the profile.
    calls = profile.warmup_calls + profile.steps if profile.program is None else None
    for case in cases:
        if case.fault:
            try:
                # A pipeline workload's chunk count depends on its mode: any chunk id may be named.
                validate_spec(case.fault, world_size=profile.world.ranks, calls=None if case.workload else calls)
            except FaultSpecError as exc:
                raise UsageError(f"case {case.id}: {exc}") from None
    region_top = _region_module(profile)
    for name in profile.world.preload:
        if name.partition(".")[0] == region_top:
            raise UsageError(
                f"{profile.source}: key 'world.preload': {name!r} is the region's own module (region.target): "
                "user code never runs in the fork server; preload the libraries it imports instead"
            )
        # Found, not imported: the fork server imports it (the runner stays free of it).
        if _find_module(name) is None:
            raise UsageError(f"{profile.source}: key 'world.preload': no module named {name!r} is installed here")
    deadline = profile.timeouts.call_deadline
    if any(c.workload for c in cases) and deadline and profile.pipeline.queue_timeout >= deadline:
        raise UsageError(
            f"{profile.source}: key 'pipeline.queue_timeout' must be below timeouts.call_deadline ({deadline:g}s) for the "
            f"pipeline cases, got {profile.pipeline.queue_timeout:g}s (a full queue must be named before the call deadline ends the rank)"
        )
    if profile.program is not None:
        source = "--program" if args.program else f"{profile.source}: key 'program'"
        if not Path(profile.program).is_file():
            raise UsageError(f"{source} {profile.program}: file not found")
        if not profile.hardened:
            raise UsageError(f"{source}: a program runs its own Session; hardened: false (the stock loop) cannot apply")
        profile.program = str(Path(profile.program).resolve())  # the ranks load it from the run's profile
        return source  # nothing to import before launch: running it runs the program
    target_source = "--target" if args.target else f"{profile.source}: key 'region.target'"
    try:
        parse_target(profile.region.target)
    except ValueError as exc:
        raise UsageError(f"{target_source}: {exc}") from None
    if profile.region.target == "hardening.harness.reference:build":
        # The region runs on every rank, or on a pipeline's mesh (every rank but rank 0).
        degrees = sorted({profile.world.ranks - 1 if c.workload else profile.world.ranks for c in cases} or {profile.world.ranks})
        try:
            for degree in degrees:
                validate_dims(profile.region.dims, degree)
        except ValueError as exc:
            why = str(exc).removeprefix("dims: ")
            if len(degrees) > 1 or degrees[0] != profile.world.ranks:
                why += " (a pipeline case runs the region on the mesh: every rank but rank 0)"
            if args.ranks is not None:
                raise UsageError(f"--ranks {args.ranks} does not fit key 'region.dims' of {profile.source}: {why}") from None
            raise UsageError(f"{profile.source}: key 'region.dims': {why}") from None
    if profile.world.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{profile.source}: key 'world.device' is cuda but no CUDA device is visible here")
    return target_source


def _find_module(name: str) -> object | None:
    """The import spec of a module's top-level package as the fork server would find it
    (the working directory is not on its path), or None. Only the top level is looked
    up: finding ``a.b`` would import ``a``, and nothing runs in the runner."""
    import importlib.machinery

    top = name.partition(".")[0]
    if top in sys.builtin_module_names:
        return top
    path = [p for p in sys.path if p not in ("", ".", os.getcwd())]
    try:
        return importlib.machinery.PathFinder.find_spec(top, path)
    except (ImportError, ValueError):
        return None


def _region_module(profile) -> str | None:
    """The top-level module name the region target is imported as (a file's stem)."""
    module = profile.region.target.rpartition(":")[0]
    if module.endswith(".py"):
        return Path(module).stem
    return module.partition(".")[0] or None


def _check_output(path: str, flag: str) -> Path:
    """A report path that can be written: not a directory, not under a file, in a place
    this process may create files. Checked before launch; nothing is left behind."""
    target = Path(path).expanduser()
    if not path.strip():
        raise UsageError(f"{flag}: empty path")
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    if target.exists() and not (target.is_file() or target.is_char_device()):
        raise UsageError(f"{flag} {path}: is not a regular file (a FIFO or socket would block the report)")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hardening-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {ancestor}: {exc.strerror or exc}") from None
    return target.resolve()


def _refuse_reports_inside(outputs: dict[str, Path], run_dir: Path) -> None:
    """A report path that is the run directory or inside it would overwrite the run's
    own files (result.json, profile.yaml, logs)."""
    for flag, path in outputs.items():
        if path == run_dir or run_dir in path.parents:
            raise UsageError(f"{flag} {path}: inside the run directory {run_dir}; write reports elsewhere")


def _make_run_dir(artifacts: str | None, suite: str) -> Path:
    """The run directory, created here, atomically: two runs started in the same second
    get two directories, and an explicit ``--artifacts`` must be new or empty."""
    if artifacts is not None:
        run_dir = Path(artifacts).expanduser()
        if not artifacts.strip():
            raise UsageError("--artifacts: empty path")
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--artifacts {artifacts}: exists and is not a directory")
        try:
            if run_dir.is_dir() and any(run_dir.iterdir()):
                raise UsageError(f"--artifacts {artifacts}: exists and is not empty")
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".hardening-probe"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"--artifacts {artifacts}: cannot create or write it: {exc.strerror or exc}") from None
        return run_dir.resolve()
    runs = Path(".hardening") / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {runs.resolve()} for the run directory (use --artifacts): {exc.strerror or exc}") from None
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{suite}"
    for n in range(1, 1000):
        candidate = runs / (stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir()  # atomic: exactly one run gets each name
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"cannot create the run directory {candidate.resolve()}: {exc.strerror or exc}") from None
        return candidate.resolve()  # reports name files that must open from anywhere
    raise UsageError(f"cannot find a free run directory name under {runs.resolve()}")


def _suite(args: argparse.Namespace, stop: StopRequest) -> int:
    # 1. The request, checked whole before anything starts: profile and flags, cases,
    #    target form, baseline, report paths; then the run directory.
    profile = _load_profile(args)
    cases = _select_cases(args.name, args.only, profile.world.ranks)
    if not cases:
        return ExitCode.NO_CASES
    target_source = _validate(profile, cases, args)
    gate = _baseline_gate(profile, cases, args) if args.baseline is not None else None
    if args.fail_on_improvement and gate is None:
        raise UsageError("--fail-on-improvement needs --baseline FILE")
    outputs = {flag: _check_output(path, flag) for flag, path in (("--json", args.json), ("--junit", args.junit)) if path is not None}
    if len(set(outputs.values())) < len(outputs):
        raise UsageError("--json and --junit name the same file")
    run_dir = _new_run_dir(args.artifacts, args.name, outputs)

    # 2. Run, the control judged against the baseline as it ends (before its artifacts
    #    are kept or dropped); 3. reports.
    result, internal = _run_cases(args.name, profile, cases, run_dir, stop, target_source, checks=[gate.check] if gate else [])
    if gate is not None:
        result.baseline = gate.report
    return _report(result, run_dir, outputs, internal, after=gate.summary() if gate is not None else "")


def _new_run_dir(artifacts: str | None, suite: str, outputs: dict[str, Path]) -> Path:
    if artifacts is not None:
        _refuse_reports_inside(outputs, Path(artifacts).expanduser().resolve())
    run_dir = _make_run_dir(artifacts, suite)
    try:
        _refuse_reports_inside(outputs, run_dir)
    except UsageError:
        if artifacts is None:
            run_dir.rmdir()  # ours, new and empty
        raise
    return run_dir


def _run_cases(suite: str, profile, cases: list, run_dir: Path, stop: StopRequest, target_source: str, *, checks=()):
    """Every case through one Runner (``checks``: its extra checkers of each case, see
    ``Runner.checks``); returns the result and the internal error, if any.
    The result object is ours: every case the runner finishes is in it, whatever ends the
    run (a signal, a dead fork server, a bug here)."""
    from hardening.harness.results import SuiteResult
    from hardening.harness.runner import HarnessError, Runner, TargetError

    print(
        f"hardening: suite {suite}, {len(cases)} case(s), {profile.world.ranks} ranks, "
        f"profile {profile.name} ({profile.world.backend}/{profile.world.device}, compile "
        f"{profile.compile.backend if profile.compile.enabled else 'off'}"
        f"{', fullgraph' if profile.compile.fullgraph else ''})"
        f"{f', program {profile.program}' if profile.program else ''}, run dir {run_dir}",
        file=sys.stderr,
    )
    result = SuiteResult(
        suite=suite, profile=profile.name, num_ranks=profile.world.ranks, run_dir=str(run_dir), started_at=time.time()
    )
    internal = None
    try:
        if not stop.requested:
            with Runner(profile, run_dir=run_dir, stop=stop, checks=list(checks)) as runner:
                if profile.program is None:
                    runner.check_target(profile.region.target, flag=target_source)
                runner.run_suite(result, cases)
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    except HarnessError as exc:
        result.harness_error = str(exc)
    except Exception as exc:  # noqa: BLE001 - still write what we have, then exit 3
        internal = f"{type(exc).__name__}: {exc} ({_save_traceback(run_dir)})"
        result.harness_error = f"internal error: {internal}"
    if stop.requested:
        result.interrupted = True
        result.interrupted_by = stop.signal_name
    return result, internal


def _report(result, run_dir: Path, outputs: dict[str, Path], internal: str | None, *, after: str = "") -> int:
    """The run's own result.json first (it must exist whatever follows), then the table
    (and ``after`` it), then the files the user asked for; returns the exit code."""
    from hardening.harness.reports import render_table, write_json, write_junit

    write_json(result, run_dir / "result.json")
    _link_latest(run_dir)
    try:
        print(render_table(result) + (f"\n\n{after}" if after else ""), flush=True)
    except BrokenPipeError:  # `hardening suite ... | head`: the reports below still get written
        _silence_stdout()
    lost = False
    for flag, path in outputs.items():  # each one tried, whatever happened to the other
        try:
            (write_json if flag == "--json" else write_junit)(result, path)
        except OSError as exc:
            print(f"hardening: could not write {flag} {path}: {exc.strerror or exc}", file=sys.stderr)
            lost = True
    if internal:
        print(f"hardening: internal error: {internal}", file=sys.stderr)
    code = exit_code_for(result)
    return ExitCode.INTERNAL_ERROR if lost and code is not ExitCode.INTERRUPTED else code


# -- baselines -----------------------------------------------------------------------------

def _torch_version() -> str | None:
    """The installed torch's version, without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _region_of(profile, flag: str) -> str:
    from hardening.harness.baseline import region_name

    if profile.program is not None:
        raise UsageError(f"{flag} works on regions (--target): a --program runs its own Session with its own gates")
    return region_name(profile.region.target)


def _ratchet_command(args: argparse.Namespace, out: str) -> str:
    import shlex

    words = ["hardening", "baseline", "update"]
    for flag in ("target", "profile", "ranks"):
        if getattr(args, flag, None) is not None:
            words += [f"--{flag}", str(getattr(args, flag))]
    return shlex.join([*words, "--out", out])


def _baseline_gate(profile, cases: list, args: argparse.Namespace):
    """The request's baseline gate (``harness.baseline.Gate``), checked before launch, with
    the runtime's break and recompile gates opened to what the file records."""
    from hardening.harness.baseline import CONTROL_CASE, BaselineError, Gate, field_name, load, recorded_torch, renamed, select

    region = _region_of(profile, "--baseline")
    if not profile.compile.enabled:
        raise UsageError(f"--baseline: compile is off in profile {profile.name}: there is nothing to compare")
    try:
        filed_as, expected = select(load(args.baseline), region, field_name(profile.name), source=args.baseline)
    except BaselineError as exc:
        raise UsageError(f"--baseline {exc}") from None
    expected = renamed(expected, filed_as, region)
    if sorted(expected) != list(range(profile.world.ranks)):
        raise UsageError(
            f"--baseline {args.baseline}: records ranks {','.join(map(str, sorted(expected)))} of {filed_as}, "
            f"this run has {profile.world.ranks}; record this world size with {_ratchet_command(args, args.baseline)}"
        )
    recorded, running = recorded_torch(args.baseline), _torch_version()
    if recorded and running and recorded != running:
        print(
            f"hardening: --baseline {args.baseline} was recorded with torch {recorded}, this is {running}: "
            "torch words its break reasons differently across versions; ratchet the file if only the words changed",
            file=sys.stderr,
        )
    if CONTROL_CASE not in {c.id for c in cases}:
        print(f"hardening: --baseline: {CONTROL_CASE} is not selected: only the gates are opened to the baseline", file=sys.stderr)
    # Known breaks and recompiles pass the runtime's gates; one more still trips them.
    profile.gates.max_graph_breaks = max(len(r.breaks) for r in expected.values())
    profile.gates.max_recompiles = max(r.recompiles for r in expected.values())
    return Gate(
        args.baseline, region, filed_as, expected, _ratchet_command(args, args.baseline),
        fail_on_improvement=args.fail_on_improvement,
    )  # fmt: skip


def _baseline_update(args: argparse.Namespace, stop: StopRequest) -> int:
    """Run the control case with the gates open and write what every rank compiled."""
    from hardening.harness import baseline
    from hardening.harness.results import Verdict

    # 1. The request: profile, region, the file (readable if it exists, writable).
    profile = _load_profile(args)
    region = _region_of(profile, "baseline update")
    if not profile.compile.enabled:
        raise UsageError(f"baseline update: compile is off in profile {profile.name}: there is nothing to record")
    out = _check_output(args.out, "--out")
    existing: list = []
    if out.exists():
        try:
            existing = baseline.load(args.out)
        except baseline.BaselineError as exc:
            raise UsageError(f"--out {exc} (fix or remove it; other regions' entries are kept)") from None
    cases = _select_cases("compile", baseline.CONTROL_CASE, profile.world.ranks)
    target_source = _validate(profile, cases, args)
    profile.gates.max_graph_breaks = profile.gates.max_recompiles = 1_000_000  # record, don't judge
    run_dir = _new_run_dir(args.artifacts, "baseline", {"--out": out})

    # 2. Run the control; 3. write the file only from a control that completed.
    result, internal = _run_cases("baseline", profile, cases, run_dir, stop, target_source)
    control = result.cases[0] if result.cases else None
    if control is None or control.verdict is not Verdict.PASS or internal:
        why = control.reason if control is not None else (result.harness_error or "the run was stopped")
        return _report(result, run_dir, {}, internal, after=f"baseline {args.out}: not written: {baseline.CONTROL_CASE} did not complete: {why}")
    per_rank = {r.rank: baseline.RankCompile.from_counters(r.counters) for r in control.ranks}
    pname = baseline.field_name(profile.name)
    entries = [e for rank, rc in sorted(per_rank.items()) for e in rc.entries(region, pname, rank)]
    before = baseline.regions(existing).get((region, pname))
    baseline.write(out, baseline.merged(existing, region, pname, entries), torch_version=_torch_version())
    change = "new" if before is None else ("unchanged" if baseline.compare(before, per_rank).unchanged else "updated")
    breaks = max(len(rc.breaks) for rc in per_rank.values())
    graphs = max(rc.graphs for rc in per_rank.values())
    return _report(
        result, run_dir, {}, internal,
        after=f"baseline {args.out}: {change}: {region} under profile {profile.name}, {len(per_rank)} ranks, "
        f"{graphs} graph(s), {breaks} break site(s), {len(entries)} entries",
    )  # fmt: skip


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
    from tabulate import tabulate

    from hardening.harness.cases import MATRIX_HEADERS, matrix_row
    from hardening.suites import get_suite

    try:
        cases = get_suite(args.suite)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(tabulate([matrix_row(c) for c in cases], headers=MATRIX_HEADERS, tablefmt="simple", disable_numparse=True))
    return ExitCode.OK


def _fault(args: argparse.Namespace) -> int:
    """What a fault spec does, or a usage error naming what is wrong with it."""
    from hardening.inject import FaultSpecError, fault_class, validate_spec

    profile = _load_profile(args)
    try:
        spec = validate_spec(args.spec, world_size=profile.world.ranks, calls=profile.warmup_calls + profile.steps)
    except FaultSpecError as exc:
        raise UsageError(str(exc)) from None
    cls = fault_class(spec.name)
    ranks = cls._ranks(spec, profile.world.ranks)
    print(f"{spec.text}: {cls.matrix_id} {cls.summary}")
    print(f"  acts on rank(s) {', '.join(map(str, ranks))} of {profile.world.ranks}; patches {cls.target}")
    for key, value in sorted(spec.params.items()):
        print(f"  {key}={value}")
    return ExitCode.OK


def _triage(args: argparse.Namespace) -> int:
    from hardening.harness import triage

    gone = [pid for pid in args.pids if not os.path.exists(f"/proc/{pid}")]
    if gone:
        raise UsageError(f"triage: no such process: {', '.join(map(str, gone))}")
    problem = triage.ptrace_problem()
    if problem:
        print(f"hardening: cannot dump stacks here: {problem}", file=sys.stderr)
        return ExitCode.INTERNAL_ERROR
    dumps = triage.dump_all({f"pid {p}": p for p in args.pids}, out_dir=args.out, native=args.native, timeout=15.0)
    for dump in dumps.values():
        print(f"== {dump.label} ({'ok' if dump.ok else 'FAILED'}) ==\n{dump.text.rstrip()}\n")
    print(triage.side_by_side(dumps))
    return ExitCode.OK if all(d.ok for d in dumps.values()) else ExitCode.FAILED


def _manual(args: argparse.Namespace) -> int:
    """Write the manual, or with --check say how the committed one differs."""
    from hardening.harness import manual

    out, results = Path(args.out), Path(args.results)
    try:
        if not args.check:
            manual.write(out, results)
            print(f"hardening: wrote {out}")
            return ExitCode.OK
        diff = manual.check(out, results)
    except manual.ResultsMissing as exc:
        raise UsageError(str(exc)) from None
    except manual.ManualError as exc:
        print(f"hardening: manual: cannot generate: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    if diff:
        shown = diff[:60] + ([f"... {len(diff) - 60} more diff line(s)"] if len(diff) > 60 else [])
        print("\n".join(shown))
        print(f"hardening: {out} is out of date with the code: regenerate it with `hardening manual --out {out}`", file=sys.stderr)
        return ExitCode.FAILED
    print(f"hardening: {out} matches the code")
    return ExitCode.OK


def _doctor() -> int:
    from hardening.harness.doctor import run_doctor

    ok, text = run_doctor()
    print(text)
    return ExitCode.OK if ok else ExitCode.FAILED


if __name__ == "__main__":
    run()
