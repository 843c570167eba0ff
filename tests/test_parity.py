"""Env parity: the fingerprint's keys, the mismatch table, and check_parity over a real store."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import torch

from hardening.errors import ParityError
from hardening.runtime.parity import build_fingerprint, check_parity, format_mismatch
from hardening.harness.profile import load_profile

from store_harness import run_ranks, side_channels

CPU = torch.device("cpu")


def _fingerprint(**kw: Any) -> dict[str, str]:
    profile = kw.pop("profile", None) or load_profile("cpu")
    return build_fingerprint(
        compile_cfg=kw.pop("compile_cfg", profile.compile),
        gates=profile.gates,
        parity=profile.parity,
        world_size=kw.pop("world_size", 2),
        backend=profile.world.backend,
        device=CPU,
        dtype=torch.float32,
        user_keys={**profile.fingerprint_keys(), **kw.pop("user_keys", {})},
        **kw,
    )


REQUIRED = (
    "compile.enabled",
    "compile.backend",
    "compile.fullgraph",
    "dynamo.disable",
    "effective.sdpa.backend",
    "world.size",
    "region.config_hash",
    "torch.version",
)


def test_fingerprint_has_the_keys_that_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARDENING_FAULT", "short_warmup:rank=1")
    fp = _fingerprint()
    for key in REQUIRED:
        assert key in fp, key
    assert fp["env.HARDENING_FAULT"] == json.dumps("short_warmup:rank=1")
    assert fp["compile.enabled"] == "true"
    assert fp["compile.backend"] == '"eager"'
    assert fp["world.size"] == "2"
    assert fp["torch.version"] == json.dumps(torch.__version__)
    assert all(isinstance(v, str) for v in fp.values())
    assert list(fp) == sorted(fp)


def test_fingerprint_without_the_fault_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARDENING_FAULT", raising=False)
    assert "env.HARDENING_FAULT" not in _fingerprint()


def test_fingerprint_excludes_per_rank_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-7")
    monkeypatch.setenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "/tmp/rank1")
    monkeypatch.setenv("TORCH_LOGS", "recompiles")  # behaviour-changing: compared
    fp = _fingerprint()
    assert not any(k in fp for k in ("env.RANK", "env.LOCAL_RANK", "env.TORCHELASTIC_RUN_ID", "env.TORCH_NCCL_DEBUG_INFO_TEMP_FILE"))
    assert fp["env.TORCH_LOGS"] == '"recompiles"'
    # The rank's own identity never leaks into the fingerprint by other means either.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _fingerprint() == fp


def test_settings_change_the_fingerprint() -> None:
    base = _fingerprint()
    profile = load_profile("cpu", {"region.dims.heads": 8})
    assert _fingerprint(profile=profile)["region.config_hash"] != base["region.config_hash"]
    eager = load_profile("cpu", {"compile.enabled": False})
    assert _fingerprint(compile_cfg=eager.compile)["compile.enabled"] == "false"
    assert _fingerprint(world_size=4)["world.size"] == "4"
    assert _fingerprint(user_keys={"model.id": 1})["model.id"] == "1"


@pytest.fixture
def flash_restored() -> Iterator[None]:
    before = torch.backends.cuda.flash_sdp_enabled()
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(before)


def test_disabling_flash_sdp_changes_the_effective_backend(flash_restored: None) -> None:
    torch.backends.cuda.enable_flash_sdp(True)
    with_flash = _fingerprint()
    torch.backends.cuda.enable_flash_sdp(False)
    without = _fingerprint()
    assert with_flash["effective.sdpa.backend"] != without["effective.sdpa.backend"]
    assert with_flash["effective.sdp.flash_enabled"] == "true" and without["effective.sdp.flash_enabled"] == "false"
    assert "unavailable" not in with_flash["effective.sdpa.backend"]


def test_parity_ignore_drops_exact_keys_and_patterns_and_is_itself_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("HARDENING_JOB_HOST", "node-3")
    monkeypatch.setenv("HARDENING_JOB_SLOT", "7")
    monkeypatch.setenv("HARDENING_OTHER", "x")
    plain = _fingerprint()
    assert {"env.NCCL_SOCKET_IFNAME", "env.HARDENING_JOB_HOST", "env.HARDENING_JOB_SLOT"} <= set(plain)
    assert plain["parity.ignore"] == "[]"
    profile = load_profile("cpu", {"parity.ignore": ["env.NCCL_SOCKET_IFNAME", "env.HARDENING_JOB_*"]})
    fp = _fingerprint(profile=profile)
    assert not {"env.NCCL_SOCKET_IFNAME", "env.HARDENING_JOB_HOST", "env.HARDENING_JOB_SLOT"} & set(fp)
    assert fp["env.HARDENING_OTHER"] == '"x"'  # only what the patterns name is dropped
    assert set(plain) - set(fp) == {"env.NCCL_SOCKET_IFNAME", "env.HARDENING_JOB_HOST", "env.HARDENING_JOB_SLOT"}
    # Ranks with different ignore lists compare different keys: the list itself is a key.
    assert json.loads(fp["parity.ignore"]) == ["env.HARDENING_JOB_*", "env.NCCL_SOCKET_IFNAME"]


# -- format_mismatch ------------------------------------------------------------------------


def test_format_mismatch_lists_only_differing_keys_one_column_per_rank() -> None:
    per_rank = [
        {"a.same": "1", "b.diff": '"x"', "c.same": "true"},
        {"a.same": "1", "b.diff": '"y"', "c.same": "true"},
        {"a.same": "1", "b.diff": '"x"', "c.same": "true", "d.extra": "3"},
    ]
    text = format_mismatch(per_rank)
    first, *table = text.splitlines()
    assert first == "ranks disagree on 2 fingerprint key(s): b.diff, d.extra"
    assert "a.same" not in text and "c.same" not in text
    header = table[0].split()
    assert header == ["key", "rank", "0", "rank", "1", "rank", "2"]
    row = next(line for line in table if line.startswith("b.diff")).split()
    assert row == ["b.diff", '"x"', '"y"', '"x"']
    row = next(line for line in table if line.startswith("d.extra")).split()
    assert row == ["d.extra", "<missing>", "<missing>", "3"]
    assert table[-1] == "(a key that legitimately differs per rank or host goes in the profile's parity.ignore)"


def test_format_mismatch_keeps_numeric_looking_values_verbatim() -> None:
    text = format_mismatch([{"torch.version": '"2.10"'}, {"torch.version": '"2.1"'}])
    assert '"2.10"' in text and '"2.1"' in text


# -- check_parity on two ranks (threads, real TCPStore) ---------------------------------------


@pytest.mark.timeout(60)
def test_equal_fingerprints_pass_on_both_ranks(store_port: int) -> None:
    fp = _fingerprint()
    out = run_ranks(side_channels(store_port, 2), lambda side: check_parity(side, dict(fp)))
    assert out == {0: None, 1: None}


@pytest.mark.timeout(60)
def test_one_differing_key_raises_parity_error_on_both_ranks(store_port: int) -> None:
    fp = _fingerprint()
    eager = load_profile("cpu", {"compile.enabled": False}).compile
    fps = {0: fp, 1: _fingerprint(compile_cfg=eager)}
    out = run_ranks(side_channels(store_port, 2), lambda side: check_parity(side, fps[side.rank]))
    for rank in (0, 1):
        exc = out[rank]
        assert isinstance(exc, ParityError), f"rank {rank}: {exc!r}"
        msg = str(exc)
        assert msg.startswith("ranks disagree on 1 fingerprint key(s): compile.enabled")
        row = next(line for line in msg.splitlines() if line.startswith("compile.enabled")).split()
        assert row == ["compile.enabled", "true", "false"]
    assert str(out[0]) == str(out[1])


def test_the_runtime_keys_a_user_may_not_take_are_exactly_the_fingerprints_own() -> None:
    from hardening.runtime.parity import RUNTIME_KEYS, check_user_keys

    static = {k for k in _fingerprint() if not k.startswith(("env.", "effective."))}
    harness = set(load_profile("cpu").fingerprint_keys())  # the harness is a user: its keys are its own
    assert static - harness == RUNTIME_KEYS
    for key in ("compile.enabled", "env.NCCL_ALGO", "effective.sdpa.backend"):
        with pytest.raises(ValueError, match=f"fingerprint keys \\['{key}'\\] are the runtime's own"):
            check_user_keys({key: 1})
    check_user_keys({"model.id": "m", "region.seed": 0})
