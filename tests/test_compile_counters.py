"""Compile counters and their judgement: pure Python, no compile."""

from __future__ import annotations

import pytest

from hardening.runtime.compile.counters import CompileCounters, normalize_reason, symmetry_problems
from hardening.runtime.config import GateConfig

GATES = GateConfig()


def test_symmetry_problems():
    rank0 = CompileCounters(graphs=1, compiles=1, graph_signatures=["abc"])
    rank1 = CompileCounters(
        graphs=1, compiles=2, recompiles=1, graph_signatures=["abc"], recompile_reasons=["0/0: k == 1"]
    )
    problems = symmetry_problems([rank0, rank1])
    recompiles = [p for p in problems if p.startswith("recompiles differ")]
    assert recompiles == ["recompiles differ: rank 1 has 1 (reason: 0/0: k == 1), ranks 0 have 0"]
    assert any(p.startswith("compiles differ") for p in problems)
    same = CompileCounters.from_json(rank0.to_json())
    assert symmetry_problems([rank0, same]) == []
    assert symmetry_problems([rank0]) == []
    # The majority is "the others"; the odd rank is named even when it is not the last.
    three = symmetry_problems([rank1, rank0, CompileCounters.from_json(rank0.to_json())])
    assert any(p.startswith("recompiles differ: rank 0 has 1") and p.endswith("ranks 1,2 have 0") for p in three)


def test_normalize_reason():
    a = "Unsupported method call <function all_reduce at 0x7f83cbffe660>\n  Developer debug context: x"
    b = "Unsupported method call   <function all_reduce at 0x7fd7bb3ea660>\nother"
    assert normalize_reason(a) == normalize_reason(b) == "Unsupported method call <function all_reduce at 0x?>"
    assert normalize_reason("\n\n  first  line \nsecond") == "first line"
    assert len(normalize_reason("x" * 1000)) <= 300
    assert normalize_reason("0/0: ___check_obj_id(L['m'], 140234) x") == normalize_reason(
        "0/0: ___check_obj_id(L['m'], 139999) x"
    )


def test_counters_json_round_trip_and_delta():
    earlier = CompileCounters(graphs=1, compiles=1, graph_signatures=["s1"], notes=["n"])
    later = CompileCounters(
        graphs=3,
        compiles=2,
        recompiles=1,
        graph_breaks=1,
        break_reasons=["b"],
        recompile_reasons=["r"],
        graph_signatures=["s1", "s2", "s3"],
        notes=["n"],
    )
    assert CompileCounters.from_json(later.to_json()) == later
    d = later.delta(earlier)
    assert (d.graphs, d.compiles, d.recompiles, d.graph_breaks) == (2, 1, 1, 1)
    assert d.graph_signatures == ["s2", "s3"] and d.break_reasons == ["b"] and d.notes == ["n"]
    with pytest.raises(ValueError):
        earlier.delta(later)
    with pytest.raises(ValueError):
        CompileCounters.from_json({"graphs": 1, "bogus": 2})
    with pytest.raises(ValueError):
        CompileCounters.from_json({"graphs": -1})
