"""Drift tripwires: bit checksums, input digests and their comparison, weight
fingerprints of the reference region, weight checks over a real TCPStore side channel
(2 rank threads), and the input digest on a real 2-rank gloo pair, carried by the
envelope's control frame (shared with test_envelope.py)."""

from __future__ import annotations


import pytest
import torch

from hardening.runtime.digest import checksum, digest_len, input_digest
from hardening.runtime.drift import check_input, check_weights, fingerprint
from hardening.runtime.envelope import Envelope, Kind
from hardening.errors import DriftError
from hardening.harness.reference import TPDiTBlock
from hardening.harness.region import RegionContext

from store_harness import pairlib, run_ranks, side_channels

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]


def _sample(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(5, 7, generator=gen) > 0.5
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, (5, 7), generator=gen)
    return torch.randn(5, 7, generator=gen).to(dtype)


# -- checksum -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_checksum_equal_for_bit_equal_tensors(dtype: torch.dtype) -> None:
    t = _sample(dtype)
    same = t.clone()
    out = checksum(t)
    assert out.dtype == torch.int64 and out.shape == (2,)
    assert torch.equal(out, checksum(same))
    # A non-contiguous view of the same values checksums like its contiguous copy.
    assert torch.equal(checksum(t.t().contiguous().t()), out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", [(0, 0), (2, 3), (4, 6)])
def test_checksum_changes_when_one_element_changes(dtype: torch.dtype, where: tuple[int, int]) -> None:
    t = _sample(dtype)
    u = t.clone()
    if dtype == torch.bool:
        u[where] = ~u[where]
    elif dtype == torch.int64:
        u[where] += 1
    else:
        u[where] = torch.nextafter(u[where].float(), torch.tensor(float("inf"))).to(dtype)
        if torch.equal(u, t):  # nextafter in float32 may round back in a narrow dtype
            u[where] = (u[where].float() * 2 + 1).to(dtype)
    assert not torch.equal(u, t)
    assert not torch.equal(checksum(u), checksum(t))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_checksum_changes_when_two_elements_swap(dtype: torch.dtype) -> None:
    t = _sample(dtype).reshape(-1)
    i = 3
    j = next(k for k in range(t.numel()) if not torch.equal(t[k], t[i]))
    u = t.clone()
    u[i], u[j] = t[j].clone(), t[i].clone()
    assert torch.equal(u.sort().values, t.sort().values)  # same multiset of values
    a, b = checksum(t), checksum(u)
    assert a[0] == b[0]  # the plain bit sum cannot see a swap ...
    assert a[1] != b[1]  # ... the position-weighted one does


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_checksum_tells_zero_from_negative_zero(dtype: torch.dtype) -> None:
    pos = torch.zeros(4, dtype=dtype)
    neg = pos.clone()
    neg[2] = -0.0
    assert torch.equal(pos, neg)  # equal as values ...
    assert not torch.equal(checksum(pos), checksum(neg))  # ... different as bits


def test_checksum_counts_nan_bits_not_values() -> None:
    t = torch.tensor([1.0, float("nan"), 3.0])
    assert not torch.equal(t, t.clone())  # NaN != NaN as values
    assert torch.equal(checksum(t), checksum(t.clone()))  # but the bits are the same
    other_nan = t.clone()
    other_nan.view(torch.int32)[1] += 1  # another NaN payload
    assert torch.isnan(other_nan[1])
    assert not torch.equal(checksum(t), checksum(other_nan))


# -- input digest -------------------------------------------------------------------------


BLOB = b'{"call_id":3}{"phase":"steady"}'


def _tensors() -> dict[str, torch.Tensor]:
    return {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "c": torch.ones(4, dtype=torch.bfloat16)}


def test_input_digest_covers_blob_and_every_tensor() -> None:
    tensors = _tensors()
    d = input_digest(BLOB, tensors)
    assert isinstance(d, list) and len(d) == digest_len(2) == 1 + 2 * 2
    assert d == input_digest(bytes(BLOB), {k: v.clone() for k, v in tensors.items()})
    # One byte of the blob.
    flipped = BLOB[:5] + bytes([BLOB[5] ^ 1]) + BLOB[6:]
    e = input_digest(flipped, tensors)
    assert e[0] != d[0] and e[1:] == d[1:]
    # Same bytes, one shorter: the CRC still differs.
    assert input_digest(BLOB[:-1], tensors)[0] != d[0]
    # One element of one tensor: only that tensor's slot changes.
    changed = {k: v.clone() for k, v in tensors.items()}
    changed["c"][1] = 2.0
    f = input_digest(BLOB, changed)
    assert f[:3] == d[:3] and f[3:] != d[3:]
    # Order of the tensors matters (it is the manifest order).
    assert input_digest(BLOB, {"c": tensors["c"], "x": tensors["x"]}) != d


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_digest_catches_one_element_and_a_swap_in_host_tensors(dtype: torch.dtype) -> None:
    # Host tensors are digested with CRC-32 over their bytes: every single-element change
    # of every element, and a swap of two different elements, changes the digest.
    t = (torch.arange(40) % 7 + 1).to(dtype).reshape(5, 8) if dtype != torch.bool else torch.arange(40).reshape(5, 8) % 3 == 0
    base = input_digest(BLOB, {"t": t})
    for i in range(t.numel()):
        u = t.clone()
        flat = u.view(-1)
        flat[i] = ~flat[i] if dtype == torch.bool else flat[i] + 1
        assert input_digest(BLOB, {"t": u}) != base, i
    u = t.clone().view(-1)
    j = next(k for k in range(1, 40) if u[k] != u[0])
    u[0], u[j] = t.view(-1)[j], t.view(-1)[0]
    assert input_digest(BLOB, {"t": u.view(5, 8)}) != base
    # -0.0 and 0.0 differ in bits, so they differ in the digest.
    if dtype.is_floating_point:
        z = torch.zeros(3, dtype=dtype)
        assert input_digest(BLOB, {"t": z}) != input_digest(BLOB, {"t": -z})


def test_input_digest_of_non_contiguous_and_empty_tensors() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert input_digest(BLOB, {"t": t.t()}) == input_digest(BLOB, {"t": t.t().contiguous()})
    assert input_digest(BLOB, {"t": torch.empty(0, 4)}) == [input_digest(BLOB, {})[0], 0, 0]


# -- check_input (follower side, pure: no collective) ----------------------------------------


def _received(call_id: int = 3, *, leader_digest: list[int] | None = None) -> Envelope:
    """What a follower holds after ``receive``: the leader's digest from the frame, and the
    blob and tensors that arrived (equal to the leader's unless a test changes them)."""
    tensors = _tensors()
    return Envelope(
        kind=Kind.CALL,
        call_id=call_id,
        blob=BLOB,
        tensors=tensors,
        digest=input_digest(BLOB, tensors) if leader_digest is None else leader_digest,
    )


def test_check_input_passes_what_the_leader_digested() -> None:
    assert check_input(_received(), rank=1, leader=0) is None
    # No digest in the frame (an unchecked call): nothing to compare, even if it drifted.
    env = _received()
    env.digest = None
    env.tensors["x"][0, 0] += 1
    assert check_input(env, rank=1, leader=0) is None


def test_check_input_names_call_rank_and_tensor() -> None:
    env = _received(41)
    env.tensors["c"][2] += 1
    with pytest.raises(DriftError) as info:
        check_input(env, rank=2, leader=0)
    msg = str(info.value)
    assert "at call 41: rank 2 (c) differs from the leader (rank 0)" in msg
    assert "header+meta" not in msg and "x" not in msg.split("differs")[0].split("(")[1]


def test_check_input_names_header_meta_and_every_tensor() -> None:
    env = _received(6)
    env.blob = BLOB[:-1] + b"!"
    assert check_input(_received(6), rank=1, leader=0) is None
    with pytest.raises(DriftError, match=r"at call 6: rank 1 \(header\+meta\) differs"):
        check_input(env, rank=1, leader=0)
    env.tensors["x"][1, 1] += 1
    env.tensors["c"][0] += 1
    with pytest.raises(DriftError, match=r"rank 1 \(header\+meta, x, c\) differs from the leader \(rank 2\)"):
        check_input(env, rank=1, leader=2)


# -- weight fingerprints of the reference region ------------------------------------------

DIMS = {"hidden": 8, "heads": 2, "tokens": 2, "cache": 4, "mlp": 16, "batch": 1}


def _block(rank: int, *, seed: int = 3, world: int = 2) -> TPDiTBlock:
    ctx = RegionContext(
        rank=rank, world_size=world, device=torch.device("cpu"), dtype=torch.float32, group=None, dims=DIMS, seed=seed, profile=None
    )
    return TPDiTBlock(ctx)


@pytest.fixture(scope="module")
def blocks() -> list[TPDiTBlock]:
    return [_block(0), _block(1)]


def test_fingerprint_matches_own_manifest_on_both_ranks(blocks: list[TPDiTBlock]) -> None:
    names = {"ada", "qkv", "out", "fc1", "fc2"}
    for r, block in enumerate(blocks):
        fp = fingerprint(block)
        assert set(fp) == names
        assert set(block.weight_manifest) == names
        for name in names:
            assert fp[name] == block.weight_manifest[name][r], (r, name)
    # Both ranks state the same manifest for all ranks; shards differ, 'ada' is replicated.
    assert blocks[0].weight_manifest == blocks[1].weight_manifest
    fp0, fp1 = fingerprint(blocks[0]), fingerprint(blocks[1])
    assert fp0["ada"] == fp1["ada"]
    assert all(fp0[n] != fp1[n] for n in names - {"ada"})
    # Another seed, other weights.
    assert fingerprint(_block(0, seed=4))["qkv"] != fp0["qkv"]


@pytest.mark.parametrize("name", ["ada", "qkv", "out", "fc1", "fc2"])
def test_one_perturbed_element_breaks_exactly_that_parameter(name: str) -> None:
    block = _block(1)
    with torch.no_grad():
        p = getattr(block, name)
        flat = p.view(-1)
        flat[flat.numel() // 2] = torch.nextafter(flat[flat.numel() // 2], torch.tensor(float("inf")))
    fp = fingerprint(block)
    broken = {n for n, v in fp.items() if v != block.weight_manifest[n][1]}
    assert broken == {name}


# -- check_weights over a real store, two rank threads ------------------------------------


def _perturb(block: TPDiTBlock, name: str) -> None:
    with torch.no_grad():
        getattr(block, name).view(-1)[5] += 0.25


@pytest.mark.timeout(60)
def test_check_weights_clean_passes(store_port: int) -> None:
    blocks = [_block(0), _block(1)]
    out = run_ranks(
        side_channels(store_port, 2),
        lambda s: check_weights(s, blocks[s.rank], manifest=blocks[s.rank].weight_manifest, replicated=("ada",), tag="clean"),
    )
    assert out == {0: None, 1: None}


@pytest.mark.timeout(60)
def test_check_weights_names_perturbed_shard_on_every_rank(store_port: int) -> None:
    blocks = [_block(0), _block(1)]
    _perturb(blocks[1], "qkv")
    out = run_ranks(
        side_channels(store_port, 2),
        lambda s: check_weights(s, blocks[s.rank], manifest=blocks[s.rank].weight_manifest, replicated=("ada",), tag="qkv"),
    )
    for r in (0, 1):
        assert isinstance(out[r], DriftError), out[r]
        msg = str(out[r])
        assert "parameter 'qkv' on rank 1" in msg
        assert "rank 0" not in msg  # rank 0's shard is fine
        assert "'fc1'" not in msg and "'ada'" not in msg
    assert str(out[0]) == str(out[1])


@pytest.mark.timeout(60)
def test_check_weights_names_a_differing_replicated_parameter(store_port: int) -> None:
    blocks = [_block(0), _block(1)]
    _perturb(blocks[1], "ada")
    # Without a manifest only the replication check can see it.
    out = run_ranks(side_channels(store_port, 2), lambda s: check_weights(s, blocks[s.rank], manifest=None, replicated=("ada",), tag="ada"))
    for r in (0, 1):
        assert isinstance(out[r], DriftError), out[r]
        assert "replicated parameter 'ada' on rank 1 differs from rank 0" in str(out[r])
    # With the manifest as well, both findings are named.
    out = run_ranks(
        side_channels(store_port, 2),
        lambda s: check_weights(s, blocks[s.rank], manifest=blocks[s.rank].weight_manifest, replicated=("ada",), tag="ada2"),
    )
    for r in (0, 1):
        msg = str(out[r])
        assert isinstance(out[r], DriftError)
        assert "parameter 'ada' on rank 1" in msg and "replicated parameter 'ada'" in msg and "(+1 more)" in msg


# -- the input digest on a real gloo pair (2 processes), carried by the control frame -------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["split", "fused"])
def test_input_digest_in_the_frame_on_two_ranks(mode: str) -> None:
    # The leader: send(digest=True). The follower: receive, then check_input.
    pair = pairlib().run_pair(mode)
    leader, follower = pair[0], pair[1]
    clean = follower["digest_clean"]
    assert clean["ok"] and clean["call_id"] == 4, clean
    # The digest the leader computed travelled in the frame and equals the follower's own.
    assert clean["digest_in_frame"] == leader["digest_clean"]["digest_in_frame"] == clean["mine_before"]
    assert len(clean["digest_in_frame"]) == digest_len(2)
    for name in ("digest_tensor", "digest_blob", "digest_both"):
        # The leader does not check; the follower's own digest matched until it changed
        # its copy, and then it names itself, the call and what differs.
        assert leader[name]["ok"], leader[name]
        assert follower[f"{name}_seen"]["mine_before"] == follower[f"{name}_seen"]["digest_in_frame"]
        assert follower[name]["error_class"] == "DriftError", follower[name]
    assert "at call 5: rank 1 (c) differs from the leader (rank 0)" in follower["digest_tensor"]["message"]
    assert "at call 6: rank 1 (header+meta) differs" in follower["digest_blob"]["message"]
    assert "at call 28: rank 1 (header+meta, x) differs" in follower["digest_both"]["message"]


# -- DTensor parameters: the local shard, never a DTensor op (which could be a collective) ----

_DTENSOR_SCRIPT = r"""
import os, sys, tempfile, json
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from hardening.runtime.digest import checksum
from hardening.runtime.drift import fingerprint, local_shard, replicate_placed
from hardening.inject.fault import flip_low_bit

store = dist.FileStore(tempfile.mktemp(), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
m = torch.nn.Module()
m.rep = torch.nn.Parameter(distribute_tensor(torch.arange(6.0), mesh, [Replicate()]), requires_grad=False)
m.shard = torch.nn.Parameter(distribute_tensor(torch.arange(8.0).reshape(4, 2), mesh, [Shard(0)]), requires_grad=False)
m.plain = torch.nn.Parameter(torch.ones(3), requires_grad=False)
before = fingerprint(m)
ok = before["shard"] == checksum(m.shard.to_local()).tolist() and before["plain"] == checksum(m.plain).tolist()
flip_low_bit(local_shard(m.shard), 3)  # must change the parameter itself
print(json.dumps({"ok": ok, "replicated": list(replicate_placed(m)), "changed": fingerprint(m)["shard"] != before["shard"]}))
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_dtensor_parameters_are_fingerprinted_by_their_local_shard() -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DTENSOR_SCRIPT], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"ok": True, "replicated": ["rep"], "changed": True}
