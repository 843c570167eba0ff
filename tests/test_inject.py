"""Faults: spec parsing and validation, the registry, and real install/uninstall patches."""

from __future__ import annotations

import importlib
import os
from typing import Iterator

import pytest
import torch
from torch import nn

import hardening.runtime.seams
from hardening.inject import (
    ENV_VAR,
    FAULTS,
    Fault,
    FaultContext,
    FaultSpecError,
    fault_class,
    install_from_env,
    parse_spec,
    validate_spec,
)
from hardening.harness.profile import load_profile
from hardening.harness.region import Region

CPU = torch.device("cpu")

# -- parse_spec -------------------------------------------------------------------------


def test_parse_name_only() -> None:
    spec = parse_spec("short_warmup")
    assert spec.name == "short_warmup"
    assert spec.ranks is None and spec.all_ranks is False and spec.params == {}
    assert spec.text == "short_warmup"


def test_parse_one_rank() -> None:
    spec = parse_spec("compile_one_rank:rank=1")
    assert spec.name == "compile_one_rank" and spec.ranks == (1,) and not spec.all_ranks


def test_parse_several_ranks() -> None:
    assert parse_spec("recompile:rank=0+1").ranks == (0, 1)


def test_parse_all_ranks() -> None:
    spec = parse_spec("graph_break:rank=all")
    assert spec.all_ranks is True and spec.ranks is None


def test_parse_extra_params() -> None:
    spec = parse_spec("  recompile:rank=1:call=3  ")
    assert spec.ranks == (1,)
    assert spec.params == {"call": "3"}
    assert spec.text == "recompile:rank=1:call=3"


@pytest.mark.parametrize(
    "text, why",
    [
        ("recompile:rank", "not key=value"),
        ("recompile:=1", "not key=value"),
        ("recompile:call=", "not key=value"),
        ("recompile:rank=one", "rank must be"),
        ("recompile:rank=1+", "rank must be"),
        ("", "empty"),
        (":rank=1", "empty"),
    ],
)
def test_malformed_specs_raise(text: str, why: str) -> None:
    with pytest.raises(FaultSpecError, match=why):
        parse_spec(text)


def test_fault_spec_error_is_a_value_error() -> None:
    assert issubclass(FaultSpecError, ValueError)


# -- registry and validate_spec ---------------------------------------------------------


def test_unknown_fault_lists_every_known_fault() -> None:
    with pytest.raises(FaultSpecError) as info:
        fault_class("nosuch_fault")
    msg = str(info.value)
    assert "'nosuch_fault'" in msg
    for name in FAULTS:
        assert name in msg
    with pytest.raises(FaultSpecError, match="known faults"):
        validate_spec("nosuch_fault:rank=1", world_size=2)


def test_validate_spec_accepts_good_specs() -> None:
    spec = validate_spec("recompile:rank=1:call=3", world_size=2)
    assert spec.name == "recompile" and spec.ranks == (1,) and spec.params == {"call": "3"}
    assert validate_spec("graph_break:rank=all", world_size=4).all_ranks


def test_validate_spec_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(FaultSpecError, match="rank 2 does not exist with 2 ranks"):
        validate_spec("compile_one_rank:rank=2", world_size=2)
    with pytest.raises(FaultSpecError, match="rank 3"):
        validate_spec("compile_one_rank:rank=0+3", world_size=2)
    # The default rank of a fault (1) must exist too.
    with pytest.raises(FaultSpecError, match="rank 1"):
        validate_spec("short_warmup", world_size=1)


def test_validate_spec_rejects_an_unknown_parameter() -> None:
    with pytest.raises(FaultSpecError) as info:
        validate_spec("short_warmup:rank=1:calls=2", world_size=2)
    msg = str(info.value)
    assert "calls" in msg and "short_warmup" in msg


def test_validate_spec_rejects_a_non_integer_parameter() -> None:
    with pytest.raises(FaultSpecError, match="call must be an integer"):
        validate_spec("recompile:rank=1:call=three", world_size=2)


