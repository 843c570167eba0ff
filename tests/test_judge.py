"""classify() and judge() on recorded rank ends: no processes, no clocks."""

from __future__ import annotations

import pytest

from hardening.harness.cases import Case, crashes
from hardening.harness.judge import classify, fire_time, judge, root_cause_rank
from hardening.harness.results import Outcome, RankResult, Verdict
from hardening.suites import get_suite
from rank_ends import PARITY_MSG, T0, crashed, ok

CASES = {c.id: c for c in get_suite("compile")}
def _hung(rank: int, *, fired: float | None = None) -> RankResult:
    return RankResult(rank=rank, pid=1000 + rank, exit_code=None, started_at=T0, fired_at=fired,
                      phase="warmup", where="all_reduce (distributed_c10d.py:2501)")


def _run(case: Case, ranks: list[RankResult], **kw) -> tuple[Outcome, float | None, Verdict, str]:
    outcome, t_detect = classify(case, ranks, **kw)
    verdict, reason = judge(case.expect, outcome, ranks)
    return outcome, t_detect, verdict, reason




# -- control ----------------------------------------------------------------------------


def test_control_completed_passes() -> None:
    outcome, t_detect, verdict, reason = _run(CASES["C-00"], [ok(0), ok(1)])
    assert (outcome, verdict, reason, t_detect) == (Outcome.COMPLETED, Verdict.PASS, "", None)


def test_control_crashed_fails_naming_the_first_failing_rank() -> None:
    ranks = [
        crashed(0, "PeerError", "rank 1 failed first: CompileGateError", exited=T0 + 4.0, code=29, root=1),
        crashed(1, "CompileGateError", "compile gate failed after warmup: rank 1: 2 graph breaks\nmore",
                 exited=T0 + 3.5, code=25),
    ]
    outcome, _, verdict, reason = _run(CASES["C-00"], ranks)
    assert outcome is Outcome.CRASHED and verdict is Verdict.FAIL
    assert reason.startswith("rank 1: CompileGateError")
    assert "2 graph breaks" in reason and "more" not in reason  # first line of the message only


def test_control_killed_by_signal_names_the_signal() -> None:
    rank1 = RankResult(rank=1, exit_code=-9, signal="SIGKILL", exited_at=T0 + 1.0)
    outcome, _, verdict, reason = _run(CASES["C-00"], [ok(0), rank1])
    assert outcome is Outcome.CRASHED and verdict is Verdict.FAIL
    assert reason == "rank 1: signal SIGKILL"


def test_control_hung_fails() -> None:
    outcome, _, verdict, reason = _run(CASES["C-00"], [ok(0), _hung(1)])
    assert outcome is Outcome.HUNG and verdict is Verdict.FAIL and "hung" in reason


# -- fault cases: pass --------------------------------------------------------------------


def test_fault_crashed_within_budget_with_expected_classes_passes() -> None:
    fired = T0 + 2.0
    ranks = [
        crashed(0, "ParityError", PARITY_MSG, exited=fired + 0.4),
        crashed(1, "ParityError", PARITY_MSG, exited=fired + 0.5, fired=fired),
    ]
    outcome, t_detect, verdict, reason = _run(CASES["C-01"], ranks)
    assert outcome is Outcome.CRASHED
    assert t_detect == pytest.approx(0.5)
    assert (verdict, reason) == (Verdict.PASS, "")


def test_per_rank_expectations_pass_for_c03() -> None:
    fired = T0 + 6.0
    ranks = [
        crashed(0, "PeerError", "rank 1 failed first: CompileGateError: rank 1 recompiled", exited=fired + 0.9,
                 code=29, root=1, phase="steady"),
        crashed(1, "CompileGateError", "rank 1 recompiled at call 3, after warmup: stride mismatch at index 0",
                 exited=fired + 0.2, fired=fired, code=25, phase="steady"),
    ]
    outcome, t_detect, verdict, reason = _run(CASES["C-03"], ranks)
    assert outcome is Outcome.CRASHED and t_detect == pytest.approx(0.9)
    assert verdict is Verdict.PASS, reason


