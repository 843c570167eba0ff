"""The pytest entry point (``pytest --hardening-suite compile``): cases as items, verdicts as
outcomes, failure bodies in pytest's own --junitxml, usage errors, and inert without the flag.

The runs that start ranks go through ``runpytest_subprocess``: a fresh interpreter with the
plugin loaded from the install's entry point, as a user's pytest loads it, and signal
handling and the fork server kept out of this process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# What the plugin's checks import (torch included), imported here once: an in-process
# pytester run drops the modules it imported when it ends, and torch cannot be imported twice.
import hardening.harness.cli
import hardening.harness.reference
import hardening.harness.region
import hardening.inject
import hardening.suites

_PRELOADED = (hardening.harness.cli, hardening.harness.reference, hardening.harness.region, hardening.inject)

if TYPE_CHECKING:
    from hardening.harness.results import CaseResult

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
BREAK_REGION = REPO / "examples" / "break_region.py"
COMPILE_IDS = [c.id for c in hardening.suites.get_suite("compile")]  # the suite grows: never a hard-coded count


def _junit(path: Path) -> dict[str, ET.Element]:
    """Test cases of a --junitxml file by ``classname::name``."""
    return {f"{tc.get('classname')}::{tc.get('name')}": tc for tc in ET.parse(path).getroot().iter("testcase")}


# -- ranks started: one suite run each --------------------------------------------------------


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_selected_compile_cases_pass_as_items(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "--hardening-suite", "compile", "--hardening-only", "C-00,C-01", "-v", "--junitxml=out.xml", timeout=220
    )
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "hardening: suite compile, 2 case(s), 2 ranks, profile cpu*",
            "*collected 2 items",
            "hardening.compile::C-00[[]ranks=2[]] PASSED*",
            "hardening.compile::C-01[[]ranks=2[]] PASSED*",
            "*= hardening suite compile =*",
            "C-00 * completed * PASS *",
            "C-01 * crashed * PASS *",
            "2 cases: 2 pass, 0 fail, 0 unknown in *",
            "run directory: */.hardening/runs/*-compile",
            "*2 passed*",
        ]
    )
    cases = _junit(pytester.path / "out.xml")
    assert sorted(cases) == ["hardening.compile::C-00[ranks=2]", "hardening.compile::C-01[ranks=2]"]
    assert not any(list(tc) for tc in cases.values())  # no <failure>, <error> or <skipped>
    runs = pytester.path / ".hardening" / "runs"
    assert (runs / "latest" / "result.json").is_file()


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_cases_run_under_torchrun_from_pytest_too(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "--hardening-suite", "compile", "--hardening-only", "C-01", "--hardening-launcher", "torchrun", "-v", timeout=220
    )
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["hardening.compile::C-01[[]ranks=2[]] PASSED*", "*1 passed*"])
    (case,) = json.loads((pytester.path / ".hardening" / "runs" / "latest" / "result.json").read_text())["cases"]
    assert all(Path(r["artifacts"]["torchelastic_error"]).is_file() for r in case["ranks"])


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_graph_break_fails_its_item_and_junit_names_the_break(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "--hardening-suite", "compile", "--hardening-target", f"{BREAK_REGION}:build", "--hardening-only", "C-00",
        "-q", "--junitxml=out.xml", timeout=220,
    )  # fmt: skip
    assert result.ret == 1, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "FAIL (crashed): rank ?: CompileGateError: *graph break*",
            "r0 CompileGateError (exit *",
            "  break reasons:",
            "*Tensor.item()*",
            "case directory: */C-00",
            "*= hardening suite compile =*",
            "1 case: 0 pass, 1 fail, 0 unknown in *",
            "FAILED hardening.compile::C-00[[]ranks=2[]] - FAIL (crashed)*",
            "1 failed in *",
        ]
    )
    failure = _junit(pytester.path / "out.xml")["hardening.compile::C-00[ranks=2]"].find("failure")
    assert failure is not None
    assert "CompileGateError" in failure.get("message", "")
    assert "break reasons:" in (failure.text or "")
    assert re.search(r"break_region\.py:\d+ in forward", failure.text or ""), "the break's file:line in the user's code"
    assert "case directory: " in (failure.text or "")


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_a_runner_that_cannot_start_errors_every_case_once(pytester: pytest.Pytester) -> None:
    """A fork server that dies at start: each selected case errors in setup with the cause,
    and the start is tried once, not once per case."""
    pytester.makeconftest(
        "import hardening.harness.runner as runner\n"
        "runner._SERVER_BOOT = 'import sys; sys.exit(3)'\n"
    )  # fmt: skip
    result = pytester.runpytest_subprocess("--hardening-suite", "compile", "--hardening-only", "C-00,C-01", "-q", timeout=100)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*= hardening suite compile =*", "harness error: fork server died at start*", "run directory: *"])
    errors = [line for line in result.stdout.lines if line.startswith("ERROR hardening.compile::")]
    assert len(errors) == 2 and all("Failed: hardening: harness error: " in e for e in errors), errors
    bodies = [line for line in result.stdout.lines if line.startswith("hardening: harness error: fork server died at start")]
    assert len(bodies) == 2, result.stdout.str()  # each item's error says why, once
    assert "Traceback" not in result.stdout.str() and "pytest_plugin.py" not in result.stdout.str()
    assert result.stdout.str().count("import sys; sys.exit(3)") == 0


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_whole_compile_suite_passes_quietly(pytester: pytest.Pytester) -> None:
    """The done-means of the issue, in an empty directory: ``pytest --hardening-suite compile -q``."""
    result = pytester.runpytest_subprocess("--hardening-suite", "compile", "-q", timeout=280)
    assert result.ret == 0, result.stdout.str()
    n = len(COMPILE_IDS)
    result.stdout.fnmatch_lines([f"{n} cases: {n} pass, 0 fail, 0 unknown in *", f"{n} passed in *"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_baseline_gate_from_pytest(pytester: pytest.Pytester) -> None:
    """The CLI records the baseline; pytest then gates on it: unchanged passes, a new break fails its item."""
    source = BREAK_REGION.read_text()
    (pytester.path / "region.py").write_text(source)
    update = subprocess.run(
        [sys.executable, "-m", "hardening", "baseline", "update", "--target", "region.py:build", "--out", "b.txt"],
        cwd=pytester.path, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert update.returncode == 0, update.stdout + update.stderr
    gate = ("--hardening-suite", "compile", "--hardening-target", "region.py:build", "--hardening-only", "C-00,C-02")
    result = pytester.runpytest_subprocess(*gate, "--hardening-baseline", "b.txt", "-q", timeout=220)
    assert result.ret == 0, result.stdout.str()
    assert "baseline b.txt" not in result.stdout.str()  # unchanged: nothing said
    (pytester.path / "region.py").write_text(source.replace("        return funcol.all_reduce(", '        print("x", h.shape)\n        return funcol.all_reduce('))
    result = pytester.runpytest_subprocess(*gate, "--hardening-baseline", "b.txt", "-q", timeout=220)
    assert result.ret == 1, result.stdout.str()
    # The baseline's lines follow the table in the terminal summary; pytest's short summary comes last.
    result.stdout.fnmatch_lines(["baseline b.txt: REGRESSION rank 0: new graph break: *print* at region.py:*", "*FAILED hardening.compile::C-00*"])


# -- nothing started --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hardening-suite", "nope"], "*--hardening-suite 'nope': unknown suite; known suites: compile, operator, pp, all*"),
        (["--hardening-suite", "compile", "--hardening-only", "C-99"], "*--hardening-only: unknown case id(s) [[]'C-99'[]]*"),
        (["--hardening-suite", "compile", "--hardening-ranks", "0"], "*--hardening-ranks: *world.ranks*at least 1*"),
        (["--hardening-suite", "compile", "--hardening-ranks", "x"], "*--hardening-ranks: invalid int value*"),
        (["--hardening-suite", "compile", "--hardening-profile", "nosuch"], "*--hardening-profile nosuch: unknown profile*"),
        (["--hardening-suite", "compile", "--hardening-target", "nocolon"], "*--hardening-target: *module:function*"),
        (["--hardening-suite", "compile", "--hardening-target", "missing.py:build"], "*--hardening-target: *not found*"),
        (["--hardening-target", "a:b"], "*--hardening-target without --hardening-suite*"),
        (["--hardening-suite", "compile", "--hardening-baseline", "nope.txt"], "*--hardening-baseline nope.txt: file not found*"),
        (["--hardening-suite", "compile", "--hardening-fail-on-improvement"], "*--hardening-fail-on-improvement needs --hardening-baseline*"),
    ],
    ids=["suite", "only", "ranks-0", "ranks-x", "profile", "target-form", "target-file", "no-suite", "baseline", "improvement"],
)
def test_bad_values_are_usage_errors_naming_the_flag(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    result = pytester.runpytest_inprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert not (pytester.path / ".hardening").exists()  # refused before any run directory


def test_a_used_artifacts_directory_is_refused(pytester: pytest.Pytester) -> None:
    used = pytester.mkdir("used")
    (used / "old.txt").write_text("x")
    result = pytester.runpytest_inprocess("--hardening-suite", "compile", "--hardening-artifacts", str(used))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--hardening-artifacts *used: exists and is not empty*"])


def test_collect_only_lists_one_item_per_case_and_starts_nothing(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--hardening-suite", "all", "--collect-only", "-q")
    assert result.ret == 0
    expected = [f"hardening.{c.suite}::{c.id}[ranks=2]" for c in hardening.suites.get_suite("all") if c.min_ranks <= 2]
    assert [line for line in result.stdout.lines if "::" in line] == expected
    result.stdout.fnmatch_lines([f"{len(expected)} tests collected*"])
    assert not (pytester.path / ".hardening").exists()


def test_items_filter_like_tests_and_carry_the_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_own():\n    pass\n")
    result = pytester.runpytest_inprocess("--hardening-suite", "compile", "--collect-only", "-q", "-m", "hardening", "-k", "C-0 and not C-00")
    assert result.ret == 0
    lines = [line for line in result.stdout.lines if "::" in line]
    assert lines == [f"hardening.compile::{i}[ranks=2]" for i in COMPILE_IDS if i.startswith("C-0") and i != "C-00"]


def test_the_ini_key_names_the_suite(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nhardening_suite = compile\n")
    result = pytester.runpytest_inprocess("--collect-only", "-q")
    result.stdout.fnmatch_lines(["hardening.compile::W-01[[]ranks=2[]]", f"{len(COMPILE_IDS)} tests collected*"])
    # Naming a test file runs that file: the ini key does not add the whole gate to it.
    pytester.makepyfile(test_mine="def test_one():\n    pass\n")
    result = pytester.runpytest_inprocess("--collect-only", "-q", "test_mine.py")
    result.stdout.fnmatch_lines(["test_mine.py::test_one", "1 test collected*"])
    assert "hardening.compile" not in result.stdout.str()


def test_xdist_is_refused(pytester: pytest.Pytester) -> None:
    # xdist's own option, declared as it declares it (xdist itself is not installed here).
    pytester.makeconftest("def pytest_addoption(parser):\n    parser.addoption('--numprocesses', dest='numprocesses', type=int)\n")
    result = pytester.runpytest_inprocess("--hardening-suite", "compile", "--numprocesses", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--hardening-suite under pytest-xdist (-n)*"])


def test_everything_deselected_leaves_no_run_directory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_own():\n    pass\n")
    result = pytester.runpytest_inprocess("--hardening-suite", "compile", "-m", "not hardening")
    assert result.ret == 0
    result.assert_outcomes(passed=1, deselected=len(COMPILE_IDS))
    assert "hardening suite compile" not in result.stdout.str()
    assert list((pytester.path / ".hardening" / "runs").iterdir()) == []


def test_without_the_flag_the_plugin_adds_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_own():\n    pass\n")
    result = pytester.runpytest_inprocess("-v")
    assert result.ret == 0
    result.assert_outcomes(passed=1)
    assert "hardening:" not in result.stdout.str() and "hardening suite" not in result.stdout.str()
    assert not (pytester.path / ".hardening").exists()
    assert "--hardening-suite=NAME" in pytester.runpytest_inprocess("--help").stdout.str()  # loaded from the entry point


def test_importing_the_plugin_imports_no_torch() -> None:
    """It loads in every pytest session where hardening is installed."""
    code = "import sys, hardening.pytest_plugin; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the verdict mapping, without processes ----------------------------------------------------


def _result(verdict: str, outcome: str, reason: str = "") -> "CaseResult":
    from hardening.harness.results import CaseResult, Outcome, Verdict

    return CaseResult(
        id="C-03", title="t", fault="recompile:rank=1", expectation="r1:CompileGateError", outcome=Outcome(outcome),
        verdict=Verdict(verdict), reason=reason, run_dir="/runs/C-03",
    )  # fmt: skip


def test_a_pass_passes_and_a_skipped_verdict_is_a_skip_with_its_reason() -> None:
    from hardening.pytest_plugin import _settle

    _settle(_result("pass", "crashed"))
    with pytest.raises(pytest.skip.Exception, match="C-03: no input has a dimension > 1"):
        _settle(_result("skipped", "skipped", "no input has a dimension > 1"))


@pytest.mark.parametrize(("verdict", "outcome"), [("fail", "survived"), ("unknown", "not_fired"), ("unknown", "harness_error")])
def test_a_fail_or_an_unknown_fails_the_item_with_the_reason(verdict: str, outcome: str) -> None:
    from hardening.pytest_plugin import CaseFailed, _body, _settle

    with pytest.raises(CaseFailed, match=f"^{verdict.upper()} \\({outcome}\\): why$") as info:
        _settle(_result(verdict, outcome, "why"))
    body = _body(info.value.case)
    assert body.startswith(f"{verdict.upper()} ({outcome}): why\n") and "reason: why" in body
    assert body.endswith("case directory: /runs/C-03\n")
