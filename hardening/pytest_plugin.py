"""The pytest entry point: a hardening suite's cases as pytest items.

``pytest --hardening-suite compile [--hardening-target mod:build]`` adds one item per case
to whatever else the session collects, so a project that already runs pytest gets the
pre-merge gate with no new CI step: each item carries its case's cross-rank verdict, the
failure body of a case that did not pass carries every rank's end, its stacks and
artifacts (and so lands in pytest's own ``--junitxml`` ``<failure>``), and the terminal
summary ends with the same table ``hardening suite`` prints.

This module owns how a case's verdict becomes a pytest outcome (:func:`_settle`, the one
place) and the plugin's life cycle; everything else is the CLI's: the same flag checks
(:mod:`hardening.harness.cli`), the same :class:`~hardening.harness.runner.Runner`, the same
reports. The plugin loads in every pytest session where hardening is installed, this
repo's own tests included: importing it imports no torch, and without
``--hardening-suite`` (or the ``hardening_suite`` ini key) it adds nothing.

The suite runs once per session on one runner, started at the first case item's setup
(the fork server imports torch: seconds, paid once) and closed at session finish; cases
run one by one as their items run, so ``-k``, ``-x``, ``--deselect`` and ``-m hardening``
(only the suite's items) work as on any test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NoReturn

import pytest

if TYPE_CHECKING:
    from hardening.harness.cases import Case
    from hardening.harness.interrupt import StopRequest
    from hardening.harness.profile import Profile
    from hardening.harness.results import CaseResult, SuiteResult
    from hardening.harness.runner import Runner

PLUGIN_NAME = "hardening-suite"
MARKER = "hardening"

# pytest flag (and ini key, where one exists) -> the CLI's flag of the same meaning; the
# CLI's checks name their own flags, and a message shown to a pytest user names this one.
_FLAGS = {
    f"--hardening-{flag[2:]}": flag
    for flag in (
        "--ranks", "--target", "--profile", "--only", "--program", "--torch-trace", "--artifacts", "--baseline",
        "--fail-on-improvement", "--launcher",
    )
}  # fmt: skip
_INI = ("suite", "target", "profile", "baseline")
_CLI_FLAG = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f) for f in _FLAGS.values()) + r")(?![\w-])")


# -- options -------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    from hardening.harness.cli import RUN_FLAGS  # the CLI's flags, their help and types (no torch)

    group = parser.getgroup("hardening", "hardening fault-injection suites (each case a pytest item)")
    group.addoption(
        "--hardening-suite", metavar="NAME",
        help="run a hardening suite's cases as pytest items: compile, operator or all (ini: hardening_suite)",
    )  # fmt: skip
    for ours, flag in _FLAGS.items():
        kwargs = dict(RUN_FLAGS[flag])
        key = ours.removeprefix("--hardening-")
        kwargs["help"] = _CLI_FLAG.sub(lambda m: f"--hardening-{m.group(1)[2:]}", kwargs["help"])
        if key in _INI:
            kwargs["help"] += f" (ini: hardening_{key})"
        if kwargs.get("action") == "store_true":
            kwargs["default"] = False
        group.addoption(ours, **kwargs)
    for key in _INI:
        parser.addini(f"hardening_{key}", f"default for --hardening-{key}", default=None)


def _option(config: pytest.Config, key: str) -> Any:
    """The flag's value, else the ini key's (for the keys that have one)."""
    value = config.getoption(f"--hardening-{key}")
    if value is None and key in _INI:
        value = config.getini(f"hardening_{key}") or None
    return value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a case of a hardening suite (--hardening-suite); -m {MARKER} runs only those")
    suite = _option(config, "suite")
    if suite is None:
        stray = [flag for flag in _FLAGS if config.getoption(flag) not in (None, False)]
        if stray:
            raise pytest.UsageError(f"{', '.join(stray)} without --hardening-suite: name the suite to run (compile, operator, all)")
        return  # inert: no hooks beyond these two, no imports
    if hasattr(config, "workerinput") or (getattr(config.option, "numprocesses", None) or 0):
        raise pytest.UsageError(
            "--hardening-suite under pytest-xdist (-n): every worker would start its own ranks on the same "
            "CPUs and devices; run the suite in a pytest session without -n"
        )
    config.pluginmanager.register(SuitePlugin.from_config(config, suite), PLUGIN_NAME)


def _usage(exc: Exception) -> pytest.UsageError:
    """The CLI's usage error, naming this plugin's flags instead of the CLI's."""
    back = {cli: ours for ours, cli in _FLAGS.items()}
    return pytest.UsageError("hardening: " + _CLI_FLAG.sub(lambda m: back[m.group(1)], str(exc)))