# -- fault cases: fail --------------------------------------------------------------------


def test_follower_naming_another_root_cause_fails_c03() -> None:
    # first_fails(1, ...): the followers must name rank 1 as the rank that failed first.
    fired = T0 + 6.0
    ranks = [
        crashed(0, "PeerError", "rank 2 failed first: CompileGateError: rank 2 recompiled", exited=fired + 0.9,
                 code=29, root=2, phase="steady"),
        crashed(1, "CompileGateError", "rank 1 recompiled at call 3, after warmup: stride mismatch at index 0",
                 exited=fired + 0.2, fired=fired, code=25, phase="steady"),
    ]
    outcome, _, verdict, reason = _run(CASES["C-03"], ranks)
    assert outcome is Outcome.CRASHED and verdict is Verdict.FAIL
    assert reason.startswith("rank 0: PeerError message does not name"), reason


def test_wrong_class_on_one_rank_fails_naming_the_rank() -> None:
    fired = T0 + 2.0
    ranks = [
        crashed(0, "ParityError", PARITY_MSG, exited=fired + 0.4),
        crashed(1, "CompileGateError", "compile gate failed", exited=fired + 0.5, fired=fired, code=25),
    ]
    outcome, _, verdict, reason = _run(CASES["C-01"], ranks)
    assert outcome is Outcome.CRASHED and verdict is Verdict.FAIL
    assert reason == "rank 1: expected ParityError, got CompileGateError"
    assert "rank 0" not in reason


def test_message_not_matching_the_pattern_fails() -> None:
    fired = T0 + 2.0
    ranks = [
        crashed(0, "ParityError", "ranks disagree on 1 fingerprint key(s): torch.version", exited=fired + 0.4),
        crashed(1, "ParityError", "ranks disagree on 1 fingerprint key(s): torch.version", exited=fired + 0.5,
                 fired=fired),
    ]
    outcome, _, verdict, reason = _run(CASES["C-01"], ranks)
    assert outcome is Outcome.CRASHED and verdict is Verdict.FAIL
    assert "rank 0: ParityError message does not name /compile\\.enabled/" in reason
    assert "rank 1:" in reason


def test_clean_exit_where_a_crash_was_expected_on_one_rank() -> None:
    fired = T0 + 2.0
    ranks = [ok(0, exited=fired + 0.1), crashed(1, "ParityError", PARITY_MSG, exited=fired + 0.2, fired=fired)]
    outcome, _, verdict, reason = _run(CASES["C-01"], ranks)
    assert outcome is Outcome.CRASHED and verdict is Verdict.FAIL
    assert reason == "rank 0: expected ParityError, got a clean exit"


def test_crashed_after_the_budget_is_crashed_slow_and_fails() -> None:
    fired = T0 + 2.0
    budget = CASES["W-01"].expect.budget_s
    msg = "ranks plan different numbers of warmup calls:\n  rank 0: plans 2 warmup call(s)\n  rank 1: plans 1 warmup call(s)"
    ranks = [
        crashed(0, "WarmupError", msg, exited=fired + 0.1, code=26),
        crashed(1, "WarmupError", msg, exited=fired + budget + 1.5, fired=fired, code=26),
    ]
    outcome, t_detect, verdict, reason = _run(CASES["W-01"], ranks)
    assert outcome is Outcome.CRASHED_SLOW
    assert t_detect == pytest.approx(budget + 1.5)
    assert verdict is Verdict.FAIL and f"{budget:g}s detection budget" in reason


def test_exactly_on_budget_is_not_slow() -> None:
    fired = T0 + 2.0
    budget = CASES["C-01"].expect.budget_s
    ranks = [
        crashed(0, "ParityError", PARITY_MSG, exited=fired + budget),
        crashed(1, "ParityError", PARITY_MSG, exited=fired + 0.1, fired=fired),
    ]
    outcome, t_detect, verdict, _ = _run(CASES["C-01"], ranks)
    assert outcome is Outcome.CRASHED and t_detect == pytest.approx(budget) and verdict is Verdict.PASS


