"""Recorded rank ends for judging tests: what a rank's final record and exit look like."""

from __future__ import annotations

from hardening.harness.results import RankResult

T0 = 1_700_000_000.0  # a wall-clock time like the records hold


def ok(rank: int, *, exited: float = T0 + 5.0, fired: float | None = None) -> RankResult:
    return RankResult(
        rank=rank, pid=1000 + rank, exit_code=0, started_at=T0, exited_at=exited, fired_at=fired,
        phase="done", last_call_id=5, has_record=True, counters={"graph_breaks": 0, "recompiles": 0},
    )


def crashed(rank: int, error: str, message: str, *, exited: float, fired: float | None = None,
             code: int = 20, root: int | None = None, phase: str = "parity") -> RankResult:
    return RankResult(
        rank=rank, pid=1000 + rank, exit_code=code, error_class=error, message=message, started_at=T0,
        exited_at=exited, fired_at=fired, phase=phase, root_cause_rank=root, has_record=True,
    )


PARITY_MSG = "ranks disagree on 1 fingerprint key(s): compile.enabled\nkey  rank 0  rank 1"
