"""The pipeline on real processes (3 gloo ranks): the ``pp`` suite end to end, the epoch
fence that must fail a leak, the queue bound, the topology check and a user's own PP
server under faults. Every run is bounded and leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_harness import free_port
from hardening.harness.cases import Case, RankExpect, completes, crashes
from hardening.harness.profile import load_profile
from hardening.harness.results import Verdict
from hardening.harness.runner import Runner
from hardening.suites import get_suite

pytestmark = [pytest.mark.multiproc]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROCS = Path(__file__).resolve().parent / "procs"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _no_rank_left(results) -> None:
    pids = {r.pid for result in results for r in result.ranks if r.pid}
    assert not [p for p in pids if _alive(p)]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory):
    profile = load_profile("cpu", {"world.ranks": 3})
    with Runner(profile, run_dir=tmp_path_factory.mktemp("pp"), progress=lambda line: None) as r:
        yield r


@pytest.mark.timeout(120)
def test_a_fence_that_lets_a_stale_result_through_fails_the_case(runner: Runner) -> None:
    # The recompute workload cuts every 4 chunks; with the fence off on rank 0 the late
    # results of each old epoch reach the caller, and the checker must say so.
    case = Case(id="T-LEAK", title="fence off", suite="test", workload="pp0:recompute", fault="stale_leak", expect=completes(), check="fence_held")
    result = runner.run_case(case)
    assert result.verdict is Verdict.FAIL, result.reason
    assert "stale result delivered" in result.reason
    _no_rank_left([result])


@pytest.mark.timeout(120)
def test_no_segment_ever_has_more_chunks_in_flight_than_its_depth(runner: Runner) -> None:
    result = runner.run_case(Case(id="T-SWEEP", title="sweep", suite="test", workload="pp1:sweep", expect=completes()))
    assert result.verdict is Verdict.PASS, result.reason
    control = result.ranks[0].pipeline
    assert control["segments"] == ["D=1", "D=2", "D=3", "D=4"]
    for index, name in enumerate(control["segments"]):
        timeline = control["timelines"][str(index)]
        assert 1 <= timeline["max_in_flight"] <= timeline["depth"] == int(name[2:])
    warmup = runner.profile.warmup_calls
    assert control["delivered"] == control["chunks"] - warmup == 4 * runner.profile.pp.chunks and control["stale_dropped"] == 0
    # The mesh leader's own record holds the same segments, measured on its side.
    assert sorted(result.ranks[1].pipeline["timelines"]) == ["0", "1", "2", "3"]
    _no_rank_left([result])


def program_runner(program: Path, run_dir: Path) -> Runner:
    """A runner whose ranks run ``program`` (the profile file is written as it starts)."""
    profile = load_profile("cpu", {"world.ranks": 3})
    profile.program = str(program)
    return Runner(profile, run_dir=run_dir, progress=lambda line: None)


@pytest.mark.timeout(120)
def test_ranks_that_declare_different_topologies_are_named_before_any_group_exists(tmp_path: Path) -> None:
    case = Case(id="T-TOPO", title="skew", suite="test", expect=crashes("ParityError", match=r"pipeline\.kind", within_s=5))
    with program_runner(PROCS / "pp_skewed.py", tmp_path) as runner:
        result = runner.run_case(case)
    assert [r.error_class for r in result.ranks] == ["ParityError"] * 3, result.reason
    assert "pp0" in result.ranks[0].message and "pp1" in result.ranks[0].message
    _no_rank_left([result])


@pytest.mark.timeout(180)
def test_a_users_own_pp_server_completes_and_its_leader_check_ends_the_mesh(tmp_path: Path) -> None:
    with program_runner(EXAMPLES / "pp_server.py", tmp_path) as runner:
        clean = runner.run_case(Case(id="T-USER", title="user server", suite="test", expect=completes()))
        faulted = runner.run_case(
            Case(
                id="T-USER-07", title="user server, bad chunk", suite="test", fault="leader_bad_chunk:rank=1",
                expect=crashes("PeerError", match=r"rank 1\b.*ContractError", on={1: RankExpect(error="ContractError")}, within_s=2),
            )
        )  # fmt: skip
    assert clean.verdict is Verdict.PASS, clean.reason
    assert clean.ranks[0].pipeline["delivered"] == 12  # warmup results are taken, never handed to the loop
    assert faulted.verdict is Verdict.PASS, faulted.reason
    assert "rank 1 (mesh leader) stopped at chunk" in faulted.ranks[2].message
    _no_rank_left([clean, faulted])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pp_suite_end_to_end_on_three_ranks(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hardening", "suite", "pp", "--ranks", "3", "--json", "r.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    cases = {c["id"]: c for c in report["cases"]}
    assert set(cases) == {c.id for c in get_suite("pp")}
    expected = {
        "OM-07": ["PeerError", "ContractError", "PeerError"],
        "PP-02": ["BackpressureError", "PeerError", "PeerError"],
    }
    for case_id, errors in expected.items():
        assert [r["error_class"] for r in cases[case_id]["ranks"]] == errors, case_id
    assert [r["error_class"] for r in cases["OM-08"]["ranks"]][0] == "PeerError"
    assert {r["error_class"] for r in cases["OM-08"]["ranks"][1:]} <= {"GroupError", "PeerError"}
    assert "GroupError" in {r["error_class"] for r in cases["OM-08"]["ranks"]}
    for case in cases.values():
        assert case["verdict"] == "pass", case
        if case["budget_s"] is not None:
            assert case["t_detect"] <= case["budget_s"]
    assert cases["OM-09"]["metrics"]["stale_dropped"] >= 1
    assert cases["O-01"]["metrics"]["D=2"]["overlap_score"] >= load_profile("cpu").pp.gates.min_overlap_score
    assert "modelled" in cases["O-02"]["metrics"]["note"]
    assert cases["O-03"]["metrics"]["score_delta"] <= 0.15 and "throughput_ratio" in cases["O-03"]["metrics"]
    pids = {r["pid"] for c in report["cases"] for r in c["ranks"] if r["pid"]}
    assert not [p for p in pids if _alive(p)]


@pytest.mark.timeout(180)
def test_pp_server_under_torchrun(tmp_path: Path) -> None:
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", port, str(EXAMPLES / "pp_server.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0: 12 results" in out.stdout
    records = [json.loads((tmp_path / ".hardening" / "records" / f"rank{r}.json").read_text()) for r in range(3)]
    assert all(r["ok"] and r["phase"] == "done" for r in records)
    assert records[0]["pipeline"]["delivered"] == 12 and records[0]["pipeline"]["kind"] == "pp1"
    assert records[1]["pipeline"]["role"] == "mesh leader" and records[1]["counters"]["graphs"] >= 1
    assert records[0]["pipeline"]["metrics"]["steady"]["chunks"] == 12


def test_pp_server_asks_no_more_than_a_session() -> None:
    code = (EXAMPLES / "pp_server.py").read_text().split('"""', 2)[2]
    lines = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= 40, len(lines)
    for step in ("@hr.record", "Session.from_env", "s.pipeline", "s.compile", "warmup", "submit", "drain", "serve"):
        assert step in code, step
    assert "hardening.harness" not in code and "new_group" not in code and "isend" not in code
