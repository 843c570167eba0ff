"""Report writers: the table, the JSON and the JUnit XML from hand-built SuiteResults."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hardening.harness.reports import render_table, write_json, write_junit
from hardening.harness.results import SCHEMA_VERSION, CaseResult, Outcome, RankResult, SuiteResult, Verdict

STACK_TEXT = (
    "Thread 4242 (idle): \"MainThread\"\n"
    "    all_reduce (torch/distributed/distributed_c10d.py:2501)\n"
    "    warmup (hardening/worker.py:88)\n"
)


def _rank(rank: int, **kw) -> RankResult:
    kw.setdefault("exit_code", 0)
    kw.setdefault("has_record", True)
    kw.setdefault("log_dir", f"/runs/r1/{kw.pop('case', 'X')}/rank{rank}")
    return RankResult(rank=rank, **kw)


def _cases(stacks_path: str) -> list[CaseResult]:
    counters = {"graph_breaks": 0, "recompiles": 0}
    return [
        CaseResult(
            id="C-00", title="control", fault=None, expectation="completes",
            outcome=Outcome.COMPLETED, verdict=Verdict.PASS, wall_s=8.04,
            ranks=[_rank(0, case="C-00", counters=counters), _rank(1, case="C-00", counters=counters)],
        ),
        CaseResult(
            id="C-01", title="env mismatch", fault="env_skew:rank=1", expectation="all:ParityError",
            outcome=Outcome.CRASHED, verdict=Verdict.PASS, t_detect=0.41, budget_s=2.0, root_cause_rank=1,
            wall_s=5.5,
            ranks=[
                _rank(0, case="C-01", exit_code=20, error_class="ParityError", message="TORCH_X differs", counters=counters),
                _rank(1, case="C-01", exit_code=20, error_class="ParityError", message="TORCH_X differs", counters=counters),
            ],
        ),
        CaseResult(
            id="C-02", title="weights drift", fault="drift:rank=1:call=3", expectation="all:DriftError",
            outcome=Outcome.CRASHED_SLOW, verdict=Verdict.FAIL, reason="crashed after the 2s detection budget",
            t_detect=3.72, budget_s=2.0, root_cause_rank=1, wall_s=14.25,
            ranks=[
                _rank(0, case="C-02", exit_code=27, error_class="PeerError", root_cause_rank=1, phase="steady",
                      message="rank 1 failed first: DriftError\nTraceback (most recent call last): ...",
                      counters={"graph_breaks": 2, "recompiles": 1,
                                "break_reasons": ["data-dependent branch in attn.py:41"],
                                "recompile_reasons": ["tensor 'x' size mismatch at index 0"]}),
                _rank(1, case="C-02", exit_code=23, error_class="DriftError", phase="steady",
                      message="checksum of layer 3 differs " + "x" * 400, counters={"graph_breaks": 0, "recompiles": 0}),
            ],
        ),
        CaseResult(
            id="C-03", title="peer wedged", fault="wedge:rank=1:call=2", expectation="all:PeerLost",
            outcome=Outcome.HUNG, verdict=Verdict.FAIL, reason="rank(s) 0,1 still alive at the deadline",
            budget_s=2.0, wall_s=30.0,
            ranks=[
                _rank(0, case="C-03", exit_code=None, has_record=False, phase="warmup", stacks_path=stacks_path,
                      where="hardening/worker.py:88 in warmup"),
                _rank(1, case="C-03", exit_code=None, has_record=False, phase="warmup",
                      stacks_path=stacks_path + ".missing"),
            ],
        ),
        CaseResult(
            id="C-04", title="fault on a call never made", fault="drop:rank=0:call=999",
            expectation="all:PeerLost", outcome=Outcome.NOT_FIRED, verdict=Verdict.UNKNOWN,
            reason="the fault never fired", wall_s=6.1,
            ranks=[_rank(0, case="C-04"), _rank(1, case="C-04")],
        ),
        CaseResult(
            id="C-05", title="oom kill", fault="kill:rank=1:call=1", expectation="all:PeerLost",
            outcome=Outcome.CRASHED, verdict=Verdict.FAIL, reason="rank 1: expected PeerLost, got a clean exit",
            t_detect=0.9, budget_s=2.0, root_cause_rank=1, wall_s=4.0,
            ranks=[_rank(0, case="C-05", exit_code=3, has_record=False),
                   _rank(1, case="C-05", exit_code=-9, signal="SIGKILL", has_record=False)],
        ),
    ]


@pytest.fixture
def stacks_file(tmp_path: Path) -> Path:
    path = tmp_path / "C-03" / "rank0.stacks.txt"
    path.parent.mkdir()
    path.write_text(STACK_TEXT)
    return path


@pytest.fixture
def suite(stacks_file: Path) -> SuiteResult:
    return SuiteResult(
        suite="compile", profile="default", num_ranks=2, cases=_cases(str(stacks_file)), wall_s=67.89,
        started_at=1_700_000_000.0, run_dir="/runs/r1",
        environment={"torch": "2.6.0+cpu", "hostname": "ci-7", "python": "3.11.9"},
    )


@pytest.fixture
def interrupted_suite() -> SuiteResult:
    done = _cases("/nowhere")[1]
    cut = CaseResult(
        id="C-02", title="weights drift", fault="drift:rank=1:call=3", expectation="all:DriftError",
        outcome=Outcome.INTERRUPTED, verdict=Verdict.UNKNOWN, reason="case interrupted", wall_s=1.5,
        ranks=[_rank(0, case="C-02", exit_code=-15, signal="SIGTERM", has_record=False)],
    )
    return SuiteResult(suite="compile", profile="default", num_ranks=2, cases=[done, cut], wall_s=7.0,
                       interrupted=True, run_dir="/runs/r2")


# -- table ------------------------------------------------------------------------------


def _table_rows(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines() if line.startswith("C-")}


def test_table_has_one_row_per_case_with_every_column(suite: SuiteResult) -> None:
    text = render_table(suite)
    header = text.splitlines()[0].split()
    assert header == ["case", "fault", "expect", "outcome", "verdict", "t_detect", "ranks", "breaks", "recompiles", "wall"]
    rows = _table_rows(text.split("\n\n")[0])
    assert sorted(rows) == ["C-00", "C-01", "C-02", "C-03", "C-04", "C-05"]
    assert "—" in rows["C-00"] and "completed" in rows["C-00"] and "PASS" in rows["C-00"]
    assert "r0 ok · r1 ok" in rows["C-00"] and "8.0s" in rows["C-00"]
    assert "r0 ParityError · r1 ParityError" in rows["C-01"] and "0.41s" in rows["C-01"]
    assert "0/0" in rows["C-01"]
    assert "crashed_slow" in rows["C-02"] and "FAIL" in rows["C-02"] and "3.72s" in rows["C-02"]
    assert "r0 PeerError · r1 DriftError" in rows["C-02"] and "2/0" in rows["C-02"] and "1/0" in rows["C-02"]
    assert "r0 hung@warmup · r1 hung@warmup" in rows["C-03"] and "hung" in rows["C-03"]
    assert "not_fired" in rows["C-04"] and "UNKNOWN" in rows["C-04"]
    assert "r0 exit 3 · r1 signal SIGKILL" in rows["C-05"]
    # no counters on any rank -> a single dash, not "—/—"
    assert "—/—" not in rows["C-05"]


def test_table_details_only_for_non_passing_cases(suite: SuiteResult) -> None:
    text = render_table(suite)
    table, *rest = text.split("\n\n")
    details = "\n\n".join(rest)
    assert "C-02 FAIL (crashed_slow)" in details
    assert "reason: crashed after the 2s detection budget" in details
    assert "root cause: rank 1" in details
    assert "rank 1 failed first: DriftError" in details and "Traceback" not in details  # first line only
    assert "data-dependent branch in attn.py:41" in details
    assert "tensor 'x' size mismatch at index 0" in details
    assert "/runs/r1/C-02/rank1" in details
    # long messages are trimmed
    drift_line = next(line for line in details.splitlines() if "checksum of layer 3" in line)
    assert "x" * 200 not in drift_line and drift_line.endswith("…")
    # hung ranks: where and stacks path
    assert "where: hardening/worker.py:88 in warmup" in details
    assert "stacks: " + suite.cases[3].ranks[0].stacks_path in details
    assert "C-04 UNKNOWN (not_fired)" in details and "the fault never fired" in details
    assert "C-05 FAIL" in details and "signal SIGKILL" in details
    # passing cases get no block
    assert "C-00 " not in details and "C-01 " not in details


def test_table_summary_line_and_run_directory(suite: SuiteResult) -> None:
    lines = render_table(suite).splitlines()
    assert lines[-2] == "6 cases: 2 pass, 3 fail, 1 unknown in 67.9s"
    assert lines[-1] == "run directory: /runs/r1"
    assert "\x1b[" not in "\n".join(lines)  # no colours


def test_table_interrupted_and_harness_error(interrupted_suite: SuiteResult) -> None:
    interrupted_suite.harness_error = "rendezvous port in use"
    text = render_table(interrupted_suite)
    assert "2 cases: 1 pass, 0 fail, 1 unknown in 7.0s" in text
    assert "INTERRUPTED (partial report" in text
    assert "harness error: rendezvous port in use" in text
    assert "C-02 UNKNOWN (interrupted)" in text and "r0 signal SIGTERM" in text


def test_table_with_no_cases_still_summarises() -> None:
    text = render_table(SuiteResult(suite="compile", profile="default", num_ranks=2,
                                    harness_error="torch not importable"))
    assert "0 cases: 0 pass, 0 fail, 0 unknown" in text
    assert "harness error: torch not importable" in text


# -- JSON -------------------------------------------------------------------------------


def test_json_round_trips(suite: SuiteResult, tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "report.json"
    write_json(suite, path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["summary"] == {"pass": 2, "fail": 3, "unknown": 1, "skipped": 0}
    assert data["environment"]["torch"] == "2.6.0+cpu"
    by_id = {c["id"]: c for c in data["cases"]}
    assert by_id["C-01"]["outcome"] == "crashed" and by_id["C-01"]["verdict"] == "pass"
    assert by_id["C-01"]["t_detect"] == pytest.approx(0.41)
    assert by_id["C-02"]["outcome"] == "crashed_slow" and by_id["C-02"]["verdict"] == "fail"
    assert by_id["C-03"]["t_detect"] is None and by_id["C-03"]["ranks"][0]["exit_code"] is None
    assert by_id["C-04"]["verdict"] == "unknown"
    assert by_id["C-02"]["ranks"][0]["counters"]["break_reasons"] == ["data-dependent branch in attn.py:41"]
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    text = path.read_text()
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_json_is_strict_with_non_finite_and_odd_values(suite: SuiteResult, tmp_path: Path) -> None:
    suite.cases[1].t_detect = math.nan
    suite.cases[1].ranks[0].counters = {"graph_breaks": 0, "shapes": {(1, 2)}, "where": Path("/a/b"),
                                        "ratio": math.inf}
    path = tmp_path / "r.json"
    write_json(suite, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["cases"][1]["t_detect"] is None
    counters = data["cases"][1]["ranks"][0]["counters"]
    assert counters["ratio"] is None and counters["where"] == "/a/b" and counters["shapes"] == [[1, 2]]


def test_json_write_is_atomic(suite: SuiteResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "reports" / "report.json"
    path.parent.mkdir()
    path.write_text("previous")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json(suite, path)
    assert path.read_text() == "previous"
    assert list(path.parent.iterdir()) == [path]


# -- JUnit ------------------------------------------------------------------------------


def _junit(result: SuiteResult, tmp_path: Path) -> ET.Element:
    path = tmp_path / "out" / "junit.xml"
    write_junit(result, path)
    assert list(path.parent.iterdir()) == [path]
    return ET.parse(path).getroot()


def test_junit_counts_and_suite_attributes(suite: SuiteResult, tmp_path: Path) -> None:
    root = _junit(suite, tmp_path)
    assert root.tag == "testsuites"
    ts = root.find("testsuite")
    assert ts is not None
    assert ts.get("name") == "hardening.compile"
    assert (ts.get("tests"), ts.get("failures"), ts.get("errors"), ts.get("skipped")) == ("6", "3", "1", "0")
    assert root.get("failures") == "3" and root.get("errors") == "1"
    assert ts.get("time") == "67.890"
    assert ts.get("timestamp") == "2023-11-14T22:13:20+00:00"
    assert ts.get("hostname") == "ci-7"
    props = {p.get("name"): p.get("value") for p in ts.findall("properties/property")}
    assert props["profile"] == "default" and props["num_ranks"] == "2" and props["torch"] == "2.6.0+cpu"


def test_junit_testcases(suite: SuiteResult, tmp_path: Path) -> None:
    ts = _junit(suite, tmp_path).find("testsuite")
    cases = {tc.get("name"): tc for tc in ts.findall("testcase")}
    assert sorted(cases) == [f"C-0{i}[ranks=2]" for i in range(6)]
    assert all(tc.get("classname") == "hardening.compile" for tc in cases.values())

    ok = cases["C-01[ranks=2]"]
    assert ok.get("time") == "5.500"
    assert ok.find("failure") is None and ok.find("error") is None and ok.find("skipped") is None
    props = {p.get("name"): p.get("value") for p in ok.findall("properties/property")}
    assert props["fault"] == "env_skew:rank=1" and props["expectation"] == "all:ParityError"
    assert props["outcome"] == "crashed" and props["verdict"] == "pass"
    assert props["t_detect"] == "0.410" and props["root_cause_rank"] == "1"
    assert "rank 0 log: /runs/r1/C-01/rank0" in ok.find("system-out").text

    slow = cases["C-02[ranks=2]"].find("failure")
    assert slow.get("type") == "crashed_slow"
    assert slow.get("message") == "crashed after the 2s detection budget"
    assert "r0 PeerError" in slow.text and "r1 DriftError" in slow.text

    unknown = cases["C-04[ranks=2]"]
    assert unknown.find("failure") is None
    assert unknown.find("error").get("type") == "not_fired"
    assert unknown.find("error").get("message") == "the fault never fired"

    assert cases["C-05[ranks=2]"].find("failure").get("type") == "crashed"


def test_junit_hung_failure_carries_the_stacks(suite: SuiteResult, tmp_path: Path) -> None:
    ts = _junit(suite, tmp_path).find("testsuite")
    hung = next(tc for tc in ts.findall("testcase") if tc.get("name").startswith("C-03"))
    failure = hung.find("failure")
    assert failure.get("type") == "hung"
    assert failure.get("message") == "rank(s) 0,1 still alive at the deadline"
    assert STACK_TEXT.strip() in failure.text
    assert "hung@warmup" in failure.text and "where: hardening/worker.py:88 in warmup" in failure.text
    assert "stacks file unreadable" in failure.text  # rank 1's file does not exist


def test_junit_caps_large_stacks_and_strips_invalid_xml(suite: SuiteResult, stacks_file: Path,
                                                        tmp_path: Path) -> None:
    stacks_file.write_text("\x1b[31mred\x1b[0m frame\n" + "y" * 100_000)
    suite.cases[2].ranks[1].message = "bad\x00byte"
    ts = _junit(suite, tmp_path).find("testsuite")
    body = next(tc for tc in ts.findall("testcase") if tc.get("name").startswith("C-03")).find("failure").text
    assert "red" in body and "\x1b" not in body
    assert "truncated at 20000" in body
    assert body.count("y") < 25_000
    slow = next(tc for tc in ts.findall("testcase") if tc.get("name").startswith("C-02")).find("failure").text
    assert "bad\ufffdbyte" in slow


def test_junit_interrupted_suite(interrupted_suite: SuiteResult, tmp_path: Path) -> None:
    ts = _junit(interrupted_suite, tmp_path).find("testsuite")
    cases = {tc.get("name"): tc for tc in ts.findall("testcase")}
    cut = cases["C-02[ranks=2]"]
    assert cut.find("skipped").get("message") == "interrupted"
    assert cut.find("error") is None and cut.find("failure") is None
    # the partial run itself is an error, so CI cannot read it as green
    marker = cases["compile[suite]"].find("error")
    assert marker.get("type") == "interrupted"
    assert (ts.get("tests"), ts.get("failures"), ts.get("errors"), ts.get("skipped")) == ("3", "0", "1", "1")
    assert "timestamp" not in ts.attrib  # started_at unknown


def test_junit_harness_error_without_cases(tmp_path: Path) -> None:
    result = SuiteResult(suite="compile", profile="default", num_ranks=2, harness_error="torch not importable")
    ts = _junit(result, tmp_path).find("testsuite")
    (tc,) = ts.findall("testcase")
    assert tc.find("error").get("type") == "harness_error"
    assert tc.find("error").get("message") == "torch not importable"
    assert ts.get("tests") == "1" and ts.get("errors") == "1"


def test_report_files_honour_the_umask_and_never_replace_a_device(tmp_path: Path) -> None:
    import os
    import stat

    from hardening.harness.reports.json_report import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "r.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    atomic_write_bytes("/dev/null", b"{}")  # written through, not renamed over
    assert Path("/dev/null").is_char_device()


# -- debug artifacts (depyf dump, TORCH_TRACE, tlparse HTML) ----------------------------------


def _artifact_suite() -> SuiteResult:
    def arts(r: int) -> dict[str, str]:
        return {
            "depyf": f"/runs/r3/C-00/rank{r}/depyf",
            "torch_trace": f"/runs/r3/C-00/rank{r}/torch_trace",
            "tlparse": "unavailable: tlparse not installed (pip install tlparse)",
        }

    failing = CaseResult(
        id="C-00", title="control", fault=None, expectation="completes", outcome=Outcome.CRASHED,
        verdict=Verdict.FAIL, reason="rank 0: CompileGateError: 1 graph break(s) > max 0", wall_s=2.0,
        run_dir="/runs/r3/C-00",
        ranks=[
            _rank(r, case="C-00", exit_code=25, error_class="CompileGateError", phase="warmup",
                  message="compile gate failed after warmup", artifacts=arts(r))
            for r in (0, 1)
        ],
    )  # fmt: skip
    return SuiteResult(suite="compile", profile="cpu", num_ranks=2, cases=[failing], wall_s=3.0, run_dir="/runs/r3")


def test_every_report_names_a_failing_cases_artifacts(tmp_path: Path) -> None:
    suite = _artifact_suite()
    table = render_table(suite)
    details = table[table.index("C-00 FAIL"):]
    for r in (0, 1):
        assert f"depyf: /runs/r3/C-00/rank{r}/depyf" in details
        assert f"torch_trace: /runs/r3/C-00/rank{r}/torch_trace" in details
    assert "tlparse: unavailable: tlparse not installed" in details

    write_json(suite, tmp_path / "r.json")
    ranks = json.loads((tmp_path / "r.json").read_text())["cases"][0]["ranks"]
    assert [r["artifacts"]["depyf"] for r in ranks] == ["/runs/r3/C-00/rank0/depyf", "/runs/r3/C-00/rank1/depyf"]

    tc = _junit(suite, tmp_path).find("testsuite/testcase")
    body = tc.find("failure").text
    assert "depyf: /runs/r3/C-00/rank1/depyf" in body and "torch_trace: /runs/r3/C-00/rank0/torch_trace" in body
    out = tc.find("system-out").text
    assert "rank 0 depyf: /runs/r3/C-00/rank0/depyf" in out
    assert "rank 1 tlparse: unavailable: tlparse not installed" in out