def test_hung_fails_naming_the_alive_ranks() -> None:
    fired = T0 + 2.0
    ranks = [_hung(0), crashed(1, "WarmupError", "plans 1", exited=fired + 0.1, fired=fired, code=26), _hung(2)]
    outcome, t_detect, verdict, reason = _run(CASES["W-01"], ranks)
    # Measured over the ranks that did end: a case may expect the others to stay frozen (H-01).
    assert outcome is Outcome.HUNG and t_detect == pytest.approx(0.1, abs=1e-3)
    assert verdict is Verdict.FAIL
    assert reason == "rank(s) 0,2 still alive at the deadline"


def test_expected_frozen_rank_passes_only_with_its_stacks() -> None:
    from hardening.suites import get_suite

    h01 = next(c for c in get_suite("operator") if c.id == "H-01")
    fired = T0 + 2.0
    lost = "rank 1 lost: its launcher sees its process stopped (state T: SIGSTOP or SIGTSTP)"
    peer = crashed(0, "PeerLost", lost, exited=fired + 0.2, fired=None, code=27)
    frozen = _hung(1)
    frozen.fired_at = fired
    outcome, t_detect, verdict, reason = _run(h01, [peer, frozen])
    assert outcome is Outcome.HUNG and t_detect == pytest.approx(0.2, abs=1e-3)
    assert verdict is Verdict.FAIL and "no stacks" in reason
    frozen.stacks_path = "/run/H-01/rank1.stacks.txt"
    _, _, verdict, reason = _run(h01, [peer, frozen])
    assert verdict is Verdict.PASS, reason


def test_t_detect_counts_from_the_last_ranks_start_when_the_fault_fired_before_it() -> None:
    # Under torchrun each rank imports torch on its own: rank 1's parity fault fired while
    # rank 0 did not exist yet; nobody can notice before both are there.
    fired = T0 + 1.0
    late = crashed(0, "ParityError", PARITY_MSG, exited=T0 + 2.6, code=20)
    late.started_at = T0 + 2.5
    early = crashed(1, "ParityError", PARITY_MSG, exited=T0 + 2.6, fired=fired, code=20)
    outcome, t_detect = classify(next(c for c in get_suite("operator") if c.id == "OM-04"), [late, early])
    assert outcome is Outcome.CRASHED and t_detect == pytest.approx(0.1, abs=1e-3)


def test_survived_fails() -> None:
    fired = T0 + 2.0
    ranks = [ok(0), ok(1, fired=fired)]
    outcome, t_detect, verdict, reason = _run(CASES["C-04"], ranks)
    assert outcome is Outcome.SURVIVED and t_detect is None
    assert verdict is Verdict.FAIL and "every rank exited 0" in reason


# -- fault cases: unknown ----------------------------------------------------------------


def test_not_fired_is_unknown() -> None:
    outcome, _, verdict, reason = _run(CASES["C-01"], [ok(0), ok(1)])
    assert outcome is Outcome.NOT_FIRED and verdict is Verdict.UNKNOWN and "never fired" in reason


def test_crash_without_any_fire_is_early_crash() -> None:
    ranks = [ok(0), crashed(1, "Exception", "ImportError: no module", exited=T0 + 1.0, code=10, phase="init")]
    outcome, _, verdict, reason = _run(CASES["C-01"], ranks)
    assert outcome is Outcome.EARLY_CRASH and verdict is Verdict.UNKNOWN
    assert "rank 1: Exception: ImportError" in reason


def test_rank_dying_before_fired_at_is_early_crash() -> None:
    fired = T0 + 3.0
    ranks = [
        crashed(0, "Exception", "segfault-ish", exited=fired - 1.0, code=10, phase="init"),
        crashed(1, "ParityError", PARITY_MSG, exited=fired + 0.2, fired=fired),
    ]
    outcome, t_detect, verdict, reason = _run(CASES["C-01"], ranks)
    assert outcome is Outcome.EARLY_CRASH and t_detect is None
    assert verdict is Verdict.UNKNOWN and "before the fault fired" in reason and "rank 0" in reason


