"""Judging a case: its outcome and verdict, as pure functions of the recorded rank ends.

:func:`classify` says what happened (completed, crashed, hung...) and ``t_detect``;
:func:`judge` says whether that is what the case expected; :func:`root_cause_rank` names
the rank the others followed. Nothing here starts a process or reads a clock, so every
rule is tested on stored ends (``tests/test_judge.py``).
"""

from __future__ import annotations

from hardening.harness.cases import Case, Expectation, RankExpect
from hardening.harness.results import TORN_DOWN, Outcome, RankResult, Verdict


def fire_time(ranks: list[RankResult]) -> float | None:
    fired = [r.fired_at for r in ranks if r.fired_at is not None]
    return min(fired) if fired else None


def detect_from(ranks: list[RankResult], fired: float) -> float:
    """Where ``t_detect`` counts from: the fault firing, or the last rank's start if that
    came later. A rank still importing torch cannot notice anything, and under torchrun
    every rank imports on its own: a fault that fires in one rank's parity phase may fire
    seconds before its peers exist."""
    starts = [r.started_at for r in ranks if r.started_at]
    return max([fired, *starts])


def classify(
    case: Case, ranks: list[RankResult], *, harness_error: str | None = None, interrupted: bool = False
) -> tuple[Outcome, float | None]:
    """Outcome of a case and its ``t_detect`` from the ranks' ends."""
    if harness_error:
        return Outcome.HARNESS_ERROR, None
    if interrupted:
        return Outcome.INTERRUPTED, None
    if any(r.alive_at_deadline for r in ranks):
        fired = fire_time(ranks)
        exits = [r.exited_at for r in ranks if r.exited_at is not None]
        # Still measured: a case may expect one rank to stay frozen (H-01) and the rest to leave.
        t_detect = max(0.0, max(exits) - detect_from(ranks, fired)) if fired is not None and exits else None
        return Outcome.HUNG, t_detect
    all_ok = all(r.completed for r in ranks)
    if case.fault is None:
        return (Outcome.COMPLETED if all_ok else Outcome.CRASHED), None
    fired = fire_time(ranks)
    if fired is None:
        if all_ok and any(r.skipped for r in ranks):
            return Outcome.SKIPPED, None
        return (Outcome.NOT_FIRED if all_ok else Outcome.EARLY_CRASH), None
    if any(r.failed and r.exited_at is not None and r.exited_at < fired for r in ranks):
        return Outcome.EARLY_CRASH, None
    if all_ok:
        return Outcome.SURVIVED, None
    exits = [r.exited_at for r in ranks if r.exited_at is not None]
    t_detect = max(0.0, max(exits) - detect_from(ranks, fired)) if exits else None
    if t_detect is not None and t_detect > case.expect.budget_s:
        return Outcome.CRASHED_SLOW, t_detect
    return Outcome.CRASHED, t_detect


def judge(expect: Expectation, outcome: Outcome, ranks: list[RankResult]) -> tuple[Verdict, str]:
    """Verdict of an outcome against the expectation, with the reason when not a pass."""
    if outcome in (Outcome.HARNESS_ERROR, Outcome.INTERRUPTED):
        return Verdict.UNKNOWN, f"case {outcome.value}"
    if not expect.crash:
        if outcome in (Outcome.COMPLETED, Outcome.SURVIVED):  # survived: a fault every rank must absorb (OM-09)
            return Verdict.PASS, ""
        if outcome is Outcome.NOT_FIRED:
            return Verdict.UNKNOWN, "the fault never fired"
        return Verdict.FAIL, _first_failure(ranks) or f"control {outcome.value}"
    if outcome is Outcome.NOT_FIRED:
        return Verdict.UNKNOWN, "the fault never fired"
    if outcome is Outcome.SKIPPED:
        return Verdict.SKIPPED, "skipped: " + next(r.skipped for r in ranks if r.skipped)
    if outcome is Outcome.EARLY_CRASH:
        return Verdict.UNKNOWN, "a rank died before the fault fired: " + (_first_failure(ranks) or "?")
    if outcome is Outcome.HUNG and not _hang_expected(expect, ranks):
        alive = [str(r.rank) for r in ranks if r.alive_at_deadline]
        return Verdict.FAIL, f"rank(s) {','.join(alive)} still alive at the deadline"
    if outcome is Outcome.SURVIVED:
        return Verdict.FAIL, "the fault fired and every rank exited 0"
    if outcome is Outcome.CRASHED_SLOW:
        return Verdict.FAIL, f"crashed after the {expect.budget_s:g}s detection budget"
    problems = []
    touched = next((r.touched for r in ranks if r.touched), None)
    for r in ranks:
        want = expect.for_rank(r.rank)
        if want is None:
            continue
        if want.error == HUNG:
            if not r.alive_at_deadline:
                problems.append(f"rank {r.rank}: expected to stay frozen, but it ended ({r.error_class or r.exit_code})")
            elif not r.stacks_path:
                problems.append(f"rank {r.rank}: frozen as expected, but no stacks were captured")
            continue
        why = want.check(r.error_class, r.message, touched=touched)
        if why and expect.followers_ok and _follows_expected(r, want, ranks, touched):
            why = None
        if why:
            problems.append(f"rank {r.rank}: {why}")
    if problems:
        return Verdict.FAIL, "; ".join(problems)
    return Verdict.PASS, ""


HUNG = "hung"
"""RankExpect.error of a rank that must still be alive (frozen) at the deadline, stacks taken."""


def _follows_expected(r: RankResult, want: RankExpect, ranks: list[RankResult], touched: str | None) -> bool:
    """``r`` ended PeerError naming a rank that itself ended as ``want`` says."""
    if r.error_class != "PeerError" or r.root_cause_rank is None or r.root_cause_rank == r.rank:
        return False
    root = next((x for x in ranks if x.rank == r.root_cause_rank), None)
    return root is not None and want.check(root.error_class, root.message, touched=touched) is None


def _hang_expected(expect: Expectation, ranks: list[RankResult]) -> bool:
    alive = [r for r in ranks if r.alive_at_deadline]
    return bool(alive) and all((expect.for_rank(r.rank) or _NO_EXPECT).error == HUNG for r in alive)


_NO_EXPECT = RankExpect(error="")


def _first_failure(ranks: list[RankResult]) -> str:
    failed = [r for r in ranks if r.failed]
    if not failed:
        return ""
    first = min(failed, key=lambda r: r.exited_at or float("inf"))
    what = first.error_class or (f"signal {first.signal}" if first.signal else f"exit {first.exit_code}")
    msg = first.message.splitlines()[0] if first.message else ""
    return f"rank {first.rank}: {what}" + (f": {msg}" if msg else "")


FOLLOWERS = ("PeerError", "PeerLost", TORN_DOWN)
"""Ends that point at another rank: a peer failed, a peer was lost, the runner tore it down."""


def root_cause_rank(ranks: list[RankResult]) -> int | None:
    """The first rank to fail that was not merely following a peer (torch elastic's rule).

    None when several ranks failed on their own with the same error and message: a
    verdict every rank reached together (parity, a gate on gathered counters) has no
    single root cause, and the exit order among them says nothing."""
    own = [r for r in ranks if r.failed and r.error_class not in FOLLOWERS]
    if len(own) > 1 and len({(r.error_class, r.message) for r in own}) == 1:
        return None
    if own:
        return min(own, key=lambda r: r.exited_at or float("inf")).rank
    followers = [r.root_cause_rank for r in ranks if r.root_cause_rank is not None]
    return followers[0] if followers else None
