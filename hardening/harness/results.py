"""What happened and what it means: outcomes, verdicts and the typed result objects.

The runner produces one :class:`CaseResult` per case from per-rank final records and
process exits; every report writer consumes :class:`SuiteResult` and nothing else.
What the ends mean is :mod:`hardening.harness.judge`.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


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
    pipeline: dict[str, Any] = field(default_factory=dict)
    """The record's pipeline section: queues, epochs, delivery history, overlap metrics."""
    node: int = 0
    """The node whose runner launched the rank (``--node-rank``; 0 on one host)."""
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
    root_cause_node: int | None = None
    """The node of the root-cause rank (``--node-rank`` of the runner that launched it)."""
    ranks: list[RankResult] = field(default_factory=list)
    wall_s: float = 0.0
    run_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """What the case's checker measured and judged (overlap per depth, stale drops...)."""

    @property
    def root_cause(self) -> str:
        """``rank R``, with its node when the ranks span several: what reports print."""
        if self.root_cause_rank is None:
            return ""
        spans = len({r.node for r in self.ranks}) > 1
        return f"rank {self.root_cause_rank}" + (f" on node {self.root_cause_node}" if spans else "")

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
    baseline: dict[str, Any] | None = None
    """With ``--baseline``: the file, its regressions, improvements and stale entries, and
    the command that ratchets it (``harness.baseline.Comparison``)."""

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
            "baseline": self.baseline,
            "summary": summarize(self),
            "cases": [c.to_json() for c in self.cases],
        }


def summarize(result: SuiteResult) -> dict[str, int]:
    counts = {v.value: 0 for v in Verdict}
    for case in result.cases:
        counts[case.verdict.value] += 1
    return counts


TORN_DOWN = "torn_down"
"""RankResult.error_class of a rank the runner ended itself (interrupt, harness error)."""

NO_RECORD = "no_final_record"
"""RankResult.error_class of a rank that exited 0 without the runtime's final record."""
