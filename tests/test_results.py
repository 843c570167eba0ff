"""The typed result objects: their JSON and their vocabulary."""

from __future__ import annotations

import json

from hardening.harness.results import SCHEMA_VERSION, CaseResult, Outcome, RankResult, SuiteResult, Verdict, summarize
from hardening.suites import get_suite

CASES = {c.id: c for c in get_suite("compile")}
PARITY_MSG = "ranks disagree on 1 fingerprint key(s): compile.enabled\nkey  rank 0  rank 1"
T0 = 1_700_000_000.0  # a wall-clock time like the records hold


def _ok(rank: int, *, exited: float = T0 + 5.0, fired: float | None = None) -> RankResult:
    return RankResult(
        rank=rank, pid=1000 + rank, exit_code=0, started_at=T0, exited_at=exited, fired_at=fired,
        phase="done", last_call_id=5, has_record=True, counters={"graph_breaks": 0, "recompiles": 0},
    )


def _crashed(rank: int, error: str, message: str, *, exited: float, fired: float | None = None,
             code: int = 20, root: int | None = None, phase: str = "parity") -> RankResult:
    return RankResult(
        rank=rank, pid=1000 + rank, exit_code=code, error_class=error, message=message, started_at=T0,
        exited_at=exited, fired_at=fired, phase=phase, root_cause_rank=root, has_record=True,
    )


def test_case_and_suite_json() -> None:
    fired = T0 + 2.0
    ranks = [_crashed(0, "ParityError", PARITY_MSG, exited=fired + 0.1),
             _crashed(1, "ParityError", PARITY_MSG, exited=fired + 0.2, fired=fired)]
    case = CASES["C-01"]
    cr = CaseResult(id=case.id, title=case.title, fault=case.fault, expectation=case.expect.describe(),
                    outcome=Outcome.CRASHED, verdict=Verdict.PASS, reason="", t_detect=0.2,
                    budget_s=case.expect.budget_s, root_cause_rank=None, ranks=ranks)
    unknown = CaseResult(id="C-04", title="t", fault="backend_divergence:rank=1", expectation="x",
                         outcome=Outcome.NOT_FIRED, verdict=Verdict.UNKNOWN)
    data = cr.to_json()
    assert data["outcome"] == "crashed" and type(data["outcome"]) is str
    assert data["verdict"] == "pass" and type(data["verdict"]) is str
    assert data["ranks"][1]["fired_at"] == fired and data["ranks"][0]["error_class"] == "ParityError"
    suite = SuiteResult(suite="compile", profile="cpu", num_ranks=2, cases=[cr, unknown])
    sj = suite.to_json()
    assert sj["schema_version"] == SCHEMA_VERSION
    assert sj["summary"] == {"pass": 1, "fail": 0, "unknown": 1, "skipped": 0} == summarize(suite)
    assert [c["verdict"] for c in sj["cases"]] == ["pass", "unknown"]
    assert [c["outcome"] for c in sj["cases"]] == ["crashed", "not_fired"]
    # Plain JSON all the way down: a round trip is lossless.
    assert json.loads(json.dumps(sj)) == sj


def test_enum_strings() -> None:
    assert str(Outcome.CRASHED_SLOW) == "crashed_slow"
    assert str(Verdict.UNKNOWN) == "unknown"
