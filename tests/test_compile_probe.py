"""The compile probe against real torch.compile (backend eager, CPU): graphs, compiles,
recompiles and breaks with their reasons, checked against torch's own ground truth."""

from __future__ import annotations

import time

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters as dynamo_counters

from compile_harness import EAGER, _x
from hardening.runtime.compile.backend import compile_region
from hardening.runtime.compile.counters import CompileCounters, local_gate_problems
from hardening.runtime.compile.probe import CompileProbe, graph_break_from_exception
from hardening.runtime.config import CompileConfig, GateConfig

GATES = GateConfig()


def test_clean_function(probe):
    def clean(x):
        return x.sin() + 1

    compile_region(clean, EAGER, probe)(_x())
    c = probe.counters()
    assert (c.graphs, c.compiles, c.recompiles, c.graph_breaks) == (1, 1, 0, 0)
    assert c.skip_reasons == [] and c.break_reasons == []
    assert len(c.graph_signatures) == 1
    assert local_gate_problems(c, GATES, compiled=True) == []


def test_call_like_break(probe):
    def broken(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    compile_region(broken, EAGER, probe)(_x())
    c = probe.counters()
    assert c.graph_breaks == 1
    assert c.graphs == 2 and c.compiles == 2 and c.recompiles == 0  # the resume frame is a new frame
    assert "graph_break" in c.break_reasons[0]
    problems = local_gate_problems(c, GATES, compiled=True)
    assert len(problems) == 1 and problems[0].startswith("1 graph break(s) > max 0")
    assert local_gate_problems(c, GateConfig(max_graph_breaks=1), compiled=True) == []


def test_data_dependent_branch_counted(probe):
    def branchy(x):
        y = x.sin()
        if y.sum() > 0:
            return y.cos()
        return y.tan()

    compile_region(branchy, EAGER, probe)(_x())
    c = probe.counters()
    # The naive counter misses this kind of break in every torch 2.8 to 2.15.
    assert sum(dynamo_counters["graph_break"].values()) == 0
    assert c.graph_breaks == 1
    assert c.skip_reasons == []
    assert local_gate_problems(c, GATES, compiled=True)


def test_break_in_loop_skips_frame(probe, capsys):
    def loop(x):
        for _ in range(3):
            x = x + 1
            print("side effect")
        return x

    out = compile_region(loop, EAGER, probe)(_x())
    assert out.shape == (4, 4)  # ran eagerly
    c = probe.counters()
    assert c.graphs == 0 and c.graph_breaks == 0  # every break counter says "fine"
    assert c.compiles == 1
    assert c.skip_reasons and "loop" in c.skip_reasons[0]
    problems = local_gate_problems(c, GATES, compiled=True)
    assert problems and problems[0].startswith("nothing was compiled: Dynamo skipped the frame (")
    assert "loop" in problems[0]
    # Run eagerly on purpose: nothing compiled is then not a problem.
    assert local_gate_problems(CompileCounters(), GATES, compiled=False) == []


def test_print_first_statement(probe, capsys):
    def first(x):
        print("hello")
        return x.sin()

    compile_region(first, EAGER, probe)(_x())
    c = probe.counters()
    # explain() reports 0 breaks here (graph_count - 1 with an empty prefix graph).
    assert c.graphs == 1
    assert c.graph_breaks == 1
    assert "print" in c.break_reasons[0] or "builtin" in c.break_reasons[0]
    assert local_gate_problems(c, GATES, compiled=True)


def test_fullgraph_break_raises_with_reason(probe):
    def broken(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    region = compile_region(broken, CompileConfig(backend="eager", fullgraph=True), probe)
    with pytest.raises(Exception) as info:
        region(_x())
    reason = graph_break_from_exception(info.value)
    assert reason is not None and "graph_break" in reason
    wrapped = RuntimeError("region failed")
    wrapped.__cause__ = info.value
    assert graph_break_from_exception(wrapped) == reason
    assert graph_break_from_exception(ValueError("not a break")) is None
    assert probe.counters().graphs == 0


def test_recompile_counted_without_guard(probe):
    region = compile_region(lambda x: x.sum(0) * 3, EAGER, probe)
    x = _x()
    region(x)
    before = probe.counters()
    region(x.t())
    c = probe.counters()
    assert (c.compiles, c.recompiles, c.graphs) == (2, 1, 2)
    # One recompile, one reason: metrics and guard_failures report it twice, counted once.
    assert len(c.recompile_reasons) == 1 and "stride" in c.recompile_reasons[0]
    d = c.delta(before)
    assert (d.compiles, d.recompiles, d.graphs) == (1, 1, 1)
    assert d.recompile_reasons == c.recompile_reasons[len(before.recompile_reasons) :]


def test_probe_requires_install_and_remove_is_idempotent():
    p = CompileProbe()
    with pytest.raises(ValueError):
        p.counters()
    torch._dynamo.reset()
    p.install()
    with pytest.raises(ValueError):
        p.install()
    p.remove()
    p.remove()
    assert p.counters().compiles == 0


def test_reset_after_install_is_noted():
    torch._dynamo.reset()
    p = CompileProbe()
    p.install()
    torch._dynamo.reset()  # the mistake the docs warn about
    notes = p.counters().notes
    assert any("start callback was cleared" in n for n in notes)
    p.remove()


def test_fallbacks_when_private_apis_are_missing(monkeypatch, capsys):
    # Simulate an older/newer torch that lacks the start callback and graph_break_reasons:
    # the probe must keep counting from weaker signals and say so in notes.
    from torch._dynamo.callback import CompilationCallbackHandler

    torch._dynamo.reset()
    dynamo_counters.clear()
    monkeypatch.delattr(CompilationCallbackHandler, "register_start_callback")
    monkeypatch.setattr(torch._dynamo.utils, "graph_break_reasons", None)
    p = CompileProbe()
    p.install()

    def broken(x):
        y = x.sin()
        print("break")
        return y.cos()

    compile_region(broken, EAGER, p)(_x())
    c = p.counters()
    p.remove()
    torch._dynamo.reset()
    assert c.graphs == 2
    assert c.compiles == 2  # from compilation metrics
    assert c.graph_breaks == 1  # from counters["graph_break"] (a call-like break)
    assert any("start callback unavailable" in n for n in c.notes)
    assert any("graph_break_reasons unavailable" in n for n in c.notes)


def _call_like(x):
    y = x + 1
    torch._dynamo.graph_break()
    return y * 2


def _printer(x):
    y = x + 1
    print("hello from the region")
    return y * 2


def _data_dependent(x):
    y = x + 1
    if y.sum() > 0:
        return y * 2
    return y - 1


def _item_in_branch(x):
    y = x + 1
    if y.sum().item() > 0:
        return y * 2
    return y - 1


def _break_in_loop(x):
    for _ in range(3):
        x = x + 1
        torch._dynamo.graph_break()
    return x


def _two_clock_reads(x):
    y = x + 1
    t0 = time.time()
    z = y * 2
    t1 = time.time()
    return z + (t1 - t0)


def _untraceable_builtin(x):
    import os

    y = x + 1
    os.getpid()
    return y * 2


# (function, what the reason must say, whether fullgraph raises UserError rather than Unsupported)
KINDS = [
    (_call_like, "graph_break()", False),
    (_printer, "`print`", False),
    (_data_dependent, "Data-dependent branching", False),
    (_item_in_branch, "Tensor.item()", True),
    (_break_in_loop, None, False),  # the frame is skipped: explain() says -1
    (_two_clock_reads, "time.time", False),
    (_untraceable_builtin, "getpid", False),
]


@pytest.mark.parametrize("fn, says, user_error", KINDS, ids=[k[0].__name__.strip("_") for k in KINDS])
def test_breaks_match_torch_explain_and_name_the_users_line(fn, says, user_error, capsys) -> None:
    x = torch.ones(4)
    torch._dynamo.reset()
    truth = torch._dynamo.explain(fn)(x)  # resets Dynamo itself: never inside a probed run
    torch._dynamo.reset()
    dynamo_counters.clear()
    p = CompileProbe()
    p.install()
    try:
        compiled = compile_region(fn, EAGER, p)
        compiled(x)
        compiled(x)  # a second call (warmup) must not count the same sites again
        c = p.counters()
    finally:
        p.remove()
        torch._dynamo.reset()
    line = fn.__code__.co_firstlineno
    if truth.graph_break_count < 0:  # the loop case: no graph, one skipped frame
        assert (c.graphs, c.graph_breaks, len(c.skip_reasons)) == (0, 0, 1)
        assert local_gate_problems(c, GATES, compiled=True)  # the gate still fails it
    else:
        assert c.graph_breaks == truth.graph_break_count == len(c.break_reasons)
        for reason in c.break_reasons:
            assert says in reason and "test_compile_probe.py:" in reason
            assert line < int(reason.rsplit("test_compile_probe.py:", 1)[1].split()[0]) <= line + 8
    # Under fullgraph the same break raises; the reason names it and the user's line.
    with pytest.raises(Exception) as info:
        compile_region(fn, CompileConfig(backend="eager", fullgraph=True), CompileProbe())(x)
    torch._dynamo.reset()
    assert type(info.value).__name__ == ("UserError" if user_error else "Unsupported")
    reason = graph_break_from_exception(info.value)
    assert reason is not None and "test_compile_probe.py:" in reason, reason
    if says and not user_error:
        assert says in reason
