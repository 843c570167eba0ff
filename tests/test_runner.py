"""End to end: the runner on real rank processes, real gloo, real signals.

Each test runs the ``hardening`` command as a user would, reads the JSON report, and
checks that no process outlives the run. Every subprocess is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hardening.harness.profile import load_profile
from hardening.harness.triage import ptrace_problem
from hardening.suites import get_suite

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def hardening(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "hardening", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    # Shown by pytest when the test fails: the table and the progress lines say which case and why.
    print(out.stdout)
    print(out.stderr, file=sys.stderr)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    end = time.time() + timeout
    while time.time() < end and any(alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


def rank_pids(report: dict) -> set[int]:
    return {r["pid"] for case in report["cases"] for r in case["ranks"] if r["pid"]}


@pytest.mark.timeout(300)
def test_compile_suite_end_to_end(tmp_path: Path) -> None:
    out = hardening(
        "suite", "compile", "--ranks", "2", "--json", "r.json", "--junit", "r.xml", "--artifacts", "run", cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    cases = {c["id"]: c for c in report["cases"]}
    assert set(cases) == {c.id for c in get_suite("compile")}

    control = cases["C-00"]
    assert (control["outcome"], control["verdict"]) == ("completed", "pass")
    for rank in control["ranks"]:
        assert rank["exit_code"] == 0
        assert rank["counters"]["graph_breaks"] == 0
        assert rank["counters"]["recompiles"] == 0
        assert rank["counters"]["graphs"] >= 1  # something was really compiled

    expected = {
        "C-01": ["ParityError", "ParityError"],
        "C-02": ["CompileGateError", "CompileGateError"],
        "C-03": ["PeerError", "CompileGateError"],
        "C-04": ["ParityError", "ParityError"],
        "C-05": ["CompileGateError", "CompileGateError"],
        "W-01": ["WarmupError", "WarmupError"],
    }
    for case_id, errors in expected.items():
        case = cases[case_id]
        assert (case["outcome"], case["verdict"]) == ("crashed", "pass"), case
        assert [r["error_class"] for r in case["ranks"]] == errors
        assert case["t_detect"] is not None and case["t_detect"] <= case["budget_s"]
    assert "compile.enabled" in cases["C-01"]["ranks"][0]["message"]
    assert "sdpa" in cases["C-04"]["ranks"][1]["message"]
    assert "graph_break" in cases["C-02"]["ranks"][0]["message"]
    assert "stride" in cases["C-03"]["ranks"][1]["message"]
    assert cases["C-03"]["root_cause_rank"] == 1
    # The rank-conditional collective is named from the graphs, the same words on both ranks.
    assert cases["C-05"]["ranks"][0]["message"] == cases["C-05"]["ranks"][1]["message"]
    assert "collectives differ across ranks in call 0" in cases["C-05"]["ranks"][0]["message"]
    # The recompile the guard stopped is counted on the rank that made it, not on its peer.
    assert [r["counters"]["recompiles"] for r in cases["C-03"]["ranks"]] == [0, 1]
    assert "stride" in cases["C-03"]["ranks"][1]["counters"]["recompile_reasons"][0]

    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == str(len(get_suite("compile"))) and suite.get("failures") == "0"
    assert "C-01" in out.stdout and "PASS" in out.stdout  # the table is always printed
    assert not wait_gone(rank_pids(report), 5)


@pytest.mark.timeout(180)
def test_user_target_with_graph_break_fails_the_gate(tmp_path: Path) -> None:
    target = f"{EXAMPLES / 'break_region.py'}:build"
    out = hardening("suite", "compile", "--only", "C-00", "--target", target, "--json", "r.json", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    case = json.loads((tmp_path / "r.json").read_text())["cases"][0]
    assert (case["outcome"], case["verdict"]) == ("crashed", "fail")
    assert "Tensor.item()" in case["reason"] and "break_region.py" in case["reason"]
    for rank in case["ranks"]:
        assert rank["error_class"] == "CompileGateError"
        assert any("Tensor.item()" in r for r in rank["counters"]["break_reasons"])
    assert "Tensor.item()" in out.stdout


def _hang_profile(tmp_path: Path, case_s: float) -> Path:
    profile = tmp_path / "hang.yaml"
    text = (EXAMPLES / "no_watchdog.yaml").read_text().replace("case: 20", f"case: {case_s:g}")
    profile.write_text(text)
    return profile


@pytest.mark.timeout(180)
def test_hung_rank_is_reported_hung_with_stacks_of_every_rank(tmp_path: Path) -> None:
    problem = ptrace_problem()
    if problem:
        pytest.skip(f"py-spy cannot attach here: {problem}")
    target = f"{EXAMPLES / 'hang_region.py'}:build"
    profile = _hang_profile(tmp_path, 10)
    out = hardening(
        "suite", "compile", "--only", "C-00", "--target", target, "--profile", str(profile),
        "--json", "r.json", "--artifacts", "run", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    case = report["cases"][0]
    assert (case["outcome"], case["verdict"]) == ("hung", "fail")
    stacks = {}
    for rank in case["ranks"]:
        assert rank["exit_code"] is None  # alive at the deadline
        stacks[rank["rank"]] = Path(rank["stacks_path"]).read_text()
        assert "Thread" in stacks[rank["rank"]]
    assert "hang_region.py" in stacks[0] and "envelope.py" in stacks[1]
    where = {r["rank"]: r["where"] for r in case["ranks"]}
    assert "wait_for_a_message_that_never_comes" in where[0]  # the leader, making inputs
    assert "receive" in where[1]  # the follower, waiting for the envelope
    assert (tmp_path / "run" / "C-00" / "stacks_summary.txt").is_file()
    assert not wait_gone(rank_pids(report), 5), "a rank outlived the run"


def _start_hang_run(tmp_path: Path) -> subprocess.Popen[str]:
    target = f"{EXAMPLES / 'hang_region.py'}:build"
    profile = _hang_profile(tmp_path, 120)
    return subprocess.Popen(
        [sys.executable, "-m", "hardening", "suite", "compile", "--only", "C-00", "--target", target,
         "--profile", str(profile), "--json", "r.json", "--artifacts", "run"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_ranks(proc: subprocess.Popen[str], tmp_path: Path, timeout: float = 60) -> set[int]:
    """Wait until both ranks are stuck in the steady state (rank 1 stalls at its first steady call)."""
    end = time.time() + timeout
    while time.time() < end:
        ranks = {p for p in descendants(proc.pid) if "forkserver" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")}
        logs = [tmp_path / "run" / "C-00" / f"rank{r}" / "stdout.log" for r in (0, 1)]
        if len(ranks) >= 3 and all(log.exists() for log in logs):
            time.sleep(4)  # past warmup: both ranks are now inside the stalled step
            return descendants(proc.pid)
        time.sleep(0.2)
    raise AssertionError("ranks did not start")


@pytest.mark.timeout(180)
def test_ctrl_c_kills_ranks_and_writes_partial_report(tmp_path: Path) -> None:
    proc = _start_hang_run(tmp_path)
    try:
        tree = _wait_for_ranks(proc, tmp_path)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2, stdout + stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted"] is True
    assert report["cases"][0]["outcome"] == "interrupted"
    assert "INTERRUPTED" in stdout
    assert not wait_gone(tree, 10), "processes outlived an interrupted run"


@pytest.mark.timeout(180)
def test_killed_runner_leaves_no_process_behind(tmp_path: Path) -> None:
    proc = _start_hang_run(tmp_path)
    try:
        tree = _wait_for_ranks(proc, tmp_path)
        assert len(tree) >= 3  # fork server + 2 ranks
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert not wait_gone(tree, 15), "ranks or the fork server outlived a SIGKILLed runner"


@pytest.mark.timeout(300)
def test_operator_suite_end_to_end(tmp_path: Path) -> None:
    out = hardening("suite", "operator", "--ranks", "2", "--json", "r.json", "--artifacts", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    cases = {c["id"]: c for c in report["cases"]}
    assert cases["OM-00"]["outcome"] == "completed"
    expected = {
        "OM-01": ["PreflightError", "PeerError"],
        "OM-02": ["PreflightError", "PeerError"],
        "OM-03": ["PreflightError", "PeerError"],
        "OM-04": ["ParityError", "ParityError"],
        "OM-05": ["ParityError", "ParityError"],
        "OM-06": ["ContractError", "PeerError"],
        "OM-10": ["PreflightError", "PeerError"],
        "OM-11": ["PeerError", "DriftError"],
        "OM-12": ["DriftError", "DriftError"],
        "OM-13": ["SIGKILL", "PeerLost"],
        "K-01": ["PeerError", "LifecycleError"],
    }
    for case_id, errors in expected.items():
        case = cases[case_id]
        assert (case["outcome"], case["verdict"]) == ("crashed", "pass"), case
        assert [r["error_class"] for r in case["ranks"]] == errors, case_id
    # Preflight, parity and drift: well under a second.
    for case_id in ("OM-01", "OM-02", "OM-03", "OM-04", "OM-05", "OM-06", "OM-10", "OM-11", "OM-12", "K-01"):
        assert cases[case_id]["t_detect"] < 1.0, (case_id, cases[case_id]["t_detect"])
    stall = cases["H-01"]
    assert (stall["outcome"], stall["verdict"]) == ("hung", "pass")
    frozen = stall["ranks"][1]
    assert frozen["exit_code"] is None and "StallRank" in Path(frozen["stacks_path"]).read_text()
    assert stall["ranks"][0]["error_class"] == "PeerLost"
    assert stall["t_detect"] <= stall["budget_s"]
    assert not wait_gone(rank_pids(report), 5)


def _leader_pid(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, int]:
    """Pids of rank 0 and rank 1 once both run (children of the fork server, in rank order)."""
    end = time.time() + timeout
    while time.time() < end:
        servers = [p for p in descendants(proc.pid) if "forkserver" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        ranks = sorted(p for p in servers if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] != str(proc.pid))
        if len(ranks) == 2:
            return ranks[0], ranks[1]
        time.sleep(0.1)
    raise AssertionError("ranks did not start")


def _signal_mid_run(tmp_path: Path, rank: int, sig: signal.Signals) -> tuple[list[dict], float, set[int]]:
    """Send ``sig`` to one rank of a long OM-00 run well into its steady-state loop, as an
    operator would; the ranks' ends from the report, when the signal went, both pids."""
    profile = tmp_path / "long.yaml"
    profile.write_text("steps: 100000\ntimeouts: {case: 120}\n")  # runs until someone signals it
    proc = subprocess.Popen(
        [sys.executable, "-m", "hardening", "suite", "operator", "--only", "OM-00", "--profile", str(profile),
         "--json", "r.json", "--artifacts", "run"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pids = _leader_pid(proc)
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "run" / "OM-00" / "rank1" / "stdout.log").exists():
            time.sleep(0.1)
        time.sleep(3)  # well into the steady-state loop
        sent_at = time.time()
        os.kill(pids[rank], sig)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    return json.loads((tmp_path / "r.json").read_text())["cases"][0]["ranks"], sent_at, set(pids)


@pytest.mark.timeout(180)
def test_kill_minus_9_of_rank_0_by_hand_makes_workers_exit_peer_lost(tmp_path: Path) -> None:
    """The OM-13 promise without the fault: an operator's kill -9 of the leader mid-run."""
    ranks, killed_at, pids = _signal_mid_run(tmp_path, 0, signal.SIGKILL)
    assert ranks[0]["signal"] == "SIGKILL"
    assert ranks[1]["error_class"] == "PeerLost", ranks[1]
    assert "rank 0" in ranks[1]["message"]
    assert ranks[1]["exited_at"] - killed_at < 1.0  # the runner reaps it and tells the store at once
    assert not wait_gone(pids, 5)


@pytest.mark.timeout(180)
def test_sigterm_of_a_rank_by_hand_is_named_terminated_and_its_peer_follows(tmp_path: Path) -> None:
    """An operator's (or torchrun's agent's) SIGTERM is a named end with a record, not a
    signal death: the watchdog sees it even while the main thread is blocked in gloo."""
    ranks, _, pids = _signal_mid_run(tmp_path, 1, signal.SIGTERM)
    assert ranks[1]["error_class"] == "Terminated" and ranks[1]["exit_code"] == 32, ranks[1]
    assert "received SIGTERM in phase steady" in ranks[1]["message"]
    assert ranks[0]["error_class"] == "PeerError" and ranks[0]["root_cause_rank"] == 1, ranks[0]
    assert not wait_gone(pids, 5)


@pytest.mark.timeout(240)
def test_stock_baseline_runs_and_lets_drift_through(tmp_path: Path) -> None:
    # The benchmarks' baseline (`hardened: false`) runs on a fresh install (its object
    # header needs no numpy), and with the runtime off a mutated input goes unnoticed: the
    # case survives the fault, which fails its expectation, so the suite exits FAILED.
    (tmp_path / "stock.yaml").write_text("hardened: false\n")
    out = hardening(
        "suite", "operator", "--profile", "stock.yaml", "--only", "OM-00,OM-11", "--json", "r.json",
        "--artifacts", "run", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text())
    cases = {c["id"]: c for c in report["cases"]}
    assert cases["OM-00"]["outcome"] == "completed" and cases["OM-00"]["verdict"] == "pass"
    assert cases["OM-11"]["outcome"] == "survived" and cases["OM-11"]["verdict"] == "fail"
    assert all(r["fired_at"] for r in cases["OM-11"]["ranks"] if r["rank"] == 1)  # the fault did act
    assert out.returncode == 1, out.stdout + out.stderr
    assert not wait_gone(rank_pids(report), 5)


@pytest.mark.timeout(240)
def test_torch_trace_flag_leaves_a_tlparse_directory_per_rank(tmp_path: Path) -> None:
    # --torch-trace: each rank's structured compile trace lands in its case directory,
    # and the one that recompiled (C-03, rank 1) shows the recompile (compile id 0/1).
    out = hardening(
        "suite", "compile", "--only", "C-03", "--torch-trace", "--json", "r.json", "--artifacts", "run", cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    (case,) = report["cases"]
    for r in case["ranks"]:
        trace_dir = Path(r["artifacts"]["torch_trace"])
        assert trace_dir == tmp_path / "run" / "C-03" / f"rank{r['rank']}" / "torch_trace"
        logs = list(trace_dir.glob("*.log"))
        assert len(logs) == 1, logs
        text = logs[0].read_text()
        assert '"compile_id": "0/0"' in text
        assert ('"compile_id": "0/1"' in text) == (r["rank"] == 1)


@pytest.mark.timeout(240)
def test_dead_and_frozen_ranks_on_four_ranks_name_the_lost_rank_everywhere(tmp_path: Path) -> None:
    # Beyond 2 ranks only one survivor notices a lost peer first; every other survivor
    # must still end PeerLost naming the lost rank (not PeerError naming the observer).
    out = hardening(
        "suite", "operator", "--ranks", "4", "--only", "OM-13,H-01", "--json", "r.json", "--artifacts", "run", cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    cases = {c["id"]: c for c in report["cases"]}
    for case_id, lost in (("OM-13", 0), ("H-01", 1)):
        case = cases[case_id]
        survivors = [r for r in case["ranks"] if r["rank"] != lost]
        assert [r["error_class"] for r in survivors] == ["PeerLost"] * 3, case
        assert all(r["root_cause_rank"] == lost for r in survivors), case
        assert case["root_cause_rank"] == lost
        assert case["t_detect"] <= 1.0, case  # a frozen rank too: its launcher reads /proc, not a heartbeat
    assert "stopped (state T" in cases["H-01"]["ranks"][0]["message"]
    assert not wait_gone(rank_pids(report), 5)


@pytest.mark.timeout(120)
def test_a_stop_as_a_case_launches_tears_down_the_ranks_whose_spawn_is_not_reported_yet(tmp_path: Path) -> None:
    # A stop that lands between the spawn requests and the fork server's "spawned" events
    # (a CI flake: C-04's rank 1 ended "SIGKILL", not torn_down). _launch only writes the
    # requests; nothing has read the events when the teardown starts, so it begins with no
    # rank known, and must wait for them, signal them and count them as its own doing.
    from hardening.harness.results import TORN_DOWN
    from hardening.harness.runner import Runner, _Live

    case = get_suite("compile")[0]
    assert case.fault is None  # the control: it would run all 100000 steps unless stopped
    profile = load_profile("cpu", {"steps": 100000, "timeouts.case": 60})
    with Runner(profile, run_dir=tmp_path, progress=lambda line: None) as runner:
        live = _Live(case=case, prefix="case1-stop", case_dir=tmp_path / case.id, launched=time.time())
        runner._launch(live)
        assert not live.pids
        runner._teardown(live, reason="interrupted (SIGTERM)")
        ranks = runner._collect(live)
    assert sorted(live.pids) == [0, 1] and sorted(live.exits) == [0, 1]
    assert [(r.error_class, r.signal) for r in ranks] == [(TORN_DOWN, None)] * 2, ranks
    assert not wait_gone(set(live.pids.values()), 5)


@pytest.mark.timeout(240)
def test_one_rank_runs_the_cases_that_need_no_peer(tmp_path: Path) -> None:
    # What a one-GPU machine can run of the daily regression (profiles/gpu1-nccl.yaml):
    # the controls, a break on every rank, the leader's own preflight; the rest is said.
    out = hardening("suite", "all", "--ranks", "1", "--json", "r.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cases = json.loads((tmp_path / "r.json").read_text())["cases"]
    one = [c.id for c in get_suite("all") if c.min_ranks == 1]
    assert [c["id"] for c in cases] == one and len(one) >= 6
    assert all(c["verdict"] == "pass" and len(c["ranks"]) == 1 for c in cases), [(c["id"], c["verdict"]) for c in cases]
    assert all(c["ranks"][0]["fired_at"] for c in cases if c["fault"]), "a fault that never fired proves nothing"
    assert "skipping case(s) that need more than 1 rank(s): C-01 (needs 2)" in out.stderr
