"""The typed result objects: their JSON and their vocabulary."""

from __future__ import annotations

import json

from hardening.harness.results import SCHEMA_VERSION, CaseResult, Outcome, SuiteResult, Verdict, summarize
from hardening.suites import get_suite
from rank_ends import PARITY_MSG, T0, crashed

CASES = {c.id: c for c in get_suite("compile")}


def test_case_and_suite_json() -> None:
    fired = T0 + 2.0
    ranks = [crashed(0, "ParityError", PARITY_MSG, exited=fired + 0.1),
             crashed(1, "ParityError", PARITY_MSG, exited=fired + 0.2, fired=fired)]
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
