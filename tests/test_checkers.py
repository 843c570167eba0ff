"""Checkers: verdicts from stored pipeline records, including the ones that must fail."""

from __future__ import annotations

from hardening.harness import checkers
from hardening.harness.cases import MODELLED
from hardening.harness.profile import Profile
from hardening.harness.results import RankResult, Verdict

PROFILE = Profile()


def ranks_with(pipeline: dict) -> list[RankResult]:
    return [RankResult(rank=0, exit_code=0, has_record=True, pipeline=pipeline), RankResult(rank=1, exit_code=0, has_record=True)]


def history(*events: list) -> dict:
    return {"history": list(events), "stale_dropped": sum(1 for e in events if e[0] == "drop")}


def test_the_fence_holds_when_stale_results_were_dropped_and_new_ones_delivered() -> None:
    h = history(["deliver", 3, 0, 0], ["cut", 6, 1], ["drop", 4, 0, 1], ["drop", 5, 0, 1], ["deliver", 6, 1, 1])
    verdict, reason, metrics = checkers.run("fence_held", ranks_with(h), PROFILE)
    assert verdict is Verdict.PASS, reason
    assert metrics == {"cuts": 1, "stale_dropped": 2, "delivered": 2}


def test_a_stale_delivery_fails_the_fence_naming_chunk_and_epochs() -> None:
    h = history(["deliver", 3, 0, 0], ["cut", 6, 1], ["deliver", 4, 0, 1], ["deliver", 6, 1, 1])
    verdict, reason, _ = checkers.run("fence_held", ranks_with(h), PROFILE)
    assert verdict is Verdict.FAIL and "chunk 4 of epoch 0 handed over in epoch 1" in reason


def test_a_cut_with_nothing_in_flight_tested_nothing_and_is_unknown() -> None:
    h = history(["deliver", 3, 0, 0], ["cut", 4, 1], ["deliver", 4, 1, 1])
    verdict, reason, _ = checkers.run("fence_held", ranks_with(h), PROFILE)
    assert verdict is Verdict.UNKNOWN and "never tested" in reason
    assert checkers.run("fence_held", ranks_with({}), PROFILE)[0] is Verdict.UNKNOWN


def test_counters_that_disagree_with_the_history_fail() -> None:
    h = history(["cut", 6, 1], ["drop", 4, 0, 1], ["deliver", 6, 1, 1]) | {"stale_dropped": 0}  # noqa: E501
    assert checkers.run("fence_held", ranks_with(h), PROFILE)[0] is Verdict.FAIL


def segment(score: float | None, idle: float = 0.5) -> dict:
    return {
        "overlap_score": score, "t_mesh_idle_ms": idle * 15, "mesh_idle_per_chunk_ms": idle, "window_ms": 500.0,
        "ideal_ms": 400.0, "serial_ms": 700.0,
    }  # fmt: skip


def test_the_depth_sweep_needs_every_deep_segment_over_the_gate_and_reports_what_d2_gains() -> None:
    good = {"metrics": {"D=1": segment(0.6), "D=2": segment(0.95), "D=3": segment(0.94), "D=4": segment(0.93)}}
    verdict, _, metrics = checkers.run("depth_sweep", ranks_with(good), PROFILE)
    assert verdict is Verdict.PASS and metrics["gain_d2_over_d1"] == 0.35
    shallow = {"metrics": {**good["metrics"], "D=3": segment(0.5)}}
    verdict, reason, _ = checkers.run("depth_sweep", ranks_with(shallow), PROFILE)
    assert verdict is Verdict.FAIL and "D=3" in reason
    d1_is_not_gated = {"metrics": {**good["metrics"], "D=1": segment(0.2)}}
    assert checkers.run("depth_sweep", ranks_with(d1_is_not_gated), PROFILE)[0] is Verdict.PASS
    missing = {"metrics": {"D=1": segment(0.6), "D=2": segment(None)}}
    assert checkers.run("depth_sweep", ranks_with(missing), PROFILE)[0] is Verdict.UNKNOWN


def test_the_overlap_signature_gates_score_and_mesh_idle() -> None:
    assert checkers.run("overlap_signature", ranks_with({"metrics": {"steady": segment(0.9)}}), PROFILE)[0] is Verdict.PASS
    verdict, reason, metrics = checkers.run("overlap_signature", ranks_with({"metrics": {"steady": segment(0.9, idle=9)}}), PROFILE)
    assert verdict is Verdict.FAIL and "mesh idle" in reason and metrics["note"] == checkers.MEASURED  # a program's own
    modelled = {"metrics": {"steady": segment(0.9)}, "stage_note": MODELLED}
    assert checkers.run("overlap_signature", ranks_with(modelled), PROFILE)[2]["note"] == MODELLED


def variant(window: float, mesh: float, score: float = 0.9) -> dict:
    return segment(score) | {"window_ms": window, "busy_mesh_ms": mesh, "results_per_s": 1000 * 16 / window}


def test_recompute_coupling_gates_the_overlap_the_recompute_took_away() -> None:
    cut = [["cut", 20, 1]]
    # 120 ms of recompute made the window 130 ms longer; the score barely moved.
    absorbed = {"metrics": {"stash": variant(600, 400, 0.9), "recompute": variant(730, 520, 0.86)}, "history": cut}
    verdict, _, metrics = checkers.run("recompute_coupling", ranks_with(absorbed), PROFILE)
    assert verdict is Verdict.PASS and metrics["score_delta"] == 0.04
    assert metrics["window_growth_beyond_work"] == round(10 / 600, 3) and metrics["throughput_ratio"] == round(600 / 730, 3)
    # The stages waited on each other around each recompute: the overlap collapsed.
    serialized = {"metrics": {"stash": variant(600, 400, 0.9), "recompute": variant(900, 520, 0.5)}, "history": cut}
    verdict, reason, _ = checkers.run("recompute_coupling", ranks_with(serialized), PROFILE)
    assert verdict is Verdict.FAIL and "re-serializes" in reason
    assert checkers.run("recompute_coupling", ranks_with({**absorbed, "history": []}), PROFILE)[0] is Verdict.UNKNOWN


def test_the_fence_is_judged_from_the_cuts_not_from_the_stamps() -> None:
    mis_stamped = history(["cut", 6, 1], ["drop", 5, 0, 1], ["deliver", 6, 0, 0])
    verdict, reason, _ = checkers.run("fence_held", ranks_with(mis_stamped), PROFILE)
    assert verdict is Verdict.FAIL and "the cuts put it in epoch 1" in reason
    over_dropped = history(["cut", 6, 1], ["drop", 5, 0, 1], ["drop", 6, 1, 1], ["deliver", 7, 1, 1])
    assert "was dropped as stale" in checkers.run("fence_held", ranks_with(over_dropped), PROFILE)[1]
    twice = history(["cut", 6, 1], ["drop", 5, 0, 1], ["deliver", 6, 1, 1], ["deliver", 6, 1, 1])
    assert "taken twice" in checkers.run("fence_held", ranks_with(twice), PROFILE)[1]


def test_a_checker_that_raises_is_unknown_never_a_pass() -> None:
    broken = {"history": [["cut", 4, 1], ["deliver", 4]]}  # malformed: the checker cannot read it
    verdict, reason, _ = checkers.run("fence_held", ranks_with(broken), PROFILE)
    assert verdict is Verdict.UNKNOWN and "could not decide" in reason
