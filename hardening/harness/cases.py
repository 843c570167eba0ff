"""The case vocabulary: which program, which fault, and what must happen.

Suites (``hardening.suites``) are plain lists of :class:`Case` built from these types;
the runner sees cases only through :func:`hardening.suites.get_suite`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping


TOUCHED = "{touched}"
MODELLED = "stage times modelled (pp.work sleeps)"
"""What the harness's pipeline workload says of its stage work, next to every overlap figure."""
WORKLOAD_ENV = "HARDENING_WORKLOAD"
"""Carries ``Case.workload`` to every rank (a ``HARDENING_*`` variable: parity compares it)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankExpect:
    """What one rank must end with."""

    error: str
    """Name of the error class the rank must report (``ParityError``, ``PeerError``, ...)."""

    match: str | None = None
    """Regular expression the rank's error message must contain (the named cause), or None.
    ``{touched}`` stands for what the fault changed in the region under test (its first
    input's name, the parameter it perturbed), so that no case hard-codes the reference
    region's names."""

    def check(self, error_class: str | None, message: str, *, touched: str | None = None) -> str | None:
        """None if the rank's end meets this expectation, else why it does not."""
        if error_class != self.error:
            return f"expected {self.error}, got {error_class or 'a clean exit'}"
        pattern = self.match
        if pattern and TOUCHED in pattern:
            if touched is None:
                return f"the fault did not say what it changed, so /{pattern}/ cannot be checked"
            pattern = pattern.replace(TOUCHED, re.escape(touched))
        if pattern and not re.search(pattern, message or "", re.IGNORECASE | re.DOTALL):
            return f"{self.error} message does not name /{pattern}/"
        return None

    def describe(self, *, full: bool = False) -> str:
        return f"{self.error}~/{self.match}/" if full and self.match else self.error


@dataclass(frozen=True, kw_only=True, slots=True)
class Expectation:
    """What must happen: either every rank completes, or every rank crashes as named."""

    crash: bool
    """True: the fault must end every rank with its named error within ``budget_s``."""

    ranks: Mapping[int, RankExpect] = field(default_factory=dict)
    """Per-rank expectations for the ranks that differ from ``others``."""

    others: RankExpect | None = None
    """Expectation for every rank not listed in ``ranks``."""

    budget_s: float = 0.0
    """Detection budget: last rank's exit minus the fault's fire time."""

    followers_ok: bool = False
    """The fault acts on every rank, so every rank would hit the same cause: a rank that
    the job-wide abort reached first may end ``PeerError`` naming a rank that ended as
    expected. Without this the verdict would depend on which rank was faster."""

    def for_rank(self, rank: int) -> RankExpect | None:
        return self.ranks.get(rank, self.others)

    def describe(self, *, full: bool = False) -> str:
        """``all:ParityError`` style; ``full`` adds the message patterns."""
        if not self.crash:
            return "completes"
        parts = [f"r{r}:{e.describe(full=full)}" for r, e in sorted(self.ranks.items())]
        if self.others is not None:
            parts.append(("others:" if self.ranks else "all:") + self.others.describe(full=full))
        return ", ".join(parts)


def completes() -> Expectation:
    """Every rank exits 0 (the control of every suite)."""
    return Expectation(crash=False)


def crashes(
    error: str | None = None,
    *,
    match: str | None = None,
    on: Mapping[int, RankExpect] | None = None,
    within_s: float,
    followers_ok: bool = False,
) -> Expectation:
    """Every rank must crash: with ``error`` (matching ``match``) unless listed in ``on``."""
    others = RankExpect(error=error, match=match) if error else None
    return Expectation(crash=True, ranks=dict(on or {}), others=others, budget_s=within_s, followers_ok=followers_ok)


def first_fails(rank: int, error: str, *, match: str, within_s: float) -> Expectation:
    """``rank`` crashes with ``error`` (matching ``match``); every other rank follows it
    through the job-wide abort as ``PeerError`` naming it."""
    return crashes(
        "PeerError",
        match=rf"rank {rank} failed first: {error}",
        on={rank: RankExpect(error=error, match=match)},
        within_s=within_s,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One row of the operator matrix."""

    id: str
    """Matrix id, e.g. ``C-01``; unique across all suites."""

    title: str
    """What is broken, in a few words."""

    suite: str
    """Suite the case belongs to."""

    expect: Expectation
    """What must happen."""

    fault: str | None = None
    """Fault spec (``name:rank=1:call=3``) set identically on every rank, or None for a control."""

    min_ranks: int = 2
    """Fewest ranks the case makes sense with."""

    description: str = ""
    """Why the case exists and what it proves."""

    workload: str | None = None
    """The program every rank runs: None for the envelope loop over the region, or a
    pipeline workload (``pp1``, ``pp1:sweep``: :mod:`hardening.harness.pipeline_workload`)."""

    check: str | None = None
    """A checker of :mod:`hardening.harness.checkers` that judges the ranks' stored
    records once the expectation is met (the epoch fence's history, metric gates)."""

    surface: str = ""
    """The operator surface the case proves (a key of :mod:`hardening.harness.surfaces`):
    where the manual lists it as a break-it test. Every case of a shipped suite has one."""


MATRIX_HEADERS = ("id", "suite", "fault", "must happen", "budget", "ranks", "workload", "what")
"""The columns of the operator matrix, as ``hardening list`` and the manual print it."""


def matrix_row(case: Case) -> tuple[str, ...]:
    """One case as a row of the operator matrix (:data:`MATRIX_HEADERS`)."""
    return (
        case.id, case.suite, case.fault or "—", case.expect.describe() + (f" + {case.check}" if case.check else ""),
        f"{case.expect.budget_s:g}s" if case.expect.crash else "—", str(case.min_ranks), case.workload or "—", case.title,
    )  # fmt: skip