# -- verdicts ------------------------------------------------------------------------------


class CaseFailed(Exception):
    """Raised by a case item whose case did not pass; carries the result for the failure body."""

    def __init__(self, case: "CaseResult") -> None:
        super().__init__(_headline(case))
        self.case = case


def _settle(case: "CaseResult") -> None:
    """The one place a case's verdict becomes a pytest outcome.

    PASS passes. SKIPPED (the fault cannot apply to this region, and said why) is a pytest
    skip with that reason, as it leaves the CLI's exit code alone. FAIL fails. UNKNOWN fails
    too: an unknown is never a pass, and xfail would read green in most CI views (the CLI
    gives it exit 6; pytest has no such code, so the session exits 1). A case the harness
    could not run (outcome harness_error) fails with that error. An interrupted case is
    handled before this (:meth:`SuitePlugin.run`): the session stops, exit 2."""
    from hardening.harness.results import Verdict

    if case.verdict is Verdict.PASS:
        return
    if case.verdict is Verdict.SKIPPED:
        pytest.skip(f"{case.id}: {case.reason or 'the fault cannot apply to this region'}")
    raise CaseFailed(case)


def _headline(case: "CaseResult") -> str:
    """One line: ``FAIL (crashed): <reason>``; the junit ``message`` and the ``-q`` summary line."""
    from hardening.harness.reports.table import trim

    return trim(f"{str(case.verdict).upper()} ({case.outcome}): {case.reason or case.expectation}")


def _body(case: "CaseResult") -> str:
    """The failure body: the same text as ``hardening suite --junit``'s ``<failure>`` (every
    rank's end, break and recompile reasons, artifacts, logs, a hung rank's stacks), then the
    case directory that holds the rest."""
    from hardening.harness.reports.junit import _failure_body  # the CLI's JUnit body, word for word

    body = f"{_headline(case)}\n\n{_failure_body(case)}"
    if case.run_dir:
        body += f"case directory: {case.run_dir}\n"
    return body


@dataclasses.dataclass
class _Crash:
    """What pytest reads of a failure's crash location: ``message`` is the short summary
    line and junitxml's ``message`` attribute (pytest's own ReprFileLocation is private)."""

    path: str
    lineno: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.message}"


class _CaseRepr:
    """A failure body that is plain text (no Python traceback: the harness is not the fault)."""

    def __init__(self, body: str, crash: _Crash) -> None:
        self.body = body
        self.reprcrash = crash

    def toterminal(self, tw: Any) -> None:
        for line in self.body.rstrip("\n").splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return self.body


# -- nodes ---------------------------------------------------------------------------------