def test_every_suite_fault_spec_validates() -> None:
    from hardening.suites import get_suite

    specs = [c.fault for c in get_suite("all") if c.fault]
    assert specs
    for text in specs:
        validate_spec(text, world_size=2)


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_registered_fault_is_complete_and_targets_a_real_function(name: str) -> None:
    cls = FAULTS[name]
    assert issubclass(cls, Fault)
    assert cls.name == name
    for attr in ("matrix_id", "summary", "target"):
        value = getattr(cls, attr)
        assert isinstance(value, str) and value.strip(), f"{name}.{attr} empty"
    module_name, sep, attr = cls.target.partition(":")
    assert sep, cls.target
    target = getattr(importlib.import_module(module_name), attr)
    assert callable(target)
    assert cls.wrap is not Fault.wrap, f"{name} does not implement wrap"


def test_matrix_ids_are_unique() -> None:
    ids = [cls.matrix_id for cls in FAULTS.values()]
    assert len(ids) == len(set(ids))


# -- real patches -----------------------------------------------------------------------


class _Fired:
    def __init__(self) -> None:
        self.calls: list[tuple[Fault, float | None]] = []

    def __call__(self, fault: Fault) -> None:
        self.calls.append((fault, fault.fired_at))


@pytest.fixture
def installed() -> Iterator[list[Fault]]:
    """Faults appended here are uninstalled after the test, whatever happens."""
    faults: list[Fault] = []
    try:
        yield faults
    finally:
        for fault in reversed(faults):
            fault.uninstall()


def _install(installed: list[Fault], text: str, *, rank: int, world_size: int = 2, warmup_calls: int = 2):
    fired = _Fired()
    spec = parse_spec(text)
    fault = fault_class(spec.name)(spec, FaultContext(rank=rank, world_size=world_size, warmup_calls=warmup_calls, on_fire=fired))
    installed.append(fault)
    fault.install()
    return fault, fired


def test_install_replaces_the_function_and_uninstall_restores_the_same_object(installed: list[Fault]) -> None:
    original = hardening.runtime.seams.planned_warmup_calls
    fault, _ = _install(installed, "short_warmup:rank=1", rank=1)
    assert hardening.runtime.seams.planned_warmup_calls is not original
    fault.uninstall()
    assert hardening.runtime.seams.planned_warmup_calls is original
    fault.uninstall()  # a second uninstall is harmless
    assert hardening.runtime.seams.planned_warmup_calls is original


def test_short_warmup_acts_on_its_rank_and_fires_once(installed: list[Fault]) -> None:
    profile = load_profile("premerge")
    fault, fired = _install(installed, "short_warmup:rank=1", rank=1, warmup_calls=profile.warmup_calls)
    assert fault.fired_at is None
    assert hardening.runtime.seams.planned_warmup_calls(profile.warmup_calls) == profile.warmup_calls - 1
    assert hardening.runtime.seams.planned_warmup_calls(profile.warmup_calls) == profile.warmup_calls - 1
    assert len(fired.calls) == 1
    who, at = fired.calls[0]
    assert who is fault and isinstance(at, float) and at > 0
    assert fault.fired_at == at


def test_short_warmup_leaves_other_ranks_alone(installed: list[Fault]) -> None:
    profile = load_profile("premerge")
    fault, fired = _install(installed, "short_warmup:rank=1", rank=0, warmup_calls=profile.warmup_calls)
    assert hardening.runtime.seams.planned_warmup_calls(profile.warmup_calls) == profile.warmup_calls
    assert fired.calls == [] and fault.fired_at is None


def test_compile_one_rank_flips_enabled_only_on_its_rank(installed: list[Fault]) -> None:
    profile = load_profile("cpu")
    assert profile.compile.enabled is True
    fault, fired = _install(installed, "compile_one_rank:rank=1", rank=1)
    cfg = hardening.runtime.seams.resolve_compile_config(profile.compile)
    assert cfg.enabled is False
    assert (cfg.backend, cfg.fullgraph) == (profile.compile.backend, profile.compile.fullgraph)
    assert profile.compile.enabled is True  # the profile itself is not mutated
    assert len(fired.calls) == 1 and fault.fired_at is not None
    fault.uninstall()
    assert hardening.runtime.seams.resolve_compile_config(profile.compile).enabled is True


