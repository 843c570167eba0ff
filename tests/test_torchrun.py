"""``--launcher torchrun`` on real processes: the same verdicts as the runner's own
launcher, torchelastic's error files, restarts refused, and two "nodes" on one host
(two runner processes on loopback) in lockstep, one of them killed mid-case. Every run is
bounded and leaves no process behind (each carries a marker in its environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_harness import free_port, hardening_command, left_behind, new_marker
from hardening.harness.torchrun import Rendezvous, command

pytestmark = [pytest.mark.multiproc]


def _suite(marker: str, *args: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, CORPUS_MARKER=marker)
    return subprocess.Popen(
        [*hardening_command(), "suite", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
    print(out)
    print(err, file=sys.stderr)
    return proc.returncode, out + err


def test_the_torchrun_command_forbids_restarts_and_meets_on_loopback(tmp_path: Path) -> None:
    one = command(world_size=2, rdzv=Rendezvous(), rdzv_id="x", case_dir=tmp_path, profile_path=tmp_path / "p.yaml", join_s=60)
    assert one[one.index("--max-restarts") + 1] == "0" and "--standalone" in one
    assert one[one.index("--local-addr") + 1] == "127.0.0.1" and one[one.index("--nproc-per-node") + 1] == "2"
    two = command(
        world_size=4, rdzv=Rendezvous(nnodes=2, node_rank=1, endpoint="127.0.0.1:29999"), rdzv_id="run-3",
        case_dir=tmp_path, profile_path=tmp_path / "p.yaml", join_s=60,
    )  # fmt: skip
    assert "--standalone" not in two and two[two.index("--rdzv-id") + 1] == "run-3"
    assert two[two.index("--nproc-per-node") + 1] == "2" and "is_host=false" in two[two.index("--rdzv-conf") + 1]


@pytest.mark.timeout(30)
def test_a_rank_started_with_restarts_allowed_refuses_to_run(tmp_path: Path) -> None:
    # What torchrun would start with --max-restarts 3: a restart would hide the fault.
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
               TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_RESTART_COUNT="0")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "hardening.harness.torchrun_rank", str(tmp_path), str(tmp_path / "p.yaml")],
        env=env, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 4, out.stderr
    assert "--max-restarts 3" in out.stderr and "run torchrun with --max-restarts 0" in out.stderr
    assert not (tmp_path / "rank0" / "launch.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_launcher_gives_the_same_verdicts_and_torchelastics_error_files(tmp_path: Path) -> None:
    marker = new_marker()
    code, text = _finish(
        _suite(marker, "operator", "--launcher", "torchrun", "--only", "OM-00,OM-04,OM-13,H-01", "--json", "r.json",
               "--artifacts", "run", cwd=tmp_path),
        timeout=280,
    )  # fmt: skip
    assert code == 0, text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["environment"]["launcher"] == "torchrun"
    cases = {c["id"]: c for c in report["cases"]}
    assert [c["verdict"] for c in cases.values()] == ["pass"] * 4
    assert cases["H-01"]["t_detect"] <= 1.0 and cases["OM-13"]["t_detect"] <= 1.0
    # Each failing rank's named cause is also where torchrun's agent looks for it.
    for rank in cases["OM-04"]["ranks"]:
        error = json.loads(Path(rank["artifacts"]["torchelastic_error"]).read_text())
        assert error["message"]["message"].startswith("ParityError: ranks disagree on 1 fingerprint key(s): region.seed")
    assert (tmp_path / "run" / "OM-00" / "torchrun.log").is_file()
    assert not left_behind(marker)


def _phases(endpoint: str, ranks: int) -> list[str]:
    """Each rank's phase in case 1 of a multi-node run, read from node 0's store as a
    runner would (``nodes/plan`` holds the run id; case 1's keys live under it)."""
    from hardening.runtime import store as store_keys

    host, _, port = endpoint.rpartition(":")
    try:
        store = store_keys.connect(host, int(port), timeout_s=5)
        run_id = json.loads(store.get("nodes/plan"))["run_id"]
        keys = [f"{store_keys.torchrun_prefix({'TORCHELASTIC_RUN_ID': f'{run_id}-1'})}/phase/{r}" for r in range(ranks)]
        return [store.get(k).decode() if store.check([k]) else "" for k in keys]
    except Exception:  # node 0 not up yet
        return [""] * ranks


def _two_nodes(
    marker: str, tmp_path: Path, *args: str, endpoint: str = "", suite: str = "operator"
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    endpoint = endpoint or f"127.0.0.1:{free_port()}"
    nodes = []
    for k in (0, 1):
        (tmp_path / f"node{k}").mkdir()
        flags = ["--launcher", "torchrun", "--nnodes", "2", "--node-rank", str(k), "--rdzv-endpoint", endpoint]
        nodes.append(_suite(marker, suite, *flags, *args, "--json", "r.json", "--artifacts", "run", cwd=tmp_path / f"node{k}"))
    return nodes[0], nodes[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_on_one_host_run_the_compile_gate(tmp_path: Path) -> None:
    marker = new_marker()
    node0, node1 = _two_nodes(marker, tmp_path, "--ranks", "4", "--only", "C-00,C-01,C-03,C-05", suite="compile")
    (code0, text0), (code1, text1) = _finish(node0, 280), _finish(node1, 60)
    assert code0 == 0 and code1 == 0, text0 + text1
    cases = json.loads((tmp_path / "node0" / "r.json").read_text())["cases"]
    assert [(c["id"], c["verdict"]) for c in cases] == [("C-00", "pass"), ("C-01", "pass"), ("C-03", "pass"), ("C-05", "pass")]
    assert all(sorted(r["node"] for r in c["ranks"]) == [0, 0, 1, 1] for c in cases)
    assert not left_behind(marker)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_on_one_host_run_in_lockstep_and_node_0_reports_every_rank(tmp_path: Path) -> None:
    marker = new_marker()
    # With a token: every key of the run (the runners', the rendezvous', the ranks') lives under it.
    node0, node1 = _two_nodes(marker, tmp_path, "--ranks", "4", "--only", "OM-00,OM-11,H-01", "--rdzv-id", "t0ken-42")
    (code0, text0), (code1, text1) = _finish(node0, 380), _finish(node1, 60)
    assert code0 == 0 and code1 == 0, text0 + text1
    reports = [json.loads((tmp_path / f"node{k}" / "r.json").read_text()) for k in (0, 1)]
    for report in reports:  # both nodes judged every case from all four ranks
        assert [c["verdict"] for c in report["cases"]] == ["pass"] * 3
        assert all(sorted(r["rank"] for r in c["ranks"]) == [0, 1, 2, 3] for c in report["cases"])
    cases = {c["id"]: c for c in reports[0]["cases"]}
    for case in cases.values():  # torchrun placed two ranks on each node
        assert sorted(r["node"] for r in case["ranks"]) == [0, 0, 1, 1], case["id"]
    drift = cases["OM-11"]
    rank1 = next(r for r in drift["ranks"] if r["rank"] == 1)
    assert drift["root_cause_rank"] == 1 and drift["root_cause_node"] == rank1["node"]
    assert cases["H-01"]["t_detect"] <= 1.0
    for k in (0, 1):  # each case's rendezvous (torchrun's log directory is named after it)
        assert len(list(tmp_path.glob(f"node{k}/run/*/torchrun/t0ken-42-*"))) == 3
    assert not left_behind(marker)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_minus_9_of_one_nodes_runner_ends_the_other_nodes_ranks_peer_lost_within_a_second(tmp_path: Path) -> None:
    marker = new_marker()
    (tmp_path / "long.yaml").write_text("steps: 100000\ntimeouts: {case: 120}\n")  # runs until someone kills it
    endpoint = f"127.0.0.1:{free_port()}"
    node0, node1 = _two_nodes(
        marker, tmp_path, "--ranks", "4", "--only", "OM-00", "--profile", str(tmp_path / "long.yaml"), endpoint=endpoint
    )  # fmt: skip
    try:
        deadline = time.time() + 200
        while time.time() < deadline and _phases(endpoint, 4) != ["steady"] * 4:
            time.sleep(0.5)
        assert _phases(endpoint, 4) == ["steady"] * 4, "the ranks never reached the steady-state loop"
        time.sleep(1)
        killed_at = time.time()
        node1.kill()  # the runner of node 1: its torchrun, reapers and ranks die with it
        code0, text0 = _finish(node0, 120)
        _finish(node1, 10)
    finally:
        node0.kill(), node1.kill()
    report = json.loads((tmp_path / "node0" / "r.json").read_text())
    (case,) = report["cases"]
    here = [r for r in case["ranks"] if r["error_class"] != "NodeLost"]
    lost = sorted(r["rank"] for r in case["ranks"] if r["error_class"] == "NodeLost")
    assert len(here) == 2 and len(lost) == 2, case["ranks"]
    for rank in here:
        assert rank["error_class"] == "PeerLost" and rank["phase"] == "steady", rank
        assert "lost: node 1" in rank["message"] and str(lost[0]) in rank["message"], rank["message"]
        assert rank["exited_at"] - killed_at < 1.0, rank["exited_at"] - killed_at
    assert "node(s) [1] published no result" in case["reason"]
    assert code0 == 3, text0  # the suite cannot go on without node 1: a harness error, said once
    assert not left_behind(marker)


@pytest.mark.timeout(120)
def test_nodes_that_select_different_cases_refuse_before_any_rank_starts(tmp_path: Path) -> None:
    marker = new_marker()
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for k, only in ((0, "OM-00"), (1, "OM-13")):
        (tmp_path / f"node{k}").mkdir()
        flags = ["--launcher", "torchrun", "--nnodes", "2", "--node-rank", str(k), "--rdzv-endpoint", endpoint]
        procs.append(_suite(marker, "operator", *flags, "--only", only, "--artifacts", "run", cwd=tmp_path / f"node{k}"))
    (code0, text0), (code1, text1) = _finish(procs[0], 100), _finish(procs[1], 20)
    assert code1 == 3 and "node 1 selected a different run than node 0 (cases differ" in text1, text1
    assert code0 == 3 and "node 1 selected a different run (cases differ)" in text0, text0
    assert not list(tmp_path.glob("node*/run/*/rank*")), "no rank may start"
    assert not left_behind(marker)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_rank_killed_in_its_first_compile_under_torchrun_is_named_within_a_second(tmp_path: Path) -> None:
    # Its peer is blocked in warmup's lockstep (the compile bound: 300 s); the reaper sees
    # the death, the runner tells the store, the peer's watchdog reads it on its next tick.
    from hardening.harness.cases import Case, RankExpect, crashes
    from hardening.harness.profile import load_profile
    from hardening.harness.results import Verdict
    from hardening.harness.runner import Runner

    case = Case(
        id="T-WARM-KILL", title="killed in warmup", suite="test", fault="kill:rank=1:call=0",
        expect=crashes("PeerLost", match=r"rank 1 died \(killed by SIGKILL", on={1: RankExpect(error="SIGKILL")}, within_s=1),
    )  # fmt: skip
    with Runner(load_profile("cpu", {"world.launcher": "torchrun"}), run_dir=tmp_path, progress=lambda line: None) as runner:
        result = runner.run_case(case)
    assert result.verdict is Verdict.PASS, result.reason
    assert result.ranks[0].phase == "warmup" and result.t_detect is not None and result.t_detect <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_case_run_twice_in_one_runner_reads_only_what_its_second_run_wrote(tmp_path: Path) -> None:
    # A benchmark's rounds rerun each case in the same directory: the first run's
    # launch.json (a dead agent's store) or record.json must not be taken for the second's.
    from hardening.harness.profile import load_profile
    from hardening.harness.results import Verdict
    from hardening.harness.runner import Runner
    from hardening.suites import get_suite

    case = next(c for c in get_suite("compile") if c.id == "C-01")
    with Runner(load_profile("cpu", {"world.launcher": "torchrun"}), run_dir=tmp_path, progress=lambda line: None) as runner:
        first, second = runner.run_case(case), runner.run_case(case)
    assert first.verdict is Verdict.PASS and second.verdict is Verdict.PASS, second.reason
    assert {r.pid for r in first.ranks}.isdisjoint(r.pid for r in second.ranks)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_users_own_program_under_torchrun_is_fault_tested_like_under_the_runner(tmp_path: Path) -> None:
    # Every rank has its own reaper (its HARDENING_PARENT_PID): that is per rank, not drift.
    marker = new_marker()
    program = str(Path(__file__).resolve().parent.parent / "examples" / "own_loop.py")
    code, text = _finish(
        _suite(marker, "operator", "--program", program, "--launcher", "torchrun", "--only", "OM-00,OM-13", "--json", "r.json",
               cwd=tmp_path),
        timeout=220,
    )  # fmt: skip
    assert code == 0, text
    cases = json.loads((tmp_path / "r.json").read_text())["cases"]
    assert [(c["id"], c["verdict"]) for c in cases] == [("OM-00", "pass"), ("OM-13", "pass")]
    assert not left_behind(marker)