@pytest.mark.parametrize("kw, outcome", [({"harness_error": "fork server died"}, Outcome.HARNESS_ERROR),
                                          ({"interrupted": True}, Outcome.INTERRUPTED)])
def test_harness_error_and_interrupted_are_unknown(kw: dict, outcome: Outcome) -> None:
    fired = T0 + 2.0
    # Whatever the ranks did, these outcomes win and are never a pass or a fail.
    ranks = [crashed(0, "ParityError", PARITY_MSG, exited=fired + 0.1),
             crashed(1, "ParityError", PARITY_MSG, exited=fired + 0.2, fired=fired)]
    got, t_detect, verdict, reason = _run(CASES["C-01"], ranks, **kw)
    assert got is outcome and t_detect is None
    assert verdict is Verdict.UNKNOWN and outcome.value in reason
    got, _, verdict, _ = _run(CASES["C-00"], [ok(0), ok(1)], **kw)
    assert got is outcome and verdict is Verdict.UNKNOWN


# -- timing and root cause -----------------------------------------------------------------


def test_t_detect_is_last_exit_minus_earliest_fire() -> None:
    case = Case(id="X-01", title="t", suite="t", fault="compile_one_rank:rank=all",
                expect=crashes("ParityError", within_s=10))
    ranks = [
        crashed(0, "ParityError", "", exited=T0 + 12.25, fired=T0 + 10.5),
        crashed(1, "ParityError", "", exited=T0 + 11.0, fired=T0 + 10.0),
        crashed(2, "ParityError", "", exited=T0 + 13.0),
    ]
    assert fire_time(ranks) == T0 + 10.0
    outcome, t_detect = classify(case, ranks)
    assert outcome is Outcome.CRASHED and t_detect == pytest.approx(3.0)


def test_root_cause_prefers_the_first_own_failure_over_peer_followers() -> None:
    ranks = [
        crashed(0, "PeerError", "rank 2 failed first", exited=T0 + 1.0, code=29, root=2),
        crashed(1, "DriftError", "checksum", exited=T0 + 2.0, code=23),
        crashed(2, "CompileGateError", "recompiled", exited=T0 + 1.5, code=25),
        ok(3),
    ]
    assert root_cause_rank(ranks) == 2


def test_root_cause_from_followers_when_only_peers_failed() -> None:
    ranks = [
        crashed(0, "PeerError", "rank 1 failed first", exited=T0 + 1.0, code=29, root=1),
        _hung(1),
    ]
    assert root_cause_rank(ranks) == 1
    assert root_cause_rank([ok(0), ok(1)]) is None


def test_root_cause_of_a_lost_peer_is_the_lost_rank_not_its_observers() -> None:
    # H-01 on 3 ranks: rank 1 frozen; rank 2 noticed first, rank 0 followed its abort.
    ranks = [
        crashed(0, "PeerLost", "rank 1 lost (noticed first by rank 2)", exited=T0 + 3.3, code=27, root=1),
        _hung(1),
        crashed(2, "PeerLost", "rank 1 lost: no heartbeat for 3.0s", exited=T0 + 3.1, code=27, root=1),
    ]
    assert root_cause_rank(ranks) == 1


def test_no_root_cause_when_every_rank_reached_the_same_verdict() -> None:
    # A gate decided on gathered counters: the same error on every rank, in arbitrary order.
    same = "compile gate failed after warmup: rank 0: 1 graph break(s) > max 0"
    ranks = [
        crashed(0, "CompileGateError", same, exited=T0 + 1.2, code=25),
        crashed(1, "CompileGateError", same, exited=T0 + 1.1, code=25),
    ]
    assert root_cause_rank(ranks) is None
    # Different messages (each rank names its own problem): the first one still counts.
    ranks[0].message = "compile gate failed after warmup: rank 0: 2 graph break(s) > max 0"
    assert root_cause_rank(ranks) == 1


# -- JSON shape -----------------------------------------------------------------------------