def test_compile_one_rank_on_another_rank_is_the_original(installed: list[Fault]) -> None:
    profile = load_profile("cpu")
    fault, fired = _install(installed, "compile_one_rank:rank=1", rank=0)
    assert hardening.runtime.seams.resolve_compile_config(profile.compile) == profile.compile
    assert fired.calls == [] and fault.fired_at is None


def _tiny_region() -> Region:
    def make_inputs(call_id: int) -> tuple[torch.Tensor, ...]:
        return (torch.arange(16, dtype=torch.float32).reshape(4, 4) + call_id,)

    return Region(module=nn.Identity(), make_inputs=make_inputs)


def _received(region, call_id: int):
    """What every rank computes on after an envelope arrived (the C-03 seam)."""
    tensors = {"input0": region.make_inputs(call_id)[0]}
    return tuple(hardening.runtime.seams.call_inputs(tensors, call_id).values())


def test_recompile_changes_strides_at_the_chosen_call_only(installed: list[Fault]) -> None:
    region = _tiny_region()
    fault, fired = _install(installed, "recompile:rank=1:call=3", rank=1, warmup_calls=2)
    for call_id in range(6):
        expected = region.make_inputs(call_id)[0]
        (got,) = _received(region, call_id)
        assert got.shape == expected.shape
        assert torch.equal(got, expected)
        if call_id == 3:
            assert got.stride() != expected.stride()
            assert got.stride() == (8, 2)  # the last dimension's stride doubled
        else:
            assert got.stride() == expected.stride() == (4, 1)
    assert len(fired.calls) == 1
    assert fault.fired_at is not None


def test_recompile_defaults_to_the_first_steady_call(installed: list[Fault]) -> None:
    region = _tiny_region()
    fault, fired = _install(installed, "recompile:rank=1", rank=1, warmup_calls=3)
    strides = [_received(region, k)[0].stride() for k in range(5)]
    assert strides == [(4, 1), (4, 1), (4, 1), (8, 2), (4, 1)]
    assert len(fired.calls) == 1


def test_recompile_on_another_rank_never_fires(installed: list[Fault]) -> None:
    region = _tiny_region()
    fault, fired = _install(installed, "recompile:rank=1:call=3", rank=0)
    for call_id in range(6):
        (got,) = _received(region, call_id)
        assert got.stride() == (4, 1)
    assert fired.calls == [] and fault.fired_at is None


def test_backend_divergence_disables_flash_and_restores_it(installed: list[Fault]) -> None:
    before = torch.backends.cuda.flash_sdp_enabled()
    try:
        torch.backends.cuda.enable_flash_sdp(True)
        fault, fired = _install(installed, "backend_divergence:rank=1", rank=1)
        hardening.runtime.seams.apply_backend_settings(CPU, torch.float32)
        assert torch.backends.cuda.flash_sdp_enabled() is False
        assert len(fired.calls) == 1
        fault.uninstall()
        assert torch.backends.cuda.flash_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_flash_sdp(before)


def test_backend_divergence_on_another_rank_keeps_flash(installed: list[Fault]) -> None:
    before = torch.backends.cuda.flash_sdp_enabled()
    try:
        torch.backends.cuda.enable_flash_sdp(True)
        fault, fired = _install(installed, "backend_divergence:rank=1", rank=0)
        hardening.runtime.seams.apply_backend_settings(CPU, torch.float32)
        assert torch.backends.cuda.flash_sdp_enabled() is True
        assert fired.calls == []
    finally:
        torch.backends.cuda.enable_flash_sdp(before)


def test_graph_break_wraps_the_module_about_to_be_compiled(installed: list[Fault]) -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    fault, fired = _install(installed, "graph_break:rank=all", rank=0)
    assert hardening.runtime.seams.module_to_compile(module) is module  # the caller's module stays theirs
    assert len(fired.calls) == 1
    # The instance forward is the wrapper; the class forward is untouched and gives the same result.
    assert "forward" in vars(module)
    x = torch.ones(2, 4)
    assert torch.equal(module(x), nn.Linear.forward(module, x))
    fault.uninstall()
    clean = torch.nn.Linear(4, 4)
    assert hardening.runtime.seams.module_to_compile(clean) is clean and "forward" not in vars(clean)


