"""Drift tripwires: bit checksums, input digests and their comparison, weight
fingerprints of the reference region, weight checks over a real TCPStore side channel
(2 rank threads), and the input digest on a real 2-rank gloo pair, carried by the
envelope's confirm all-gather (shared with test_envelope.py)."""

from __future__ import annotations


import pytest
import torch

from hardening.drift import check_weights, checksum, compare_digests, fingerprint, input_digest
from hardening.errors import DriftError
from hardening.reference import TPDiTBlock
from hardening.region import RegionContext

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


def test_input_digest_covers_blob_and_every_tensor() -> None:
    blob = b'{"call_id":3}{"phase":"steady"}'
    tensors = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "c": torch.ones(4, dtype=torch.bfloat16)}
    cpu = torch.device("cpu")
    d = input_digest(blob, tensors, cpu)
    assert d.dtype == torch.int64 and d.shape == (1 + 2 * 2,)
    assert torch.equal(d, input_digest(bytes(blob), {k: v.clone() for k, v in tensors.items()}, cpu))
    # One byte of the blob.
    flipped = blob[:5] + bytes([blob[5] ^ 1]) + blob[6:]
    e = input_digest(flipped, tensors, cpu)
    assert e[0] != d[0] and torch.equal(e[1:], d[1:])
    # Same bytes, one shorter: the CRC still differs.
    assert input_digest(blob[:-1], tensors, cpu)[0] != d[0]
    # One element of one tensor: only that tensor's slot changes.
    changed = {k: v.clone() for k, v in tensors.items()}
    changed["c"][1] = 2.0
    f = input_digest(blob, changed, cpu)
    assert torch.equal(f[:3], d[:3]) and not torch.equal(f[3:], d[3:])
    # Order of the tensors matters (it is the manifest order).
    g = input_digest(blob, {"c": tensors["c"], "x": tensors["x"]}, cpu)
    assert not torch.equal(g, d)


# -- compare_digests (pure: the table the confirm all-gather returns, less the status) ------

NAMES = ["x", "c"]


def _table(world: int = 3) -> torch.Tensor:
    blob = b'{"call_id":3}{"phase":"steady"}'
    tensors = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "c": torch.ones(4, dtype=torch.bfloat16)}
    row = input_digest(blob, tensors, torch.device("cpu"))
    return row.unsqueeze(0).repeat(world, 1)


def test_compare_digests_equal_rows_pass() -> None:
    table = _table()
    assert compare_digests(table, call_id=3, names=NAMES, leader=0) is None
    assert compare_digests(table[:1], call_id=3, names=NAMES, leader=0) is None  # one rank
    # Rows of zeros (confirm without a digest) are equal too.
    assert compare_digests(torch.zeros(2, 5, dtype=torch.int64), call_id=3, names=NAMES, leader=0) is None


@pytest.mark.parametrize("word", [0, 1], ids=["bit-sum", "weighted-sum"])
def test_compare_digests_names_call_rank_and_tensor(word: int) -> None:
    table = _table()
    table[2, 3 + word] += 1  # rank 2, tensor 'c' (words 3 and 4)
    with pytest.raises(DriftError) as info:
        compare_digests(table, call_id=41, names=NAMES, leader=0)
    msg = str(info.value)
    assert "at call 41" in msg and "rank 2 (c)" in msg
    assert "rank 1 (" not in msg and "rank 0 (" not in msg and "header+meta" not in msg and "(x" not in msg
    assert "leader (rank 0)" in msg


def test_compare_digests_names_header_meta() -> None:
    table = _table(2)
    table[1, 0] ^= 1  # the CRC of header+meta
    with pytest.raises(DriftError) as info:
        compare_digests(table, call_id=6, names=NAMES, leader=0)
    msg = str(info.value)
    assert "at call 6" in msg and "rank 1 (header+meta)" in msg
    assert ", x" not in msg and ", c" not in msg and "(x" not in msg and "(c" not in msg


def test_compare_digests_names_every_odd_rank_and_tensor() -> None:
    table = _table(4)
    table[1, 1] += 1  # rank 1: x
    table[3, 0] += 1  # rank 3: header+meta, x and c
    table[3, 2] += 1
    table[3, 4] += 1
    with pytest.raises(DriftError) as info:
        compare_digests(table, call_id=9, names=NAMES, leader=0)
    msg = str(info.value)
    assert "rank 1 (x); rank 3 (header+meta, x, c)" in msg
    assert "rank 2" not in msg


def test_compare_digests_judges_against_the_leader_row() -> None:
    table = _table()
    table[2, 1] += 1  # the leader (rank 2) is the odd one: both others are named
    with pytest.raises(DriftError) as info:
        compare_digests(table, call_id=1, names=NAMES, leader=2)
    msg = str(info.value)
    assert "rank 0 (x); rank 1 (x)" in msg and "leader (rank 2)" in msg


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
        assert "replicated parameter 'ada' differs on rank(s) [1]" in str(out[r])
    # With the manifest as well, both findings are named.
    out = run_ranks(
        side_channels(store_port, 2),
        lambda s: check_weights(s, blocks[s.rank], manifest=blocks[s.rank].weight_manifest, replicated=("ada",), tag="ada2"),
    )
    for r in (0, 1):
        msg = str(out[r])
        assert isinstance(out[r], DriftError)
        assert "parameter 'ada' on rank 1" in msg and "replicated parameter 'ada'" in msg and "(+1 more)" in msg


# -- the input digest on a real gloo pair (2 processes), via the confirm all-gather ----------




@pytest.mark.timeout(120)
def test_input_digest_through_confirm_on_two_ranks() -> None:
    # Each rank: input_digest -> envelope.confirm(digest=...) -> compare_digests(table[:, 1:]).
    pair = pairlib().run_pair()
    for r in (0, 1):
        clean = pair[r]["digest_clean"]
        assert clean["ok"] and clean["call_id"] == 4, clean
        table = pair[r]["digest_clean_confirm"]
        assert [row[0] for row in table] == [0, 0]  # confirm status column: the leader is OK
        assert table[0][1:] == table[1][1:] == clean["digest"] != [0] * 5  # the digest travelled in it
        tensor = pair[r]["digest_tensor"]
        assert tensor["error_class"] == "DriftError", tensor
        assert "at call 5" in tensor["message"] and "rank 1 (c)" in tensor["message"]
        assert "rank 0 (" not in tensor["message"]
        blob = pair[r]["digest_blob"]
        assert blob["error_class"] == "DriftError", blob
        assert "at call 6" in blob["message"] and "rank 1 (header+meta)" in blob["message"]
        assert ", x" not in blob["message"] and ", c" not in blob["message"]
    # Every rank holds the same table, so every rank raises the same error.
    for name in ("digest_clean", "digest_tensor", "digest_blob"):
        assert pair[0][f"{name}_confirm"] == pair[1][f"{name}_confirm"]
    assert pair[0]["digest_tensor"]["message"] == pair[1]["digest_tensor"]["message"]
    assert pair[0]["digest_blob"]["message"] == pair[1]["digest_blob"]["message"]
