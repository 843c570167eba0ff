"""The control-plane envelope: canonical JSON, preflight before commit, and real round
trips over a 2-rank gloo pair (``tests/procs/envelope_pair.py``, started once per session
through ``tests/procs/pairlib.py`` and shared with test_drift.py). On the pair every CALL
is the control frame, then its tensors."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
import torch

from hardening.runtime import envelope
from hardening.runtime.envelope import (
    CallContract,
    Channel,
    Envelope,
    Kind,
    TensorSpec,
    canonical_json,
    preflight,
)
from store_harness import pairlib

from hardening.errors import ContractError, PreflightError





# -- canonical JSON ---------------------------------------------------------------------


def test_canonical_json_is_sorted_and_compact() -> None:
    a = {"b": 1, "a": {"d": [1, 2.5, None], "c": "x"}, "e": True}
    b = {"e": True, "a": {"c": "x", "d": [1, 2.5, None]}, "b": 1}
    out = canonical_json(a, what="meta")
    assert out == b'{"a":{"c":"x","d":[1,2.5,null]},"b":1,"e":true}'
    assert canonical_json(b, what="meta") == out
    assert canonical_json((1, "\u00fc"), what="meta") == canonical_json([1, "\u00fc"], what="meta")


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ({"a": {"b": [1, float("nan")]}}, "meta.a.b[1]", "NaN/inf"),
        ({"x": float("inf")}, "meta.x", "inf"),
        ({"x": [0, -math.inf]}, "meta.x[1]", "-inf"),
        ({"cb": {"f": lambda: 1}}, "meta.cb.f", "function"),
        ({"s": {1, 2}}, "meta.s", "set"),
        ({"outer": {3: "three"}}, "meta.outer", "non-string key 3"),
        ({"outer": {(1, 2): "t"}}, "meta.outer", "non-string key (1, 2)"),
        ({"t": torch.zeros(1)}, "meta.t", "Tensor"),
    ],
)
def test_canonical_json_names_the_offending_key(value: Any, path: str, words: str) -> None:
    with pytest.raises(PreflightError) as info:
        canonical_json(value, what="meta")
    msg = str(info.value)
    assert msg.startswith(path + " "), msg
    assert words in msg


# -- preflight --------------------------------------------------------------------------

CONTRACT = CallContract(
    tensors=(TensorSpec(name="x", shape=(2, 3), dtype="float32"), TensorSpec(name="c", shape=(4,), dtype="bfloat16"))
)


def _channel(last: int = -1, contract: CallContract | None = CONTRACT) -> Channel:
    return Channel(control_group=None, data_group=None, device=torch.device("cpu"), contract=contract, last_call_id=last)


def _call(call_id: int = 0, **over: Any) -> Envelope:
    fields: dict[str, Any] = dict(
        kind=Kind.CALL,
        call_id=call_id,
        cache_epoch=1,
        plan={"expected_generator_calls": 1, "cache_op": "advance"},
        meta={"phase": "steady", "nested": {"k": [1, 2]}},
        tensors={"x": torch.ones(2, 3), "c": torch.ones(4, dtype=torch.bfloat16)},
    )
    fields.update(over)
    return Envelope(**fields)


def test_preflight_valid_call_returns_header_meta_specs() -> None:
    header, meta, specs = preflight(_call(5), _channel(last=4))
    assert meta == b'{"nested":{"k":[1,2]},"phase":"steady"}'
    assert header == (
        b'{"cache_epoch":1,"call_id":5,"plan":{"cache_op":"advance","expected_generator_calls":1},'
        b'"tensor_specs":[["x",[2,3],"float32"],["c",[4],"bfloat16"]]}'
    )
    assert specs == list(CONTRACT.tensors)


def test_preflight_call_id_must_follow_last() -> None:
    for call_id, last in ((7, 5), (5, 5), (3, 5), (1, -1)):
        with pytest.raises(PreflightError, match=rf"call_id {call_id} does not follow {last}"):
            preflight(_call(call_id), _channel(last=last))


def test_preflight_refuses_float64_by_dtype() -> None:
    env = _call(tensors={"x": torch.ones(2, 3, dtype=torch.float64), "c": torch.ones(4, dtype=torch.bfloat16)})
    with pytest.raises(PreflightError) as info:
        preflight(env, _channel())
    assert "'x'" in str(info.value) and "float64" in str(info.value)


def test_preflight_tensor_outside_the_contract_is_a_contract_error() -> None:
    env = _call(tensors={"x": torch.ones(2, 3), "c": torch.ones(4, dtype=torch.bfloat16), "extra": torch.ones(1)})
    with pytest.raises(ContractError) as info:
        preflight(env, _channel())
    assert "'extra'" in str(info.value)
    assert not isinstance(info.value, PreflightError)


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"tensors": {"x": torch.ones(2, 3)}}, "['c'] required by the call contract are missing"),
        ({"tensors": {"x": torch.ones(3, 2), "c": torch.ones(4, dtype=torch.bfloat16)}}, "'x' is (3, 2)/float32"),
        ({"tensors": {"x": torch.ones(2, 3), "c": torch.ones(4, dtype=torch.float16)}}, "'c' is (4,)/float16"),
        ({"plan": {"expected_generator_calls": 2, "cache_op": "advance"}}, "expected_generator_calls=2"),
        ({"plan": {"cache_op": "advance"}}, "expected_generator_calls=None"),
        ({"plan": {"expected_generator_calls": 1, "cache_op": "rewind"}}, "cache_op 'rewind'"),
        ({"plan": {"expected_generator_calls": 1}}, "cache_op None"),
        ({"plan": {"expected_generator_calls": 1, "cache_op": "recompute"}}, "meta.recompute_override"),
        ({"meta": {"bad": float("nan")}}, "meta.bad"),
    ],
)
def test_preflight_refusals(over: dict[str, Any], words: str) -> None:
    with pytest.raises(PreflightError) as info:
        preflight(_call(**over), _channel())
    assert words in str(info.value)


def test_preflight_recompute_with_override_passes() -> None:
    env = _call(plan={"expected_generator_calls": 1, "cache_op": "recompute"}, meta={"recompute_override": {"window": "full"}})
    header, meta, specs = preflight(env, _channel())
    assert b'"cache_op":"recompute"' in header and b"recompute_override" in meta and len(specs) == 2


def test_preflight_shutdown_needs_no_contract() -> None:
    env = Envelope(kind=Kind.SHUTDOWN, call_id=9, meta={"reason": "done"})
    header, meta, specs = preflight(env, _channel(last=3, contract=None))
    assert header == b'{"cache_epoch":0,"call_id":9,"plan":{}}'
    assert meta == b'{"reason":"done"}'
    assert specs == []
    # ... but its meta is still canonical JSON.
    with pytest.raises(PreflightError, match="meta.reason"):
        preflight(Envelope(kind=Kind.SHUTDOWN, call_id=9, meta={"reason": {1, 2}}), _channel(contract=None))


def test_preflight_refuses_tensors_in_another_order_than_the_contract() -> None:
    env = _call(tensors={"c": torch.ones(4, dtype=torch.bfloat16), "x": torch.ones(2, 3)})
    with pytest.raises((PreflightError, ContractError)):
        preflight(env, _channel())


# -- digest words in the frame ------------------------------------------------------------


def test_digest_words_survive_the_frame_encoding() -> None:
    # Checksum words are int64 and may be negative or use all 64 bits.
    words = [0, -1, 2**63 - 1, -(2**63), 12345, -987654321]
    raw = envelope._words_bytes(words)
    assert len(raw) == 8 * len(words)
    assert torch.frombuffer(bytearray(raw), dtype=torch.int64).tolist() == words
    assert envelope._words_bytes([]) == b""


# -- real round trips on 2 gloo ranks -----------------------------------------------------

pair_test = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["split", "fused"])
def pair(request: pytest.FixtureRequest) -> dict[int, dict[str, Any]]:
    """Every scenario, with the frame travelling alone before its tensors (device data
    planes) and fused with them in one buffer (host data planes)."""
    return pairlib().run_pair(request.param)


NEG_ZERO_F32 = struct.unpack("<i", struct.pack("<f", -0.0))[0]


def _same_call(s: dict[str, Any], g: dict[str, Any]) -> None:
    """What the follower decoded is what the leader sent, bit for bit."""
    assert g["kind"] == s["kind"] == "CALL"
    assert g["call_id"] == s["call_id"]
    assert g["blob_hex"] == s["blob_hex"] and g["blob_len"] == s["blob_len"] > 0
    assert g["meta"] == s["meta"] and g["plan"] == s["plan"] and g["cache_epoch"] == s["cache_epoch"]
    assert g["names"] == ["x", "c"]
    assert g["dtypes"] == {"x": "torch.float32", "c": "torch.bfloat16"}
    assert g["bits"] == s["bits"] and g["checksums"] == s["checksums"]
    assert g["bits_equal_to_source"] and s["bits_equal_to_source"]
    # An unchecked call carries no digest.
    assert g["digest_in_frame"] is None and s["digest_in_frame"] is None


@pair_test
def test_calls_round_trip_bit_identical(pair: dict[int, dict[str, Any]]) -> None:
    sent, got = pair[0]["roundtrip"], pair[1]["roundtrip"]
    assert sent["ok"] and got["ok"], (sent, got)
    assert [c["call_id"] for c in got["calls"]] == [0, 1, 2, 3]
    for s, g in zip(sent["calls"], got["calls"]):
        assert g["kind"] == "CALL"
        assert g["call_id"] == s["call_id"]
        assert g["blob_hex"] == s["blob_hex"] and len(g["blob_hex"]) > 0
        assert g["names"] == ["x", "c"]
        assert g["dtypes"] == {"x": "torch.float32", "c": "torch.bfloat16"}
        assert g["shapes"] == {"x": [2, 3], "c": [4]}
        assert g["bits"] == s["bits"]
        assert g["checksums"] == s["checksums"]
        assert g["bits_equal_to_source"] and s["bits_equal_to_source"]
        assert g["meta"] == s["meta"] and g["meta"]["nested"]["list"] == [1, 2.5, {"deep": None}]
        assert g["meta"]["nested"]["text"] == "\u00fc\u2192\u2713"
        assert g["plan"] == s["plan"] and g["cache_epoch"] == s["cache_epoch"] == 1
        assert g["bits"]["x"][1] == NEG_ZERO_F32  # -0.0 survives as -0.0, not 0.0
        assert g["digest_in_frame"] is None  # not a checked call
    # Call 1 carries a NaN: its payload arrives bit for bit too.
    nan_bits = got["calls"][1]["bits"]["x"][4]
    assert math.isnan(struct.unpack("<f", struct.pack("<i", nan_bits))[0])
    assert got["calls"][3]["plan"]["cache_op"] == "recompute"
    assert got["calls"][3]["meta"]["recompute_override"] == {"window": "full"}
    assert sent["last_call_id"] == got["last_call_id"] == 3
    # Fused, both ranks compute on views of the one buffer that travelled (the leader
    # too: on exactly the bytes its peers got), each slot on a cache line.
    fused = pair[0]["mode"] == "fused"
    for call in (*sent["calls"], *got["calls"]):
        assert call["storages"] == (1 if fused else 2)
        assert call["aligned"] or not fused


@pair_test
def test_shutdown_arrives_as_shutdown(pair: dict[int, dict[str, Any]]) -> None:
    s, g = pair[0]["shutdown"], pair[1]["shutdown"]
    assert s["ok"] and g["ok"], (s, g)
    assert g["kind"] == "SHUTDOWN" and g["call_id"] == 29
    assert g["meta"] == {"reason": "done"} and g["names"] == []
    assert g["blob_hex"] == s["blob_hex"]
    # A SHUTDOWN is not a CALL: it does not move the call counter, and the digest its
    # sender asked for is not sent.
    assert s["bare_last_call_id"] == g["bare_last_call_id"] == 28
    assert s["digest_in_frame"] is None and g["digest_in_frame"] is None


@pair_test
def test_preflight_failure_is_named_on_both_ranks(pair: dict[int, dict[str, Any]]) -> None:
    leader, follower = pair[0]["preflight_error"], pair[1]["preflight_error"]
    assert leader["error_class"] == "PreflightError" and "float64" in leader["message"]
    assert follower["error_class"] == "PeerError"
    assert follower["root_cause_rank"] == 0
    assert "PreflightError" in follower["message"] and "float64" in follower["message"]
    assert "call 7" in follower["message"]
    # Nothing was committed: neither rank moved its call counter.
    assert leader["last_call_id"] == follower["last_call_id"] == 6


@pair_test
def test_error_frame_keeps_the_frames_aligned(pair: dict[int, dict[str, Any]]) -> None:
    # The ERROR frame is one control frame on both sides, so the next
    # envelope decodes intact.
    s, g = pair[0]["after_error"], pair[1]["after_error"]
    assert s["ok"] and g["ok"], (s, g)
    assert g["call_id"] == 7
    _same_call(s, g)
    # And after every scenario both ranks still meet in a collective, on both groups.
    assert pair[0]["final_allreduce"] == pair[1]["final_allreduce"] == 3
    assert pair[0]["final_allreduce_control"] == pair[1]["final_allreduce_control"] == 3


@pair_test
def test_leader_contract_error_reaches_the_follower(pair: dict[int, dict[str, Any]]) -> None:
    leader, follower = pair[0]["leader_contract_error"], pair[1]["leader_contract_error"]
    assert leader["error_class"] == "ContractError" and "'y'" in leader["message"]
    assert follower["error_class"] == "PeerError" and follower["root_cause_rank"] == 0
    assert "ContractError" in follower["message"] and "'y'" in follower["message"]


@pair_test
def test_receiver_contract_lacking_a_tensor(pair: dict[int, dict[str, Any]]) -> None:
    leader, follower = pair[0]["receiver_contract"], pair[1]["receiver_contract"]
    assert leader["ok"] and leader["last_call_id"] == 8
    assert follower["error_class"] == "ContractError"
    assert "'c'" in follower["message"] and "not in the call contract" in follower["message"]
    assert follower["last_call_id"] == 7  # the refused call did not count


@pair_test
def test_call_id_gap_is_refused_before_commit(pair: dict[int, dict[str, Any]]) -> None:
    leader, follower = pair[0]["gap_preflight"], pair[1]["gap_preflight"]
    assert leader["error_class"] == "PreflightError"
    assert "call_id 9 does not follow 20" in leader["message"]
    assert leader["last_call_id"] == 20
    # Pre-commit: the follower got the ERROR frame, not a call.
    assert follower["error_class"] == "PeerError" and follower["root_cause_rank"] == 0
    assert "PreflightError" in follower["message"] and "call 9" in follower["message"]
    assert follower["last_call_id"] == 8


@pair_test
def test_receiver_names_a_skipped_call(pair: dict[int, dict[str, Any]]) -> None:
    leader, follower = pair[0]["gap_receiver"], pair[1]["gap_receiver"]
    assert leader["ok"] and leader["call_id"] == 21
    assert follower["error_class"] == "ContractError"
    assert "call_id 21 after 8" in follower["message"] and "skipped" in follower["message"]


@pair_test
def test_receiver_refuses_a_manifest_in_another_order(pair: dict[int, dict[str, Any]]) -> None:
    follower = pair[1]["order"]
    assert follower["error_class"] in ("ContractError", "PeerError"), follower
    assert "'c', 'x'" in follower["message"] or "PeerError" == follower["error_class"]


@pair_test
def test_order_mismatch_is_refused_before_commit(pair: dict[int, dict[str, Any]]) -> None:
    leader, follower = pair[0]["order"], pair[1]["order"]
    assert not leader["ok"] and leader["error_class"] in ("PreflightError", "ContractError"), leader
    assert follower["error_class"] == "PeerError" and follower["root_cause_rank"] == 0


@pair_test
def test_header_and_meta_longer_than_the_control_frame_round_trip(pair: dict[int, dict[str, Any]]) -> None:
    room = pair[0]["frame_room"]
    assert room == envelope.CONTROL_FRAME - 8 * envelope.PREFIX_LEN
    s, g = pair[0]["large_meta"], pair[1]["large_meta"]
    assert s["ok"] and g["ok"], (s, g)
    assert g["call_id"] == 23
    assert g["blob_len"] > 5000 > room  # the frame continued in a second broadcast
    assert g["meta"]["long"] == s["meta"]["long"] and len(g["meta"]["long"]) == 5000
    assert g["long_intact"] and g["meta"]["tail"] == "end"
    assert g["bits"] == s["bits"] and g["blob_hex"] == s["blob_hex"]


@pair_test
def test_control_frame_boundary(pair: dict[int, dict[str, Any]]) -> None:
    # Header+meta of exactly the room after the prefix, one byte more, one byte less.
    room = pair[0]["frame_room"]
    s, g = pair[0]["frame_boundary"], pair[1]["frame_boundary"]
    assert s["ok"] and g["ok"], (s, g)
    assert [c["blob_len"] for c in g["calls"]] == [room, room + 1, room - 1]
    for sc, gc in zip(s["calls"], g["calls"]):
        _same_call(sc, gc)
    assert [c["call_id"] for c in g["calls"]] == [24, 25, 26]


@pair_test
def test_error_frame_longer_than_the_control_frame(pair: dict[int, dict[str, Any]]) -> None:
    leader, follower = pair[0]["long_error"], pair[1]["long_error"]
    assert leader["error_class"] == "PreflightError"
    assert follower["error_class"] == "PeerError" and follower["root_cause_rank"] == 0
    # The reason is longer than one control frame and arrives whole.
    assert len(follower["message"]) > pair[0]["frame_room"]
    assert "meta." + "k" * 1500 + " is nan" in follower["message"]
    assert follower["message"].endswith("NaN/inf are not canonical JSON")
    assert "call 27" in follower["message"]


@pair_test
@pytest.mark.parametrize("poisoned", ["c", "x"])
def test_a_tensor_that_cannot_reach_the_device_is_refused_before_commit(
    pair: dict[int, dict[str, Any]], poisoned: str
) -> None:
    leader, follower = pair[0][f"unmovable_{poisoned}"], pair[1][f"unmovable_{poisoned}"]
    # The leader re-raises its own error (not a named cause: it is the root cause) ...
    assert leader["error_class"] == "RuntimeError" and "injected" in leader["message"]
    # ... after telling the follower in an ERROR frame, which names it and the call.
    assert follower["error_class"] == "PeerError" and follower["root_cause_rank"] == 0
    assert "RuntimeError: injected: tensor cannot reach the device" in follower["message"]
    assert "call 27" in follower["message"]
    # Staging precedes the commit: the call was not spent on either rank.
    assert leader["last_call_id"] == follower["last_call_id"] == 26


@pair_test
def test_frames_stay_aligned_after_a_refused_staging(pair: dict[int, dict[str, Any]]) -> None:
    s, g = pair[0]["after_unmovable"], pair[1]["after_unmovable"]
    assert s["ok"] and g["ok"], (s, g)
    assert g["call_id"] == 27
    _same_call(s, g)


# -- variable shapes: declared dims vary within bounds, nothing else does -------------------


def test_a_declared_dim_varies_within_its_bounds_and_nothing_else_does() -> None:
    want = TensorSpec(name="input_ids", shape=(1, 8), dtype="int64", varying=((1, 1, 32),))
    ok = [TensorSpec(name="input_ids", shape=(1, t), dtype="int64") for t in (1, 8, 9, 32)]
    assert [want.mismatch(s) for s in ok] == [None] * 4
    assert "dim 1 is 33, outside its declared 1..32" in want.mismatch(TensorSpec(name="input_ids", shape=(1, 33), dtype="int64"))
    assert "dim 0 is 2, fixed at 1" in want.mismatch(TensorSpec(name="input_ids", shape=(2, 8), dtype="int64"))
    assert "the contract says (1, 1..32)/int64" in want.mismatch(TensorSpec(name="input_ids", shape=(1, 8), dtype="int32"))
    assert "the contract says" in want.mismatch(TensorSpec(name="input_ids", shape=(1, 8, 1), dtype="int64"))
    # Without a declaration the contract is the sample's exact shape, as before.
    fixed = TensorSpec(name="x", shape=(2, 3), dtype="float32")
    assert fixed.mismatch(TensorSpec(name="x", shape=(2, 4), dtype="float32")) is not None


def test_varying_dims_are_checked_against_the_input() -> None:
    from hardening.harness.region import Region, varying_of

    reg = Region(module=torch.nn.Identity(), make_inputs=lambda k: (), varying_dims={"ids": {-1: (1, 16)}})
    assert varying_of(reg, "ids", 2) == ((1, 1, 16),)
    assert varying_of(reg, "other", 2) == ()
    with pytest.raises(ValueError, match="dim -1 does not exist"):
        varying_of(reg, "ids", 0)
    with pytest.raises(ValueError, match="must be 0 <= low <= high"):
        varying_of(Region(module=torch.nn.Identity(), make_inputs=lambda k: (), varying_dims={"ids": {0: (9, 2)}}), "ids", 1)


# -- the fused layout: one host buffer, frame then one aligned slot per tensor -------------


def test_host_layout_gives_each_tensor_an_aligned_slot_after_the_frame() -> None:
    layout = envelope.host_layout(CONTRACT, torch.device("cpu"))
    assert layout is not None
    sizes = [math.prod(s.shape) * torch.empty((), dtype=envelope.ALLOWED_DTYPES[s.dtype]).element_size() for s in CONTRACT.tensors]
    assert layout.offsets[0] >= envelope.CONTROL_FRAME
    assert all(o % 64 == 0 for o in layout.offsets)
    # Slots never overlap, and the buffer ends with the last one.
    for (start, size), nxt in zip(zip(layout.offsets, sizes), (*layout.offsets[1:], layout.size)):
        assert start + size <= nxt
    assert layout.size == layout.offsets[-1] + sizes[-1]
    buffer = torch.zeros(layout.size, dtype=torch.uint8)
    views = [layout.slot(buffer, i, s) for i, s in enumerate(CONTRACT.tensors)]
    for view, spec in zip(views, CONTRACT.tensors):
        view.fill_(1)
        assert tuple(view.shape) == spec.shape and str(view.dtype) == f"torch.{spec.dtype}"
        assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert int(buffer[: envelope.CONTROL_FRAME].sum()) == 0  # no slot reaches into the frame


def test_a_varying_contract_is_fused_at_its_largest_call_while_small() -> None:
    ids = TensorSpec(name="input_ids", shape=(1, 8), dtype="int64", varying=((1, 1, 2048),))
    layout = envelope.host_layout(CallContract(tensors=(ids,)), torch.device("cpu"))
    assert layout is not None and layout.size == layout.offsets[0] + 8 * 2048
    # A short call is the head of its slot.
    view = layout.slot(torch.zeros(layout.size, dtype=torch.uint8), 0, TensorSpec(name="input_ids", shape=(1, 3), dtype="int64"))
    assert tuple(view.shape) == (1, 3) and view.data_ptr() % 64 == 0
    # Hidden states of up to 2048 tokens would ship 8 MiB on every call, used or not: split.
    states = TensorSpec(name="h", shape=(1, 8, 1024), dtype="float32", varying=((1, 1, 2048),))
    assert envelope.host_layout(CallContract(tensors=(states,)), torch.device("cpu")) is None
    # Fixed shapes always fuse: the same bytes travel either way, one broadcast fewer.
    big = TensorSpec(name="h", shape=(1, 2048, 1024), dtype="float32")
    assert envelope.host_layout(CallContract(tensors=(big,)), torch.device("cpu")) is not None


@pair_test
def test_inputs_of_every_kind_round_trip_checked(pair: dict[int, dict[str, Any]]) -> None:
    s, g = pair[0]["odd_inputs"], pair[1]["odd_inputs"]
    assert s["ok"] and g["ok"], (s, g)
    for side in (s, g):
        assert side["shapes"] == {"b": [3], "e": [0], "ids": [1, 7], "t": [3, 2]}
        assert side["dtypes"] == {"b": "torch.bool", "e": "torch.bfloat16", "ids": "torch.int64", "t": "torch.float32"}
        assert all(side["equal"].values()), side["equal"]  # bit for bit, the follower's digest agreed
        assert side["checked"]
    assert g["aligned"] or pair[0]["mode"] == "split"


def test_a_contract_must_hold_the_shape_it_is_described_with() -> None:
    # (4, 8) with dim 0 declared 1..2 would size a slot for 2 rows and view 4: refused.
    with pytest.raises(ValueError, match="dim 0 is 4 in its shape"):
        TensorSpec(name="x", shape=(4, 8), dtype="float32", varying=((0, 1, 2),))
    with pytest.raises(ValueError, match="varying dim 2 does not exist"):
        TensorSpec(name="x", shape=(4, 8), dtype="float32", varying=((2, 1, 2),))


def test_device_tensors_travel_split_where_they_live() -> None:
    assert envelope.host_layout(CONTRACT, torch.device("cuda", 0)) is None
    assert envelope.host_layout(None, torch.device("cpu")) is None