def test_graph_break_wraps_a_plain_function_too(installed: list[Fault]) -> None:
    _install(installed, "graph_break:rank=all", rank=0)
    fn = hardening.runtime.seams.module_to_compile(lambda x: x * 2)
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))


def test_install_from_env(installed: list[Fault], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert install_from_env(FaultContext(rank=1, world_size=2, warmup_calls=2)) is None
    monkeypatch.setenv(ENV_VAR, "short_warmup:rank=1")
    original = hardening.runtime.seams.planned_warmup_calls
    fault = install_from_env(FaultContext(rank=1, world_size=2, warmup_calls=2))
    assert fault is not None
    installed.append(fault)
    assert fault.name == "short_warmup"
    assert hardening.runtime.seams.planned_warmup_calls is not original
    assert hardening.runtime.seams.planned_warmup_calls(load_profile("cpu").warmup_calls) == 1


# -- strict specs: every key once, distinct ranks, a call that happens ---------------------


@pytest.mark.parametrize(
    "text, why",
    [
        ("stall:rank=1:rank=0", "rank is given twice"),
        ("stall:call=3:call=4", "call is given twice"),
        ("stall:rank=0+0", "names a rank twice"),
        ("stall:rank=-1", "negative"),
    ],
)
def test_specs_that_could_never_mean_one_thing_are_refused(text: str, why: str) -> None:
    with pytest.raises(FaultSpecError, match=why):
        parse_spec(text)


@pytest.mark.parametrize("call", ["-3", "6", "99999999999"])
def test_a_call_that_never_happens_is_refused_when_the_calls_are_known(call: str) -> None:
    with pytest.raises(FaultSpecError, match=f"call={call} never happens: calls 0..5 run"):
        validate_spec(f"stall:call={call}", world_size=2, calls=6)


def test_the_last_call_is_a_call_that_happens() -> None:
    assert validate_spec("stall:call=5", world_size=2, calls=6).params == {"call": "5"}


@pytest.mark.parametrize("inherited", [None, "0", "1", "yes"])
def test_the_gating_flag_differs_from_what_the_rank_inherited(
    installed: list[Fault], monkeypatch: pytest.MonkeyPatch, inherited: str | None
) -> None:
    variable = "HARDENING_NAN_CHECK_ALLREDUCE"
    if inherited is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, inherited)
    fault, fired = _install(installed, "collective_gating_flag:rank=1", rank=1)
    hardening.runtime.seams.apply_backend_settings(CPU, torch.float32)
    assert os.environ.get(variable) != inherited and len(fired.calls) == 1
    fault.uninstall()
    assert os.environ.get(variable) == inherited


# -- faults judge the region they run on: what they touched, or why they cannot apply -------


def test_restrided_works_for_token_ids_and_refuses_all_ones() -> None:
    from hardening.inject.compile import restrided

    ids = torch.arange(7).reshape(1, 7)
    other = restrided(ids)
    assert other is not None and torch.equal(other, ids) and other.stride() == (14, 2)
    assert restrided(torch.ones(1, 1)) is None


def test_recompile_names_the_tensor_it_restrided_and_skips_when_none_can_be(installed: list[Fault]) -> None:
    fault, fired = _install(installed, "recompile:rank=1", rank=1, warmup_calls=1)
    hardening.runtime.seams.call_inputs({"input_ids": torch.arange(5).reshape(1, 5)}, 1)
    assert fault.touched == "input_ids" and len(fired.calls) == 1
    fault.uninstall()
    skipped = []
    fault, _ = _install(installed, "recompile:rank=1", rank=1, warmup_calls=1)
    fault.ctx.on_skip = skipped.append
    hardening.runtime.seams.call_inputs({"scale": torch.ones(1)}, 1)
    assert fault.fired_at is None and fault.skipped and skipped == [fault]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_flip_low_bit_always_changes_the_tensor(dtype: torch.dtype) -> None:
    from hardening.inject.fault import flip_low_bit

    t = torch.full((4,), 0.5).to(dtype)
    before = t.clone()
    flip_low_bit(t, 2)
    assert not torch.equal(t, before) and torch.equal(t[[0, 1, 3]], before[[0, 1, 3]])
