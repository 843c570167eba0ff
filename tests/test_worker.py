"""The harness's rank: a region or the user's own program, through the runtime's Session.

Every suite run elsewhere in the tests goes through ``worker.serve_region``; here: the
user's own program (``--program``), judged by the records its ``@hr.record`` writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hardening.harness.cli import ExitCode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _hardening(tmp_path: Path, *args: str, timeout: float = 200) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    out = subprocess.run(
        [sys.executable, "-m", "hardening", *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )
    report = tmp_path / "r.json"
    return out, json.loads(report.read_text()) if report.exists() else None


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_the_operator_suite_judges_the_users_own_program(tmp_path: Path) -> None:
    out, report = _hardening(tmp_path, "suite", "operator", "--program", str(EXAMPLES / "own_loop.py"), "--ranks", "2", "--json", "r.json")
    assert out.returncode == ExitCode.OK, out.stdout[-6000:] + out.stderr[-3000:]
    cases = {c["id"]: c for c in report["cases"]}
    assert all(c["verdict"] == "pass" for c in cases.values()), {i: c["verdict"] for i, c in cases.items()}
    # The skewed key is the program's own, and the program really ran on the skewed seed.
    om04 = cases["OM-04"]
    assert om04["ranks"][1]["touched"] == "seed" and all("seed" in r["message"] for r in om04["ranks"])
    # The program's own prints are in its rank logs: it ran, it was not simulated.
    control = cases["OM-00"]
    log = Path(control["ranks"][0]["log_dir"]) / "stdout.log"
    assert "rank 0: 12 hardened calls" in log.read_text()


@pytest.mark.multiproc
@pytest.mark.timeout(200)
def test_a_program_that_never_uses_the_runtime_is_never_a_pass(tmp_path: Path) -> None:
    # Exits 0 on every rank but writes no record: it did nothing the harness can judge.
    program = tmp_path / "plain.py"
    program.write_text("print('serving without hardening')\n")
    out, report = _hardening(tmp_path, "suite", "operator", "--only", "OM-00,OM-01", "--program", str(program), "--json", "r.json")
    assert out.returncode == ExitCode.FAILED, out.stdout + out.stderr
    control, om01 = report["cases"]
    assert control["verdict"] == "fail" and all(r["error_class"] == "no_final_record" for r in control["ranks"])
    assert om01["verdict"] == "unknown"  # its fault never fired: unknown, never a pass


@pytest.mark.parametrize(
    "args, says",
    [
        (("--program", "missing.py"), "--program missing.py: file not found"),
        (("--program", "serve.txt"), "--program serve.txt: must be a .py file"),
        (("--program", "."), "must be a .py file"),
        (("--program", "own.py", "--target", "m:build"), "--program and --target exclude each other"),
    ],
)
def test_bad_program_flags_are_usage_errors_before_anything_starts(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    (tmp_path / "own.py").write_text("")
    (tmp_path / "serve.txt").write_text("")
    out, _ = _hardening(tmp_path, "suite", "operator", *args, timeout=60)
    assert out.returncode == ExitCode.USAGE_ERROR, out.stderr
    assert says in out.stderr and not (tmp_path / ".hardening").exists()
