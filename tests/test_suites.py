"""The shipped suites: what every case promises is well formed and unique."""

from __future__ import annotations

import re
import signal

import pytest

from hardening.errors import NAMED_CAUSES
from hardening.harness.judge import HUNG
from hardening.inject import fault_class
from hardening.suites import SUITES, get_suite


def _all_cases():
    return [case for name in SUITES for case in get_suite(name)]


def test_case_ids_are_unique_across_every_suite() -> None:
    # Case directories and JUnit names are keyed by id: a repeated id overwrites logs.
    ids = [case.id for case in _all_cases()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def _known_end(error: str) -> bool:
    """A named cause, a hang, or death by a signal (``SIGKILL``)."""
    return error in NAMED_CAUSES or error == HUNG or error in signal.Signals.__members__


def test_every_expected_error_is_a_named_cause_a_signal_or_a_hang() -> None:
    for case in _all_cases():
        expect = case.expect
        wanted = [*expect.ranks.values(), *([expect.others] if expect.others else [])]
        assert expect.crash == bool(wanted), case.id
        for want in wanted:
            assert _known_end(want.error), (case.id, want.error)
            if want.match:
                re.compile(want.match)  # a pattern that cannot compile can never match


def test_every_fault_names_a_registered_fault_and_a_control_has_none() -> None:
    for case in _all_cases():
        if case.fault is None:
            assert not case.expect.crash, f"{case.id}: a case without a fault must be a control"
        else:
            assert fault_class(case.fault.split(":", 1)[0]) is not None, case.id


def test_the_readme_matrix_has_one_row_per_case_with_its_fault_and_budget() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if re.match(r"^\| [A-Z]+-\d+ \|", line)}
    for case in _all_cases():
        row = rows.get(case.id)
        assert row is not None, f"README has no matrix row for {case.id}"
        cells = [c.strip() for c in row.split("|")[1:-1]]
        fault = case.fault.split(":", 1)[0] if case.fault else "none"
        assert fault in cells[1], (case.id, cells[1])
        budget = f"{case.expect.budget_s:g} s" if case.expect.crash else "—"
        assert cells[3] == budget, (case.id, cells[3], budget)
    assert set(rows) == {case.id for case in _all_cases()}, "README rows for cases that do not exist"


@pytest.mark.parametrize("peer", [1, 2, 3])
def test_c05_expects_the_words_of_whichever_pair_compared_first(peer: int) -> None:
    # On 4 ranks (two nodes of two) rank 0 may be compared with any peer first: the pair
    # (0, 2) is as much the named cause as (0, 1). A CI run once failed on exactly that.
    case = next(c for c in get_suite("compile") if c.id == "C-05")
    message = (
        "collectives differ across ranks in call 0, before the graph that issues collective 1 runs: "
        f"rank 0: all_reduce(sum) of float32 (1, 8, 64) on group '0' at compile.py:79; rank {peer}: none"
    )
    assert all(case.expect.for_rank(r).check("CompileGateError", message) is None for r in range(4))
