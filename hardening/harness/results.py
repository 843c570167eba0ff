"""What happened and what it means: outcomes, verdicts and the typed result objects.

The runner produces one :class:`CaseResult` per case from per-rank final records and
process exits; every report writer consumes :class:`SuiteResult` and nothing else.
Classification (:func:`classify`) and judgement (:func:`judge`) are pure functions of
recorded data so they can be tested without starting a process.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from hardening.harness.cases import Case, Expectation, RankExpect

SCHEMA_VERSION = 1


class Outcome(str, enum.Enum):
    """What happened to a case, before comparing with its expectation."""

    COMPLETED = "completed"  # no fault; every rank exited 0 with the runtime's clean final record
    CRASHED = "crashed"  # every rank ended non-zero within the detection budget (or the control crashed)
    CRASHED_SLOW = "crashed_slow"  # crashed, but after the detection budget
    HUNG = "hung"  # a rank was alive at the deadline; stacks attached
    SURVIVED = "survived"  # the fault fired and every rank still exited 0
    NOT_FIRED = "not_fired"  # the fault never fired: nothing can be judged
    SKIPPED = "skipped"  # the fault cannot apply to this region (it said why): nothing to judge, by design
    EARLY_CRASH = "early_crash"  # a rank died before the fault fired: nothing can be judged
    HARNESS_ERROR = "harness_error"  # the harness itself failed to run the case
    INTERRUPTED = "interrupted"  # the run was stopped (Ctrl-C, SIGTERM) before the case ended

    def __str__(self) -> str:
        return self.value


class Verdict(str, enum.Enum):
    """The outcome judged against the expectation. ``unknown`` never counts as a pass."""

    PASS = "pass"
    FAIL = "fail"
    UNKNOWN = "unknown"
    SKIPPED = "skipped"
    """The fault cannot apply to the region under test (nothing to restride, no checkable
    parameter): not a pass, and not a doubt about the runtime either."""

    def __str__(self) -> str:
        return self.value


# When verdicts are merged the most significant wins (Jepsen's merge-valid).
VERDICT_PRIORITY = {Verdict.SKIPPED: 0, Verdict.PASS: 0, Verdict.UNKNOWN: 1, Verdict.FAIL: 2}


@dataclass(kw_only=True, slots=True)
class RankResult:
    """How one rank ended: its final record joined with what the runner saw of its process."""

    rank: int
    pid: int | None = None
    exit_code: int | None = None
    """Process exit status; None when the rank was still alive at the deadline."""
    signal: str | None = None
    """Name of the signal that ended the process, if one did (and the runner did not send it)."""
    error_class: str | None = None
    """Named cause from the final record (or derived from the exit code when there is none)."""
    message: str = ""
    root_cause_rank: int | None = None
    """For PeerError: the rank that failed first."""
    fired_at: float | None = None
    """Wall time at which this rank fired the fault, if it did."""
    touched: str | None = None
    """What the fault changed on this rank (a tensor or parameter name), if it said."""
    skipped: str | None = None
    """Why the fault could not apply to the region on this rank, if it could not."""
    started_at: float | None = None
    exited_at: float | None = None
    phase: str = ""
    """Last phase the rank reported: init, parity, build, warmup, steady, done."""
    last_call_id: int | None = None
    counters: dict[str, Any] = field(default_factory=dict)
    """Compile counters: graphs, compiles, recompiles, graph_breaks, break_reasons, ..."""
    stacks_path: str | None = None
    where: str = ""
    """One-line summary of where the rank was (innermost user/hardening frame) when hung."""
    artifacts: dict[str, str] = field(default_factory=dict)
    """Debug artifacts the rank wrote (e.g. ``torch_trace``: a directory for tlparse)."""
    has_record: bool = False
    """Whether the rank wrote its final record (False: killed, or died before it could)."""
    log_dir: str | None = None

    @property
    def alive_at_deadline(self) -> bool:
        return self.exit_code is None

    @property
    def completed(self) -> bool:
        """Exit 0 *and* the runtime's own clean final record: a rank that exited 0 some
        other way (``os._exit(0)`` in a factory) did no verified work."""
        return self.exit_code == 0 and self.has_record and self.error_class is None

    @property
    def failed(self) -> bool:
        """Exited, and not as a completion."""
        return self.exit_code is not None and not self.completed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True, slots=True)
class CaseResult:
    """The result of one case: outcome, verdict, timing and every rank's end."""

    id: str
    title: str
    fault: str | None
    expectation: str
    outcome: Outcome
    verdict: Verdict
    reason: str = ""
    """Why the verdict is what it is (empty on a plain pass)."""
    t_detect: float | None = None
    """Last rank's exit minus the fault's fire time, in seconds."""
    budget_s: float | None = None
    root_cause_rank: int | None = None
    ranks: list[RankResult] = field(default_factory=list)
    wall_s: float = 0.0
    run_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        data["verdict"] = self.verdict.value
        return data


@dataclass(kw_only=True, slots=True)
class SuiteResult:
    """Everything a report needs about one invocation of a suite."""

    suite: str
    profile: str
    num_ranks: int
    cases: list[CaseResult] = field(default_factory=list)
    wall_s: float = 0.0
    started_at: float = 0.0
    interrupted: bool = False
    interrupted_by: str | None = None
    """The signal that stopped the run (SIGINT, SIGTERM, SIGHUP), when one did."""
    run_dir: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    harness_error: str | None = None
    """Set when the harness could not run the suite at all."""

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "suite": self.suite,
            "profile": self.profile,
            "num_ranks": self.num_ranks,
            "started_at": self.started_at,
            "wall_s": self.wall_s,
            "interrupted": self.interrupted,
            "interrupted_by": self.interrupted_by,
            "run_dir": self.run_dir,
            "environment": self.environment,
            "harness_error": self.harness_error,
            "summary": summarize(self),
            "cases": [c.to_json() for c in self.cases],
        }


def summarize(result: SuiteResult) -> dict[str, int]:
    counts = {v.value: 0 for v in Verdict}
    for case in result.cases:
        counts[case.verdict.value] += 1
    return counts


def fire_time(ranks: list[RankResult]) -> float | None:
    fired = [r.fired_at for r in ranks if r.fired_at is not None]
    return min(fired) if fired else None


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
        t_detect = max(0.0, max(exits) - fired) if fired is not None and exits else None
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
    t_detect = max(0.0, max(exits) - fired) if exits else None
    if t_detect is not None and t_detect > case.expect.budget_s:
        return Outcome.CRASHED_SLOW, t_detect
    return Outcome.CRASHED, t_detect


def judge(expect: Expectation, outcome: Outcome, ranks: list[RankResult]) -> tuple[Verdict, str]:
    """Verdict of an outcome against the expectation, with the reason when not a pass."""
    if outcome in (Outcome.HARNESS_ERROR, Outcome.INTERRUPTED):
        return Verdict.UNKNOWN, f"case {outcome.value}"
    if not expect.crash:
        if outcome is Outcome.COMPLETED:
            return Verdict.PASS, ""
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


TORN_DOWN = "torn_down"
"""RankResult.error_class of a rank the runner ended itself (interrupt, harness error)."""

NO_RECORD = "no_final_record"
"""RankResult.error_class of a rank that exited 0 without the runtime's final record."""


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