def test_exit_0_without_a_final_record_is_not_a_completion() -> None:
    quitter = RankResult(rank=1, pid=1001, exit_code=0, exited_at=T0 + 1, has_record=False, error_class="no_final_record",
                         message="exited 0 without its final record, in phase build")  # fmt: skip
    assert ok(0).completed and not quitter.completed and quitter.failed
    outcome, _, verdict, reason = _run(CASES["C-00"], [ok(0), quitter])
    assert (outcome, verdict) == (Outcome.CRASHED, Verdict.FAIL)
    assert reason.startswith("rank 1: no_final_record: exited 0 without its final record")
    assert root_cause_rank([ok(0), quitter]) == 1


def test_a_fault_case_whose_ranks_all_exit_0_without_records_is_not_survived() -> None:
    quitters = [RankResult(rank=r, exit_code=0, exited_at=T0 + 1, fired_at=T0, error_class="no_final_record") for r in (0, 1)]
    outcome, _ = classify(CASES["C-01"], quitters)
    assert outcome is Outcome.CRASHED  # the fault fired; what followed is judged against the expectation
    verdict, _ = judge(CASES["C-01"].expect, outcome, quitters)
    assert verdict is Verdict.FAIL


# -- expectations that name the region's own inputs and parameters ---------------------------


def test_touched_placeholder_names_what_the_fault_changed() -> None:
    from hardening.suites import get_suite

    om11 = {c.id: c for c in get_suite("operator")}["OM-11"]
    leader = crashed(0, "PeerError", "rank 1 failed first: DriftError: ...", exited=T0 + 1.1, fired=None, code=29, root=1)
    odd = crashed(1, "DriftError", "input digest mismatch at call 2: rank 1 (input_ids) differs from the leader",
                   exited=T0 + 1.0, fired=T0 + 0.9, code=23)  # fmt: skip
    odd.touched = "input_ids"
    outcome, _, verdict, reason = _run(om11, [leader, odd])
    assert (outcome, verdict, reason) == (Outcome.CRASHED, Verdict.PASS, "")
    odd.touched = "x"  # the message names another tensor than the one changed
    assert _run(om11, [leader, odd])[2] is Verdict.FAIL


def test_a_fault_that_cannot_apply_is_skipped_not_unknown() -> None:
    ranks = [ok(0), ok(1)]
    ranks[1].skipped = "no input has a dimension larger than 1 to restride"
    outcome, _, verdict, reason = _run(CASES["C-03"], ranks)
    assert (outcome, verdict) == (Outcome.SKIPPED, Verdict.SKIPPED)
    assert reason == "skipped: no input has a dimension larger than 1 to restride"


def test_a_rank_the_abort_reached_first_follows_the_same_cause_only_where_allowed() -> None:
    c02 = CASES["C-02"]
    own = crashed(0, "CompileGateError", "graph break in the region (fullgraph=True): ...", exited=T0 + 1.0, fired=T0 + 0.5, code=25)
    follower = crashed(1, "PeerError", "rank 0 failed first: CompileGateError: graph break ...", exited=T0 + 1.1,
                        fired=T0 + 0.5, code=29, root=0)  # fmt: skip
    both = crashed(1, "CompileGateError", "graph break in the region (fullgraph=True): ...", exited=T0 + 1.1, fired=T0 + 0.5, code=25)
    assert _run(c02, [own, follower])[2] is Verdict.PASS
    assert _run(c02, [own, both])[2] is Verdict.PASS  # the same verdict whichever rank was faster
    wrong_root = crashed(0, "ParityError", "...", exited=T0 + 1.0, fired=T0 + 0.5, code=20)
    assert _run(c02, [wrong_root, follower])[2] is Verdict.FAIL
    # Where one rank is the cause (C-04 parity on every rank), a PeerError is still a failure.
    c04 = CASES["C-04"]
    parity = crashed(0, "ParityError", "ranks disagree on 1 fingerprint key(s): effective.sdpa.backend", exited=T0 + 1, fired=T0)
    peer = crashed(1, "PeerError", "rank 0 failed first: ParityError", exited=T0 + 1.1, fired=T0, code=29, root=0)
    assert _run(c04, [parity, peer])[2] is Verdict.FAIL
