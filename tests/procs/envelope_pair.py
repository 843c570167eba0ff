"""One rank of a real 2-rank gloo pair that runs every envelope / input-digest scenario
in sequence and writes what it saw as JSON (``argv: rank port result_path mode``).

Both ranks run the same scenario list in lockstep and speak the protocol as the
Session's control plane does, the frame travelling as ``mode`` says: ``split`` (the
control frame on the side group, then its tensors on the data group, as with device
tensors) or ``fused`` (frame and tensors in one buffer on the data group, as on the
host). A checked call carries the leader's input digest, which the follower compares
with ``drift.check_input``. Every scenario records, per rank, either ``{"ok": ..., ...}``
or the error it raised (class, message, root_cause_rank). Where a receiver refuses a
split frame after the leader committed it, the receiver drains that frame's tensors by
hand (the test knows the manifest) so that later scenarios still run on an aligned
channel; a fused frame leaves nothing to drain. The process is
bounded: gloo groups time out after 20 s and ``faulthandler`` ends it after 50 s
whatever happens.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable

faulthandler.dump_traceback_later(50, exit=True)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hardening.runtime import drift, envelope  # noqa: E402
from hardening.runtime.digest import checksum, input_digest  # noqa: E402
from hardening.runtime.envelope import CallContract, Channel, Envelope, Kind, TensorSpec  # noqa: E402
from hardening.errors import HardeningError  # noqa: E402
from hardening.runtime.sidechannel import SideChannel  # noqa: E402

RANK = int(sys.argv[1])
PORT = int(sys.argv[2])
RESULT = sys.argv[3]
MODE = sys.argv[4]
LEADER = 0
CPU = torch.device("cpu")
CONTRACT = CallContract(
    tensors=(
        TensorSpec(name="x", shape=(2, 3), dtype="float32"),
        TensorSpec(name="c", shape=(4,), dtype="bfloat16"),
    )
)
# Header+meta bytes that fit in the fixed control frame after the prefix.
FRAME_ROOM = envelope.CONTROL_FRAME - 8 * envelope.PREFIX_LEN
results: dict[str, Any] = {"rank": RANK, "pid": os.getpid(), "frame_room": FRAME_ROOM, "mode": MODE}


def make_tensors(k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(2, 3, generator=gen)
    x[0, 1] = -0.0  # bit patterns a value compare would miss
    if k == 1:
        x[1, 1] = float("nan")
    c = torch.randn(4, generator=gen).to(torch.bfloat16)
    return {"x": x, "c": c}


def make_meta(k: int) -> dict[str, Any]:
    return {"phase": "steady", "k": k, "nested": {"list": [1, 2.5, {"deep": None}], "text": "\u00fc\u2192\u2713", "flag": True}}


def make_call(
    k: int, *, op: str = "advance", epoch: int = 1, tensors: dict[str, Any] | None = None, meta: dict[str, Any] | None = None
) -> Envelope:
    meta = make_meta(k) if meta is None else meta
    if op == "recompute":
        meta["recompute_override"] = {"window": "full"}
    return Envelope(
        kind=Kind.CALL,
        call_id=k,
        cache_epoch=epoch,
        plan={"expected_generator_calls": 1, "cache_op": op},
        meta=meta,
        tensors=make_tensors(k) if tensors is None else tensors,
    )


def blob_len(env: Envelope) -> int:
    """Header+meta bytes ``env`` would send (preflight on a scratch channel, no collective)."""
    scratch = Channel(
        control_group=None, data_group=None, device=CPU, leader=LEADER, rank=RANK, contract=CONTRACT,
        last_call_id=env.call_id - 1,
    )
    header, meta, _ = envelope.preflight(env, scratch)
    return len(header) + len(meta)


def padded_call(k: int, total: int) -> Envelope:
    """Call ``k`` whose header+meta is exactly ``total`` bytes (ASCII padding in the meta)."""
    meta = {**make_meta(k), "pad": ""}
    base = blob_len(make_call(k, meta=dict(meta)))
    meta["pad"] = "p" * (total - base)
    env = make_call(k, meta=meta)
    assert blob_len(env) == total, (blob_len(env), total)
    return env


def bits(t: torch.Tensor) -> list[int]:
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}[t.element_size()]
    return t.contiguous().view(view).reshape(-1).tolist()


def describe(env: Envelope) -> dict[str, Any]:
    return {
        "kind": env.kind.name,
        "call_id": env.call_id,
        "cache_epoch": env.cache_epoch,
        "plan": env.plan,
        "meta": env.meta,
        "blob_hex": env.blob.hex(),
        "blob_len": len(env.blob),
        "names": list(env.tensors),
        "dtypes": {n: str(t.dtype) for n, t in env.tensors.items()},
        "shapes": {n: list(t.shape) for n, t in env.tensors.items()},
        "bits": {n: bits(t) for n, t in env.tensors.items()},
        "checksums": {n: checksum(t).tolist() for n, t in env.tensors.items()},
        # Fused: every tensor a view of the one buffer that travelled, on a 64-byte boundary.
        "storages": len({t.untyped_storage().data_ptr() for t in env.tensors.values()}),
        "aligned": all(t.data_ptr() % 64 == 0 for t in env.tensors.values()),
    }


def described_call(env: Envelope, k: int) -> dict[str, Any]:
    """``describe`` plus whether the tensors are the source's, bit for bit, and the
    digest the frame carried (none: the call was not checked)."""
    info = describe(env)
    info["bits_equal_to_source"] = all(bits(env.tensors[n]) == bits(t) for n, t in make_tensors(k).items())
    info["digest_in_frame"] = env.digest
    return info


def error_of(exc: BaseException) -> dict[str, Any]:
    return {
        "ok": False,
        "error_class": type(exc).__name__,
        "message": str(exc),
        "root_cause_rank": getattr(exc, "root_cause_rank", None),
        "hardening": isinstance(exc, HardeningError),
    }


def drain(specs: list[tuple[tuple[int, ...], torch.dtype]], channel: Channel) -> None:
    """Consume the tensors of a committed split frame the receiver refused (a fused one
    brought them in the same broadcast)."""
    if channel.layout is not None:
        return
    for shape, dtype in specs:
        dist.broadcast(torch.empty(shape, dtype=dtype), src=LEADER, group=channel.data_group)


class Unmovable:
    """Passes preflight like the contract's tensor it replaces, fails on its way to the
    device (which the leader's send stages before the commitment point)."""

    def __init__(self, like: torch.Tensor) -> None:
        self.dtype = like.dtype
        self.shape = like.shape

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("injected: tensor cannot reach the device")


def scenario(name: str, body: Callable[[], Any]) -> None:
    try:
        out = body()
        results[name] = {"ok": True, **(out or {})}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results[name] = error_of(exc)
    results[name]["last_call_id"] = channel.last_call_id


def main() -> None:
    global channel, side
    client = dist.TCPStore("127.0.0.1", PORT, is_master=False, timeout=timedelta(seconds=20))
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("pg", client), rank=RANK, world_size=2, timeout=timedelta(seconds=20)
    )
    side = SideChannel(client, rank=RANK, world_size=2, timeout_s=20)
    side.create_group()
    channel = Channel(
        control_group=side.group,
        data_group=dist.group.WORLD,
        device=CPU,
        leader=LEADER,
        rank=RANK,
        contract=CONTRACT,
        layout=envelope.host_layout(CONTRACT, CPU) if MODE == "fused" else None,
    )
    assert (channel.layout is not None) == (MODE == "fused"), MODE
    is_leader = RANK == LEADER
    XC = [((2, 3), torch.float32), ((4,), torch.bfloat16)]

    def call(make: Callable[[], Envelope]) -> Envelope:
        """One CALL as worker.step runs it without a digest."""
        env = envelope.send(make(), channel) if is_leader else envelope.receive(channel)
        return env

    # 1. Round trip of several CALLs: calls 0..3, the last one a recompute.
    def roundtrip() -> dict[str, Any]:
        seen = []
        for k in range(4):
            op = "recompute" if k == 3 else "advance"
            env = call(lambda: make_call(k, op=op))
            seen.append(described_call(env, k))
        return {"calls": seen}

    scenario("roundtrip", roundtrip)

    # 2. Input digest as worker.step runs it (the leader's digest in the frame, checked by
    #    the follower): clean, one element of c changed on rank 1, one blob byte changed
    #    on rank 1, both x and the blob changed on rank 1.
    def digest(k: int, mutate: str | None) -> Callable[[], dict[str, Any]]:
        def body() -> dict[str, Any]:
            if is_leader:
                env = envelope.send(make_call(k), channel, digest=True)
                return {"call_id": env.call_id, "digest_in_frame": env.digest}
            env = envelope.receive(channel)
            out = {"call_id": env.call_id, "digest_in_frame": env.digest, "mine_before": input_digest(env.blob, env.tensors)}
            results[name_of[k] + "_seen"] = out
            if mutate in ("tensor",):
                env.tensors["c"][2] += 1
            if mutate in ("blob", "both"):
                env.blob = env.blob[:-2] + bytes([env.blob[-2] ^ 1]) + env.blob[-1:]
            if mutate == "both":
                env.tensors["x"][1, 2] += 1
            drift.check_input(env, rank=RANK, leader=LEADER)
            return out

        return body

    name_of = {4: "digest_clean", 5: "digest_tensor", 6: "digest_blob", 28: "digest_both"}
    scenario("digest_clean", digest(4, None))
    scenario("digest_tensor", digest(5, "tensor"))
    scenario("digest_blob", digest(6, "blob"))

    # 3. Preflight failure on the leader (float64): ERROR frame, PeerError on rank 1.
    def preflight_error() -> None:
        if is_leader:
            tensors = make_tensors(7)
            tensors["x"] = tensors["x"].double()
            envelope.send(make_call(7, tensors=tensors), channel)
        else:
            envelope.receive(channel)

    scenario("preflight_error", preflight_error)

    # 4. The next valid call after the ERROR frame: the frames stayed aligned.
    def after_error() -> dict[str, Any]:
        return described_call(call(lambda: make_call(7)), 7)

    scenario("after_error", after_error)

    # 5. A tensor outside the contract on the leader: ContractError before commit.
    def leader_contract_error() -> None:
        if is_leader:
            tensors = make_tensors(8)
            tensors["y"] = torch.zeros(1)
            envelope.send(make_call(8, tensors=tensors), channel)
        else:
            envelope.receive(channel)

    scenario("leader_contract_error", leader_contract_error)

    # 6. The receiver's contract lacks 'c' (the leader's has it): ContractError on rank 1,
    #    which then drains the committed frame's tensors by hand.
    def receiver_contract() -> dict[str, Any]:
        if is_leader:
            call(lambda: make_call(8))
            return {}
        channel.contract = CallContract(tensors=(CONTRACT.tensors[0],))
        try:
            envelope.receive(channel)
        except HardeningError as exc:
            drain(XC, channel)
            raise exc
        finally:
            channel.contract = CONTRACT
        return {}

    scenario("receiver_contract", receiver_contract)
    channel.last_call_id = 8  # the leader committed call 8; rank 1 refused it

    # 7. A call_id gap on the leader (its last_call_id bumped): PreflightError pre-commit.
    def gap_preflight() -> None:
        if is_leader:
            channel.last_call_id = 20
            envelope.send(make_call(9), channel)
        else:
            envelope.receive(channel)

    scenario("gap_preflight", gap_preflight)

    # 8. The leader sends 21 after its bumped 20: the receiver (at 8) names the skip.
    def gap_receiver() -> dict[str, Any]:
        if is_leader:
            return {"call_id": call(lambda: make_call(21)).call_id}
        try:
            envelope.receive(channel)
        except HardeningError:
            drain(XC, channel)
            raise
        return {}

    scenario("gap_receiver", gap_receiver)
    channel.last_call_id = 21

    # 9. Tensors in another order than the contract (same names, shapes, dtypes).
    def order() -> dict[str, Any]:
        if is_leader:
            t = make_tensors(22)
            env = call(lambda: make_call(22, tensors={"c": t["c"], "x": t["x"]}))
            return {"committed": True, "names": list(env.tensors)}
        try:
            envelope.receive(channel)
        except HardeningError as exc:
            if type(exc).__name__ == "ContractError":  # refused after the leader committed
                drain([XC[1], XC[0]], channel)
            raise
        return {}

    scenario("order", order)
    channel.last_call_id = 22

    # 10. Header+meta longer than the control frame: 5000-char string in the meta (the
    #     frame continues in one more broadcast), then the exact boundary (the blob fills
    #     the frame to the byte) and one byte past it.
    def large_meta() -> dict[str, Any]:
        long_text = ("\u00fc\u2192\u2713-" * 1250)[:5000]
        env = call(lambda: make_call(23, meta={**make_meta(23), "long": long_text, "tail": "end"}))
        info = described_call(env, 23)
        info["long_intact"] = env.meta.get("long") == long_text
        return info

    scenario("large_meta", large_meta)

    def frame_boundary() -> dict[str, Any]:
        seen = []
        for k, total in ((24, FRAME_ROOM), (25, FRAME_ROOM + 1), (26, FRAME_ROOM - 1)):
            seen.append(described_call(call(lambda: padded_call(k, total)), k))
        return {"calls": seen}

    scenario("frame_boundary", frame_boundary)

    # 11. An ERROR frame longer than the control frame: a 1500-char meta key with a NaN
    #     value; the reason naming it continues past the first frame.
    def long_error() -> None:
        if is_leader:
            envelope.send(make_call(27, meta={"k" * 1500: float("nan")}), channel)
        else:
            envelope.receive(channel)

    scenario("long_error", long_error)

    # 12. A tensor that cannot reach the device (the 2nd, then the 1st): staged before the
    #     commit, so the leader refuses the call with an ERROR frame and the follower
    #     names it; nothing was committed.
    def unmovable(k: int, poisoned: str) -> Callable[[], None]:
        def body() -> None:
            if is_leader:
                tensors: dict[str, Any] = make_tensors(k)
                tensors[poisoned] = Unmovable(tensors[poisoned])
                envelope.send(make_call(k, tensors=tensors), channel)
            else:
                envelope.receive(channel)

        return body

    scenario("unmovable_c", unmovable(27, "c"))
    scenario("unmovable_x", unmovable(27, "x"))

    # 13. A valid call after the refusals (the same id: none was spent), then a checked call
    #     where the follower changed both x and the blob after receiving.
    scenario("after_unmovable", lambda: described_call(call(lambda: make_call(27)), 27))
    scenario("digest_both", digest(28, "both"))

    # 14. Inputs of every awkward kind on a channel of their own: bool, a 0-element bf16,
    #     token ids whose length varies (7 of up to 16), a non-contiguous float tensor on
    #     the leader; checked, so the follower digests what arrived.
    odd_contract = CallContract(
        tensors=(
            TensorSpec(name="b", shape=(3,), dtype="bool"),
            TensorSpec(name="e", shape=(0,), dtype="bfloat16"),
            TensorSpec(name="ids", shape=(1, 4), dtype="int64", varying=((1, 1, 16),)),
            TensorSpec(name="t", shape=(3, 2), dtype="float32"),
        )
    )
    odd = Channel(
        control_group=side.group, data_group=dist.group.WORLD, device=CPU, leader=LEADER, rank=RANK, contract=odd_contract,
        layout=envelope.host_layout(odd_contract, CPU) if MODE == "fused" else None,
    )  # fmt: skip

    def odd_tensors() -> dict[str, torch.Tensor]:
        t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # (3, 2), not contiguous
        return {"b": torch.tensor([True, False, True]), "e": torch.empty(0, dtype=torch.bfloat16),
                "ids": torch.arange(7).reshape(1, 7), "t": t}  # fmt: skip

    def odd_inputs() -> dict[str, Any]:
        env = Envelope(kind=Kind.CALL, call_id=0, cache_epoch=1, plan={"expected_generator_calls": 1, "cache_op": "advance"})
        if is_leader:
            env.tensors = odd_tensors()
            env = envelope.send(env, odd, digest=True)
        else:
            env = envelope.receive(odd)
            drift.check_input(env, rank=RANK, leader=LEADER)
        source = odd_tensors()
        return {
            "shapes": {n: list(t.shape) for n, t in env.tensors.items()},
            "dtypes": {n: str(t.dtype) for n, t in env.tensors.items()},
            "equal": {n: bool(torch.equal(t, source[n])) for n, t in env.tensors.items()},
            "aligned": all(t.data_ptr() % 64 == 0 for t in env.tensors.values() if t.numel()),
            "checked": env.digest is not None,
        }

    scenario("odd_inputs", odd_inputs)

    # 15. SHUTDOWN on channels without a contract (a digest asked for is not sent: not a CALL).
    def shutdown() -> dict[str, Any]:
        bare = Channel(
            control_group=side.group, data_group=dist.group.WORLD, device=CPU, leader=LEADER, rank=RANK, layout=channel.layout
        )
        bare.last_call_id = 28
        if is_leader:
            env = envelope.send(Envelope(kind=Kind.SHUTDOWN, call_id=29, meta={"reason": "done"}), bare, digest=True)
        else:
            env = envelope.receive(bare)
        return {**describe(env), "bare_last_call_id": bare.last_call_id, "digest_in_frame": env.digest}

    scenario("shutdown", shutdown)

    # Both ranks still talk: a final all-reduce on each group proves nobody is stuck mid-frame.
    t = torch.tensor([RANK + 1])
    dist.all_reduce(t, group=dist.group.WORLD)
    results["final_allreduce"] = int(t)
    t = torch.tensor([RANK + 1])
    dist.all_reduce(t, group=side.group)
    results["final_allreduce_control"] = int(t)
    dist.destroy_process_group()


if __name__ == "__main__":
    code = 0
    try:
        main()
    except BaseException:  # noqa: BLE001 - the test reads it
        results["fatal"] = traceback.format_exc()
        code = 3
    finally:
        with open(RESULT + ".tmp", "w") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(RESULT + ".tmp", RESULT)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