class SuiteNode(pytest.Collector):
    """The parent of one suite's case items: nodeid ``hardening.<suite>``, so junitxml's
    classname is the one ``hardening suite --junit`` writes."""

    def __init__(self, *, plugin: "SuitePlugin", suite: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plugin = plugin
        self.suite = suite

    def collect(self) -> list[pytest.Item]:
        ranks = self.plugin.profile.world.ranks
        items: list[pytest.Item] = []
        for case in self.plugin.cases:
            if case.suite == self.suite:
                name = f"{case.id}[ranks={ranks}]"
                items.append(CaseItem.from_parent(self, name=name, nodeid=f"{self.nodeid}::{name}", case=case, plugin=self.plugin))
        return items


class CaseItem(pytest.Item):
    """One case of the suite. Named ``<id>[ranks=N]``, as in the CLI's JUnit report."""

    def __init__(self, *, case: "Case", plugin: "SuitePlugin", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.plugin = plugin
        self.add_marker(MARKER)

    def setup(self) -> None:
        self.plugin.start()

    def runtest(self) -> None:
        _settle(self.plugin.run(self.case))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CaseFailed):
            return _CaseRepr(_body(excinfo.value.case), _Crash(str(self.path), 0, str(excinfo.value)))
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"hardening {self.case.suite} {self.case.id}: {self.case.title}"


# -- the session's suite -------------------------------------------------------------------


class SuitePlugin:
    """One suite request for one pytest session: checked at configure, run lazily."""

    def __init__(self, config: pytest.Config, suite: str, profile: "Profile", cases: list["Case"], target_source: str) -> None:
        self.config = config
        self.suite = suite
        self.profile = profile
        self.cases = cases
        self.target_source = target_source
        self.by_suite = len({c.id for c in cases}) < len(cases)  # `all`: a control per suite, a directory each
        self.run_dir: Path | None = None
        self.own_run_dir = False
        self.runner: "Runner | None" = None
        self.start_error: str | None = None
        self.stop: "StopRequest | None" = None
        self.result: "SuiteResult | None" = None
        self.gate: Any = None
        """With ``--hardening-baseline``: the baseline gate (``harness.baseline.Gate``), a
        checker of the runner's, which judges the control case as it ends."""

    @classmethod
    def from_config(cls, config: pytest.Config, suite: str) -> "SuitePlugin":
        """Everything the CLI checks before a process starts, as pytest usage errors."""
        from hardening.harness import cli
        from hardening.suites import SUITES

        known = [*SUITES, "all"]
        if suite not in known:
            raise pytest.UsageError(f"hardening: --hardening-suite {suite!r}: unknown suite; known suites: {', '.join(known)}")
        args = argparse.Namespace(
            name=suite,
            **{key: _option(config, key) for key in ("ranks", "target", "profile", "only", "program", "artifacts", "baseline", "launcher")},
            torch_trace=config.getoption("--hardening-torch-trace"),
            fail_on_improvement=config.getoption("--hardening-fail-on-improvement"),
        )  # fmt: skip
        try:
            try:
                profile = cli._load_profile(args)
            except cli.UsageError as exc:
                if args.profile is not None and "--" not in str(exc):  # about the profile itself: name its flag
                    raise cli.UsageError(f"--profile {args.profile}: {exc}") from None
                raise
            cases = cli._select_cases(suite, args.only, profile.world.ranks)
            target_source = cli._validate(profile, cases, args) if cases else ""
            if args.fail_on_improvement and args.baseline is None:
                raise cli.UsageError("--fail-on-improvement needs --baseline FILE")
            gate = cli._baseline_gate(profile, cases, args) if args.baseline is not None and cases else None
            plugin = cls(config, suite, profile, cases, target_source)
            plugin.gate = gate
            if cases and not config.option.collectonly:
                plugin.run_dir = cli._make_run_dir(args.artifacts, suite)
                plugin.own_run_dir = args.artifacts is None
        except cli.UsageError as exc:
            raise _usage(exc) from None
        return plugin

    # -- hooks ----------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> str:
        p = self.profile
        compiled = f"{p.compile.backend if p.compile.enabled else 'off'}{', fullgraph' if p.compile.fullgraph else ''}"
        return (
            f"hardening: suite {self.suite}, {len(self.cases)} case(s), {p.world.ranks} ranks, profile {p.name} "
            f"({p.world.backend}/{p.world.device}, compile {compiled})"
            f"{f', program {p.program}' if p.program else ''}, run dir {self.run_dir or '(none)'}"
        )

    @pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: any pluggy this plugin may be loaded by
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Iterator[None]:
        """The suites join the session's own top-level collection (after what the command
        line names), so they are collected, counted, shown by ``--collect-only`` and
        filtered by ``-k``/``-m``/``--deselect`` like any test file's nodes."""
        outcome = yield
        report = outcome.get_result()
        if isinstance(collector, pytest.Session) and report.passed and isinstance(report.result, list) and self._wanted():
            path = Path(sys.modules["hardening.suites"].__file__ or ".").parent
            for suite in dict.fromkeys(c.suite for c in self.cases):
                name = f"hardening.{suite}"
                report.result.append(SuiteNode.from_parent(collector, name=name, nodeid=name, path=path, plugin=self, suite=suite))

    def _wanted(self) -> bool:
        """The suite joins this session: always under ``--hardening-suite``; under the ini
        key only, not when the command line names its own tests (``pytest tests/test_x.py``
        runs that file, not the whole gate)."""
        if self.config.getoption("--hardening-suite") is not None:
            return True
        args_source = getattr(self.config, "args_source", None)
        explicit = getattr(getattr(pytest.Config, "ArgsSource", None), "ARGS", None)
        return explicit is None or args_source is not explicit

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Close the runner (its fork server kills any rank left), keep result.json, and
        drop a run directory of ours that no case used (every item deselected)."""
        from hardening.harness import cli
        from hardening.harness.reports import write_json

        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()
        if self.result is not None and self.run_dir is not None:
            self.result.wall_s = self.result.environment.get("startup_s", 0.0) + sum(c.wall_s for c in self.result.cases)
            write_json(self.result, self.run_dir / "result.json")
            cli._link_latest(self.run_dir)
        elif self.run_dir is not None and self.own_run_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # new and empty: nothing ran
                self.run_dir = None

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.result is None or not (self.result.cases or self.result.harness_error or self.result.interrupted):
            return
        from hardening.harness.reports import render_table

        terminalreporter.write_sep("=", f"hardening suite {self.suite}")
        terminalreporter.write_line(render_table(self.result))
        after = self.gate.summary() if self.gate is not None else ""
        if after:
            terminalreporter.write_line("\n" + after)

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        """The runner, once: fork server, store, the target's import check. A target that
        cannot be imported is a usage error (the session exits 4, as the CLI does); a
        runner that cannot start fails every case item's setup with the same error."""
        if self.runner is not None:
            return
        if self.start_error is not None:
            _harness_failed(self.start_error)
        from hardening.harness.interrupt import StopRequest
        from hardening.harness.results import SuiteResult
        from hardening.harness.runner import HarnessError, Runner, TargetError, environment

        assert self.run_dir is not None
        self.stop = StopRequest()
        self.result = SuiteResult(
            suite=self.suite, profile=self.profile.name, num_ranks=self.profile.world.ranks,
            run_dir=str(self.run_dir), started_at=time.time(),
        )  # fmt: skip
        checks = [self.gate.check] if self.gate is not None else []
        runner = Runner(self.profile, run_dir=self.run_dir, stop=self.stop, progress=lambda line: None, checks=checks)
        try:
            with _stop_signals(self.stop):
                runner.__enter__()
                if self.profile.program is None:
                    runner.check_target(self.profile.region.target, flag=self.target_source)
        except TargetError as exc:
            runner.close()
            self.result = None  # as the CLI: a usage error, no report of a run that never began
            pytest.exit(str(_usage(exc)), returncode=pytest.ExitCode.USAGE_ERROR)
        except HarnessError as exc:
            runner.close()
            self.start_error = self.result.harness_error = str(exc)
        except BaseException:
            runner.close()
            raise
        if self.start_error is not None:
            _harness_failed(self.start_error)  # outside the except: no "during handling" chain
        self.runner = runner
        self.result.environment.update(environment(self.profile))
        self.result.environment["startup_s"] = round(runner.startup_s, 2)
        self._check_stop()

    def run(self, case: "Case") -> "CaseResult":
        """Run one case on the session's runner and keep its result for the table."""
        assert self.runner is not None and self.result is not None and self.run_dir is not None
        case_dir = self.run_dir / case.suite / case.id if self.by_suite else None
        with _stop_signals(self.stop):
            result = self.runner.run_case(case, case_dir=case_dir)
        self.result.cases.append(result)
        if self.gate is not None:
            self.result.baseline = self.gate.report
        self._check_stop()
        return result

    def _check_stop(self) -> None:
        """A stop signal during a case tore its ranks down (the runner's own teardown);
        now stop the session as pytest would have on Ctrl-C: exit 2, summary printed."""
        assert self.stop is not None and self.result is not None
        if self.stop.requested:
            self.result.interrupted = True
            self.result.interrupted_by = self.stop.signal_name
            raise KeyboardInterrupt(self.stop.signal_name)


def _harness_failed(error: str) -> NoReturn:
    """A runner that cannot start: the item errors in setup with the cause and no Python
    traceback (the harness's own state is the finding, not the frame that noticed it)."""
    pytest.fail(f"hardening: harness error: {error}", pytrace=False)


@contextlib.contextmanager
def _stop_signals(stop: "StopRequest | None") -> Iterator[None]:
    """While ranks run, SIGINT/SIGTERM/SIGHUP only record a stop request that the runner
    honours at a safe point (a KeyboardInterrupt mid-case would leave ranks behind);
    pytest's own handling is back as soon as the case ends."""
    from hardening.harness.interrupt import STOP_SIGNALS

    if stop is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop.install()
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
