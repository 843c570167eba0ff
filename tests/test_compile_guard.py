"""The recompile guard: a recompile under it raises with its guard-failure text."""

from __future__ import annotations

import pytest

from compile_harness import EAGER, _x
from hardening.runtime.compile.backend import compile_region
from hardening.runtime.compile.guard import RecompileGuard


@pytest.mark.parametrize("mechanism", ["auto", "stance"])
def test_recompile_guard_raises(probe, mechanism):
    region = compile_region(lambda x: x.sum(0) * 3, EAGER, probe)
    x = _x()
    region(x)
    guard = RecompileGuard(mechanism=mechanism)
    with pytest.raises(RuntimeError) as info:
        with guard:
            region(x)  # a cache hit passes under the guard
            region(x.t())
    assert guard.mechanism == ("config" if mechanism == "auto" else "stance")
    reason = RecompileGuard.reason(info.value)
    assert reason is not None and "stride" in reason
    assert RecompileGuard.reason(RuntimeError("something else")) is None
    # The guard is gone after the block: the recompile is allowed again.
    region(x.t())
    assert probe.counters().recompiles >= 1


def test_recompile_guard_rejects_unknown_mechanism():
    with pytest.raises(ValueError):
        RecompileGuard(mechanism="bogus")
