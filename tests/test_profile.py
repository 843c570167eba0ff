"""Profiles: shipped files load and validate, precedence, and errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hardening.harness.profile import (
    CompileConfig,
    Profile,
    ProfileError,
    RegionConfig,
    TimeoutConfig,
    WorldConfig,
    available_profiles,
    load_profile,
    profile_to_dict,
)

SHIPPED = ("cpu", "premerge", "h200", "gpu1-nccl", "gpu2-gloo-cuda")


def _write(tmp_path: Path, text: str, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(spec: str, overrides: dict | None = None) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(spec, overrides)
    return str(info.value)


# -- shipped profiles ----------------------------------------------------------------


def test_available_profiles_lists_every_shipped_file() -> None:
    assert set(SHIPPED) <= set(available_profiles())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_validates(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.source == f"profiles/{name}.yaml"
    # load_profile validated already; validate again section by section explicitly.
    profile.validate()
    for section in (profile.world, profile.region, profile.compile, profile.timeouts):
        section.validate()
    assert profile.world.ranks >= 1
    assert profile.warmup_calls >= 1


def test_shipped_profiles_hold_their_documented_values() -> None:
    cpu = load_profile("cpu")
    assert (cpu.world.backend, cpu.world.device, cpu.compile.backend, cpu.compile.fullgraph) == ("gloo", "cpu", "eager", False)
    assert cpu.region.dims == {"hidden": 64, "heads": 4, "tokens": 8, "cache": 16, "mlp": 256, "batch": 1}
    h200 = load_profile("h200")
    assert (h200.world.backend, h200.world.device, h200.region.dtype) == ("nccl", "cuda", "bfloat16")
    assert h200.compile.mode == "max-autotune-no-cudagraphs"
    assert h200.timeouts.setup == 600.0 and isinstance(h200.timeouts.setup, float)


def test_default_profile_is_cpu() -> None:
    assert profile_to_dict(load_profile(None)) == profile_to_dict(load_profile("cpu"))


# -- precedence ----------------------------------------------------------------------


def test_profile_overrides_defaults_only_where_it_names_keys() -> None:
    defaults = Profile()
    premerge = load_profile("premerge")
    # named in premerge.yaml
    assert premerge.compile.backend == "aot_eager" and defaults.compile.backend == "eager"
    assert premerge.compile.fullgraph is True and defaults.compile.fullgraph is False
    assert premerge.warmup_calls == 3 and defaults.warmup_calls == 2
    assert premerge.steps == 6
    # not named: the built-in defaults stay
    assert premerge.world.ranks == WorldConfig().ranks == 2
    assert premerge.region.dims == RegionConfig().dims
    assert premerge.timeouts.pg == TimeoutConfig().pg


def test_overrides_beat_the_profile_and_keep_the_rest() -> None:
    profile = load_profile("premerge", {"world.ranks": 4})
    assert profile.world.ranks == 4
    assert profile.compile.fullgraph is True
    assert profile.compile.backend == "aot_eager"


def test_override_of_one_dim_keeps_the_other_dims() -> None:
    profile = load_profile("cpu", {"region.dims.heads": 8, "compile.fullgraph": True, "timeouts.pg": 5})
    assert profile.region.dims["heads"] == 8
    assert profile.region.dims["hidden"] == 64
    assert profile.compile.fullgraph is True
    assert profile.timeouts.pg == 5.0 and isinstance(profile.timeouts.pg, float)


def test_profile_file_by_path_merges_partial_sections(tmp_path: Path) -> None:
    path = _write(tmp_path, "world:\n  ranks: 3\ncompile:\n  mode: null\n  dynamic: null\n", "mine.yaml")
    profile = load_profile(path)
    assert profile.name == "mine" and profile.source == path
    assert profile.world.ranks == 3
    assert profile.world.backend == "gloo"  # default kept
    assert profile.compile.mode is None and profile.compile.dynamic is None


def test_empty_profile_file_is_the_defaults(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, "", "empty.yaml"))
    assert profile_to_dict(profile) | {"name": "", "source": ""} == profile_to_dict(Profile()) | {"name": "", "source": ""}


# -- errors name the file and the dotted key ------------------------------------------


def test_unknown_nested_key_names_file_and_dotted_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "compile:\n  fullgrph: true\n")
    msg = _error(path)
    assert path in msg
    assert "'compile.fullgrph'" in msg
    assert "fullgraph" in msg  # the known keys are listed


def test_unknown_deeper_key_names_the_full_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "timeouts:\n  setup: 10\n  detcet: 3\n")
    msg = _error(path)
    assert path in msg and "'timeouts.detcet'" in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "warmup: 3\n")
    msg = _error(path)
    assert path in msg and "'warmup'" in msg


def test_str_for_int_is_a_type_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "world:\n  ranks: '2'\n")
    msg = _error(path)
    assert path in msg and "'world.ranks'" in msg and "int" in msg and "str" in msg


def test_parity_ignore_is_a_list_of_str(tmp_path: Path) -> None:
    path = _write(tmp_path, "parity:\n  ignore: [env.NCCL_SOCKET_IFNAME, 'env.MY_*']\n")
    assert load_profile(path).parity.ignore == ["env.NCCL_SOCKET_IFNAME", "env.MY_*"]
    assert load_profile("cpu").parity.ignore == []
    for text in ("parity:\n  ignore: env.NCCL_SOCKET_IFNAME\n", "parity:\n  ignore: [1]\n"):
        msg = _error(_write(tmp_path, text))
        assert "'parity.ignore'" in msg and "a list of str" in msg, msg
    msg = _error(_write(tmp_path, "parity:\n  ignore: ['  ']\n"))
    assert "'parity.ignore'" in msg and "non-empty" in msg


def test_int_for_bool_is_a_type_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "compile:\n  fullgraph: 1\n")
    msg = _error(path)
    assert path in msg and "'compile.fullgraph'" in msg and "bool" in msg


def test_bool_for_float_is_a_type_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "timeouts:\n  detect: true\n")
    msg = _error(path)
    assert path in msg and "'timeouts.detect'" in msg


def test_scalar_for_section_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "world: 2\n")
    msg = _error(path)
    assert path in msg and "'world'" in msg and "mapping" in msg


def test_negative_timeout_is_a_bad_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "timeouts:\n  setup: -1\n")
    msg = _error(path)
    assert path in msg and "'timeouts.setup'" in msg and "positive" in msg


def test_nccl_on_cpu_is_a_bad_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "world:\n  backend: nccl\n  device: cpu\n")
    msg = _error(path)
    assert path in msg and "'world.backend'" in msg and "cuda" in msg


@pytest.mark.parametrize("value", [0, -4])
def test_dims_must_be_positive(tmp_path: Path, value: int) -> None:
    path = _write(tmp_path, f"region:\n  dims: {{hidden: {value}}}\n")
    msg = _error(path)
    assert path in msg and "'region.dims.hidden'" in msg and "positive" in msg


def test_dims_must_be_integers(tmp_path: Path) -> None:
    path = _write(tmp_path, "region:\n  dims: {heads: four}\n")
    msg = _error(path)
    assert path in msg and "'region.dims.heads'" in msg


def test_top_level_warmup_calls_bad_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "warmup_calls: 0\n")
    msg = _error(path)
    assert path in msg and "'warmup_calls'" in msg


def test_peer_lost_must_exceed_two_heartbeats(tmp_path: Path) -> None:
    path = _write(tmp_path, "timeouts:\n  heartbeat: 1\n  peer_lost: 2\n")
    msg = _error(path)
    assert path in msg and "'timeouts.peer_lost'" in msg


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "- ranks: 2\n- backend: gloo\n")
    msg = _error(path)
    assert path in msg and "mapping" in msg


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "world: {ranks: 2\ncompile: [\n")
    msg = _error(path)
    assert path in msg and "YAML" in msg


def test_missing_file_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere" / "gone.yaml")
    msg = _error(path)
    assert path in msg and "not found" in msg


def test_unknown_profile_name_lists_shipped_ones() -> None:
    msg = _error("nope")
    assert "'nope'" in msg
    for name in SHIPPED:
        assert name in msg


def test_override_with_unknown_key_names_command_line() -> None:
    msg = _error("cpu", {"world.rnks": 4})
    assert "command line" in msg and "'world.rnks'" in msg


def test_override_with_wrong_type_names_command_line() -> None:
    msg = _error("cpu", {"world.ranks": "four"})
    assert "command line" in msg and "'world.ranks'" in msg


def test_override_with_bad_value_is_rejected() -> None:
    msg = _error("cpu", {"world.ranks": 0})
    assert "'world.ranks'" in msg and "at least 1" in msg


def test_override_with_bad_value_names_command_line() -> None:
    msg = _error("cpu", {"world.ranks": 0})
    assert "command line" in msg


def test_profile_error_is_a_value_error() -> None:
    assert issubclass(ProfileError, ValueError)
    # CompileConfig.validate is what catches an unknown backend
    with pytest.raises(ValueError):
        CompileConfig(backend="tensorrt").validate()


# -- hostile files and flags -------------------------------------------------------------


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_bad_values(tmp_path: Path, value: str) -> None:
    assert "key 'timeouts.setup' must be a finite number" in _error(_write(tmp_path, f"timeouts: {{setup: {value}}}\n"))


def test_timeouts_past_a_week_are_bad_values(tmp_path: Path) -> None:
    assert "key 'timeouts.pg' must be at most" in _error(_write(tmp_path, "timeouts: {pg: 100000000000}\n"))


def test_a_non_utf8_file_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"steps: 4\n# caf\xe9\n")
    assert _error(str(path)) == f"{path}: not UTF-8 text (byte 0xe9 at offset 14)"


def test_a_key_given_twice_names_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "steps: 2\nwarmup_calls: 1\nsteps: 3\n")
    assert _error(path) == f"{path}: key 'steps' is given twice (lines 1 and 3)"
    assert "key 'timeouts.setup' is given twice (lines 2 and 3)" in _error(_write(tmp_path, "timeouts:\n  setup: 5\n  setup: 6\n", "nested.yaml"))


def test_python_tags_are_not_constructed(tmp_path: Path) -> None:
    assert "not valid YAML" in _error(_write(tmp_path, "steps: !!python/object/apply:os.system [ls]\n"))


@pytest.mark.parametrize("text, key", [
    ("gates: {max_graph_breaks: -1}\n", "gates.max_graph_breaks"),
    ("gates: {max_recompiles: -1}\n", "gates.max_recompiles"),
    ("triage: {timeout: 0}\n", "triage.timeout"),
    ("world: {ranks: 65}\n", "world.ranks"),
])  # fmt: skip
def test_negative_gates_zero_triage_timeout_and_too_many_ranks(tmp_path: Path, text: str, key: str) -> None:
    assert f"key {key!r}" in _error(_write(tmp_path, text))


def test_a_bad_flag_is_blamed_on_the_flag() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("cpu", {"world.ranks": 0}, flags={"world.ranks": "--ranks"})
    assert str(info.value) == "--ranks: key 'world.ranks' must be at least 1"

