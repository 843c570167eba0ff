"""The CLI: exit codes from suite results, and real `python -m hardening` runs that end before any rank starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardening.harness.cli import ExitCode, exit_code_for
from hardening.harness.results import CaseResult, Outcome, SuiteResult, Verdict
from hardening.suites import get_suite

# -- exit_code_for -------------------------------------------------------------------------


def _case(case_id: str, outcome: Outcome, verdict: Verdict) -> CaseResult:
    return CaseResult(id=case_id, title=case_id, fault=None, expectation="completes", outcome=outcome, verdict=verdict)


def _suite(*cases: CaseResult, **kw) -> SuiteResult:
    return SuiteResult(suite="compile", profile="cpu", num_ranks=2, cases=list(cases), **kw)


PASS = _case("control", Outcome.COMPLETED, Verdict.PASS)
FAIL = _case("C-01", Outcome.SURVIVED, Verdict.FAIL)
UNKNOWN = _case("C-02", Outcome.NOT_FIRED, Verdict.UNKNOWN)


def test_exit_code_values_are_the_documented_ones() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 6]
    assert ExitCode.USAGE_ERROR == 4 and ExitCode.NO_CASES == 5 and ExitCode.INDETERMINATE == 6


def test_all_pass_is_ok() -> None:
    assert exit_code_for(_suite(PASS, PASS)) is ExitCode.OK


def test_a_fail_is_failed_even_next_to_unknowns() -> None:
    assert exit_code_for(_suite(PASS, FAIL)) is ExitCode.FAILED
    assert exit_code_for(_suite(UNKNOWN, FAIL, PASS)) is ExitCode.FAILED


def test_only_unknowns_besides_passes_is_indeterminate() -> None:
    assert exit_code_for(_suite(PASS, UNKNOWN)) is ExitCode.INDETERMINATE


def test_interrupted_wins() -> None:
    assert exit_code_for(_suite(PASS, FAIL, interrupted=True)) is ExitCode.INTERRUPTED


def test_harness_error_of_the_suite_is_internal_error() -> None:
    assert exit_code_for(_suite(harness_error="fork server not ready after 60s")) is ExitCode.INTERNAL_ERROR


def test_harness_error_of_a_case_is_internal_error() -> None:
    broken = _case("C-03", Outcome.HARNESS_ERROR, Verdict.UNKNOWN)
    assert exit_code_for(_suite(PASS, FAIL, broken)) is ExitCode.INTERNAL_ERROR


def test_no_cases() -> None:
    assert exit_code_for(_suite()) is ExitCode.NO_CASES


# -- real subprocess runs -----------------------------------------------------------------


def _hardening(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "hardening", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Every run here ends before a rank starts: nothing may be left behind.
    assert not (tmp_path / ".hardening").exists(), "a run directory was created"
    return proc


# The two runs that get as far as validating the region import torch (seconds each):
# start them together once, so they overlap instead of queueing.
TORCH_RUNS = {
    "target": ("suite", "compile", "--target", "nosuchmod:build"),
    "ranks3": ("suite", "compile", "--ranks", "3"),
}


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    procs = {}
    for key, args in TORCH_RUNS.items():
        cwd = tmp_path_factory.mktemp(key)
        argv = [sys.executable, "-m", "hardening", *args]
        procs[key] = (cwd, argv, subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = {}
    try:
        for key, (cwd, argv, proc) in procs.items():
            out, err = proc.communicate(timeout=120)
            # A target is imported where a deadline applies (a child of the fork server), so its
            # run directory exists and keeps the import's output; flag errors come before it.
            if key != "target":
                assert not (cwd / ".hardening").exists(), "a run directory was created"
            done[key] = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    finally:
        for _, _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return done


@pytest.mark.timeout(60)
def test_list_prints_every_case(tmp_path: Path) -> None:
    proc = _hardening(tmp_path, "list")
    assert proc.returncode == ExitCode.OK, proc.stderr
    ids = [c.id for c in get_suite("compile")]
    assert len(ids) >= 6
    rows = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    for case_id in ids:
        assert case_id in rows, f"{case_id} missing from:\n{proc.stdout}"
    for case in get_suite("compile"):
        if case.fault:
            assert case.fault in proc.stdout


@pytest.mark.timeout(60)
def test_unknown_suite_is_a_usage_error_naming_known_suites(tmp_path: Path) -> None:
    proc = _hardening(tmp_path, "suite", "nope")
    assert proc.returncode == ExitCode.USAGE_ERROR
    assert "'nope'" in proc.stderr and "compile" in proc.stderr and "all" in proc.stderr


@pytest.mark.timeout(60)
def test_unknown_case_id_is_a_usage_error(tmp_path: Path) -> None:
    proc = _hardening(tmp_path, "suite", "compile", "--only", "C-99")
    assert proc.returncode == ExitCode.USAGE_ERROR
    assert "C-99" in proc.stderr and "C-01" in proc.stderr


@pytest.mark.timeout(60)
def test_bad_profile_names_the_file_and_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("compile: {fullgrph: true}\n")
    proc = _hardening(tmp_path, "suite", "compile", "--profile", str(bad))
    assert proc.returncode == ExitCode.USAGE_ERROR
    assert str(bad) in proc.stderr
    assert "compile.fullgrph" in proc.stderr


@pytest.mark.timeout(60)
def test_cases_that_need_a_peer_run_nothing_on_one_rank(tmp_path: Path) -> None:
    proc = _hardening(tmp_path, "suite", "compile", "--ranks", "1", "--only", "C-01,W-01")
    assert proc.returncode == ExitCode.NO_CASES
    assert "no cases selected" in proc.stderr
    assert "C-01 (needs 2)" in proc.stderr and "W-01 (needs 2)" in proc.stderr


@pytest.mark.timeout(60)
def test_unimportable_target_is_a_usage_error(torch_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    proc = torch_runs["target"]
    assert proc.returncode == ExitCode.USAGE_ERROR
    assert "--target nosuchmod:build: cannot import nosuchmod" in proc.stderr


@pytest.mark.timeout(60)
def test_heads_not_dividing_by_ranks_is_a_usage_error(torch_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    proc = torch_runs["ranks3"]
    assert proc.returncode == ExitCode.USAGE_ERROR
    assert "region" in proc.stderr and "dims" in proc.stderr
    assert "heads (4)" in proc.stderr and "3 ranks" in proc.stderr
    assert "--ranks 3" in proc.stderr  # the flag is named, not the profile file


# -- run directories -------------------------------------------------------------------------


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hardening.harness.cli import _make_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt: "20261201-120000")
    dirs = [_make_run_dir(None, "compile") for _ in range(3)]
    assert [d.name for d in dirs] == ["20261201-120000-compile", "20261201-120000-compile-2", "20261201-120000-compile-3"]
    assert all(d.is_dir() for d in dirs)


def test_an_empty_artifacts_directory_is_used_and_a_new_one_created(tmp_path: Path) -> None:
    from hardening.harness.cli import _make_run_dir

    (tmp_path / "empty").mkdir()
    assert _make_run_dir(str(tmp_path / "empty"), "compile") == (tmp_path / "empty").resolve()
    assert _make_run_dir(str(tmp_path / "a" / "b"), "compile").is_dir()


def test_skipped_cases_do_not_make_a_run_indeterminate() -> None:
    skipped = _case("C-03", Outcome.SKIPPED, Verdict.SKIPPED)
    assert exit_code_for(_suite(PASS, skipped)) is ExitCode.OK
    assert exit_code_for(_suite(PASS, skipped, UNKNOWN)) is ExitCode.INDETERMINATE


@pytest.mark.timeout(60)
def test_a_reader_that_goes_away_is_not_an_internal_error(tmp_path: Path) -> None:
    # `hardening list | head -1`: the pipe closes before the table is written.
    proc = subprocess.Popen(
        [sys.executable, "-m", "hardening", "list"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert proc.wait(timeout=50) == ExitCode.OK, err
    assert "internal error" not in err and "Traceback" not in err


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_a_machine_without_numpy_sees_no_numpy_warning(tmp_path: Path) -> None:
    # torch does not depend on numpy and warns at import when it is missing; every
    # process of a run imports torch, and none of them may put that on the terminal.
    hidden = tmp_path / "hide" / "numpy"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'numpy\'", name="numpy")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide")}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=120)
    assert "Failed to initialize NumPy" in probe.stderr  # the stub really hides numpy from torch
    out = subprocess.run(
        [sys.executable, "-m", "hardening", "suite", "compile", "--only", "C-00"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "NumPy" not in out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_help_names_every_suite_and_shipped_profile(tmp_path: Path) -> None:
    from hardening.harness.profile import available_profiles
    from hardening.suites import SUITES

    out = _hardening(tmp_path, "suite", "--help")
    assert out.returncode == 0
    for name in [*SUITES, *available_profiles()]:
        assert name in out.stdout, name
