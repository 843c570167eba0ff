"""Liveness seen from outside the ranks, on real processes and real signals: the
observer reads /proc, vouches for what runs and reports what is frozen; a peer that holds
the GIL (mid-call, or in warmup past the setup budget) is busy, never lost; a frozen one
is named within a second."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hardening.harness.cases import Case, completes
from hardening.harness.liveness import Observer, proc_state
from hardening.harness.profile import load_profile
from hardening.harness.results import Outcome, Verdict
from hardening.harness.runner import Runner, loopback_store
from hardening.runtime import store as store_keys

pytestmark = [pytest.mark.multiproc]


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.timeout(30)
def test_proc_state_tells_running_stopped_and_gone() -> None:
    child = _sleeper()
    try:
        assert proc_state(child.pid) in ("S", "R")
        os.kill(child.pid, signal.SIGSTOP)
        assert _until(lambda: proc_state(child.pid) == "T", 5)
        os.kill(child.pid, signal.SIGCONT)
        assert _until(lambda: proc_state(child.pid) in ("S", "R"), 5)
    finally:
        child.kill()
        child.wait(10)
    assert proc_state(child.pid) is None


@pytest.mark.timeout(60)
def test_observer_vouches_for_running_ranks_and_reports_a_stopped_one_within_a_beat() -> None:
    import torch.distributed as dist

    master = loopback_store(10)
    store = dist.PrefixStore("case", store_keys.connect("127.0.0.1", master.port, timeout_s=10))
    view = dist.PrefixStore("case", master)
    children = [_sleeper(), _sleeper()]
    observer = Observer(node=3, host="here")
    observer.start()
    try:
        observer.watch(store)
        for rank, child in enumerate(children):
            observer.add(rank, child.pid)
        alive = [store_keys.key("alive", r) for r in (0, 1)]
        assert _until(lambda: view.check(alive), 5)
        first = json.loads(view.get(alive[1]))
        assert first["node"] == 3 and first["host"] == "here" and first["state"] in ("S", "R")
        assert _until(lambda: json.loads(view.get(alive[1]))["seq"] > first["seq"], 2), "the vouch must change every beat"

        stopped_at = time.monotonic()
        os.kill(children[1].pid, signal.SIGSTOP)
        exit_key = store_keys.key("exit", 1)
        assert _until(lambda: view.check([exit_key]), 2)
        took = time.monotonic() - stopped_at
        report = json.loads(view.get(exit_key))
        assert report["stopped"] is True and report["exit_code"] is None and "SIGSTOP" in report["how"]
        assert took < 0.5, f"reported {took:.2f}s after SIGSTOP"
        assert store_keys.describe_lost(1, report).startswith("rank 1 lost: its launcher sees its process stopped")
        # The frozen rank is no longer vouched for; the running one still is.
        frozen, running = json.loads(view.get(alive[1]))["seq"], json.loads(view.get(alive[0]))["seq"]
        assert _until(lambda: json.loads(view.get(alive[0]))["seq"] > running + 2, 2)
        assert json.loads(view.get(alive[1]))["seq"] == frozen
        assert not view.check([store_keys.key("exit", 0)])
        assert observer.reported() == {1: report["how"]}
    finally:
        observer.close()
        for child in children:
            child.kill()
            child.wait(10)


def _run(overrides: dict, case: Case, tmp_path: Path):
    profile = load_profile("cpu", overrides)
    with Runner(profile, run_dir=tmp_path, progress=lambda line: None) as runner:
        return runner.run_case(case)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_peer_holding_the_gil_for_20s_mid_call_is_busy_not_lost(tmp_path: Path) -> None:
    # Its watchdog cannot beat for 20 s, past peer_lost (3 s); its launcher still sees
    # the process run. The call deadline is raised past the hold: that is the bound for a
    # live but stuck call, and this call is meant to be slow, not stuck (the runner's own
    # `detect` bound, from the fault firing to the end of the case, too).
    case = Case(id="T-GIL", title="GIL held 20 s mid-call", suite="test", fault="hold_gil:rank=1:seconds=20", expect=completes())
    result = _run({"timeouts.call_deadline": 40, "timeouts.detect": 60}, case, tmp_path)
    assert result.outcome is Outcome.SURVIVED and result.verdict is Verdict.PASS, result.reason
    assert result.ranks[1].fired_at is not None, "the fault never fired: this run proves nothing"
    assert result.wall_s > 20


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_peer_silent_in_warmup_past_the_setup_budget_is_busy_not_lost(tmp_path: Path) -> None:
    # A first compile (or a cold import) that holds the GIL longer than `setup`: before
    # liveness came from outside the rank, its peers called it lost at `setup` (10 s here,
    # as 60 s is on the CPU profile); a minute-long compile on a real model is the same.
    case = Case(id="T-WARM", title="GIL held 15 s in warmup", suite="test", fault="hold_gil:rank=1:call=0:seconds=15", expect=completes())
    result = _run({"timeouts.setup": 10, "timeouts.call_deadline": 30, "timeouts.detect": 60}, case, tmp_path)
    assert result.outcome is Outcome.SURVIVED and result.verdict is Verdict.PASS, result.reason
    assert result.ranks[1].fired_at is not None
    assert result.wall_s > 15
