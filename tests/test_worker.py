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


_LONG_WARMUP = """
import torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import hardening.runtime as hr

def make(k):
    return {"x": torch.full((2, 4), float(k))}

@hr.record
def main():
    with hr.Session.from_env(hr.RuntimeConfig()) as s:
        layer = s.compile(lambda x: funcol.all_reduce(x * 2, "sum", dist.group.WORLD))
        plane = s.control_plane({"x": hr.Spec(shape=(2, 4), dtype="float32")})
        plane.warmup(layer, calls=4, make_inputs=make)  # the profile says 2
        for c in plane.serve(4, make_inputs=make):
            layer(c.x)

main()
"""


@pytest.mark.multiproc
@pytest.mark.timeout(200)
def test_a_fault_acts_at_the_programs_first_steady_call_not_the_profiles(tmp_path: Path) -> None:
    # The profile warms up 2 calls, the program 4: call 2 is still warmup there (inputs
    # not digested), so a fault at the profile's first steady call would change an
    # unchecked input and go unseen. It acts at call 4, the program's first steady call.
    program = tmp_path / "long_warmup.py"
    program.write_text(_LONG_WARMUP)
    out, report = _hardening(tmp_path, "suite", "operator", "--only", "OM-11", "--program", str(program), "--json", "r.json")
    assert out.returncode == ExitCode.OK, out.stdout[-4000:] + out.stderr[-3000:]
    (case,) = report["cases"]
    assert case["verdict"] == "pass", case
    follower = case["ranks"][1]
    assert follower["error_class"] == "DriftError" and "at call 4" in follower["message"], follower


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


def test_a_program_named_in_a_profile_is_checked_like_the_flag(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("program: gone.py\n")
    out, _ = _hardening(tmp_path, "suite", "operator", "--profile", "p.yaml", timeout=60)
    assert out.returncode == ExitCode.USAGE_ERROR and "key 'program' gone.py: file not found" in out.stderr
    (tmp_path / "own.py").write_text("")
    (tmp_path / "s.yaml").write_text("program: own.py\nhardened: false\n")
    out, _ = _hardening(tmp_path, "suite", "operator", "--profile", "s.yaml", timeout=60)
    assert out.returncode == ExitCode.USAGE_ERROR and "hardened: false" in out.stderr


_PROGRAM = """
import torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import hardening.runtime as hr

def make(k):
    return {{"x": torch.full((2, 4), float(k))}}

@hr.record
def main():
    with hr.Session.from_env(hr.RuntimeConfig(), fingerprint={fingerprint}) as s:
        layer = s.compile(lambda x: funcol.all_reduce(x * 2, "sum", dist.group.WORLD))
        plane = s.control_plane({{"x": hr.Spec(shape={shape}, dtype="float32")}})
        {body}

main()
"""


@pytest.mark.multiproc
@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    "name, fingerprint, body, error, says",
    [
        ("fewer-calls", "{}", "plane.warmup(layer, calls=1, make_inputs=make)\n        for c in plane.serve(2 if s.rank == 0 else 3, make_inputs=make): layer(c.x)",
         {1: "ContractError"}, "got SHUTDOWN 3: the leader served fewer calls"),
        ("serve-before-warmup", "{}", "for c in plane.serve(2, make_inputs=make): layer(c.x)",
         {0: "ContractError", 1: "ContractError"}, "serve() before warmup()"),
        ("key-collision", '{"compile.enabled": False}', "pass",
         {0: "ValueError", 1: "ValueError"}, "['compile.enabled'] are the runtime's own"),
        # Ranks that describe different inputs are named before the first frame, which
        # (fused on the host) would not even have the same size on both ranks.
        ("contract-skew", "{}", "pass", {0: "ParityError", 1: "ParityError"}, "contract.tensor.x"),
    ],
)
def test_a_program_that_misuses_the_session_ends_with_a_named_cause(
    tmp_path: Path, name: str, fingerprint: str, body: str, error: dict[int, str], says: str
) -> None:
    program = tmp_path / f"{name}.py"
    shape = "(2, 4) if s.rank == 0 else (2, 5)" if name == "contract-skew" else "(2, 4)"
    program.write_text(_PROGRAM.format(fingerprint=fingerprint, body=body, shape=shape))
    out, report = _hardening(tmp_path, "suite", "operator", "--only", "OM-00", "--program", str(program), "--json", "r.json")
    assert out.returncode == ExitCode.FAILED, out.stdout + out.stderr
    ranks = report["cases"][0]["ranks"]
    for rank, cls in error.items():
        assert ranks[rank]["error_class"] == cls and says in ranks[rank]["message"], ranks[rank]
    # Every rank ended by itself with a record: nothing hung, nothing was torn down.
    assert all(r["has_record"] for r in ranks) and report["cases"][0]["outcome"] == "crashed"
