"""The counting backend: compile configs, inner backends and their modes."""

from __future__ import annotations

import pytest

from compile_harness import _x
from hardening.runtime.compile.backend import compile_region, counting_backend
from hardening.runtime.config import CompileConfig


def test_compile_region_disabled_and_backend_validation(probe):
    def fn(x):
        return x + 1

    assert compile_region(fn, CompileConfig(enabled=False), probe) is fn
    with pytest.raises(ValueError):
        counting_backend(probe, "cudagraphs")
    with pytest.raises(ValueError):
        counting_backend(probe, "inductor", mode="no-such-mode")
    assert callable(counting_backend(probe, "inductor", mode="max-autotune-no-cudagraphs"))
    counting_backend(probe, "eager", mode="max-autotune-no-cudagraphs")
    assert any("ignored" in n for n in probe.counters().notes)


def test_aot_eager_counts_graph(probe):
    compile_region(lambda x: x.cos() * 2, CompileConfig(backend="aot_eager"), probe)(_x())
    c = probe.counters()
    assert (c.graphs, c.compiles, c.graph_breaks) == (1, 1, 0)
