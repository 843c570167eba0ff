"""Your own TP worker loop, hardened: the runtime pieces wired in by hand.

    torchrun --nproc-per-node 2 examples/own_loop.py

Rank 0 serves one envelope per call, every rank runs the compiled TP layer. The store
is the one torchrun's agent hosts at MASTER_ADDR:MASTER_PORT, so it outlives any rank.
Order matters and is the same as the harness's recipe: watchdog first, then the data
plane, parity before any collective, then the loop.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from hardening.runtime import drift, envelope, kv_cache as lifecycle
from hardening.runtime.envelope import CallContract, Channel, Envelope, Kind, TensorSpec
from hardening.runtime.parity import build_fingerprint, check_parity
from hardening.harness.profile import load_profile
from hardening.runtime.sidechannel import SideChannel
from hardening.runtime.record import RankState, Terminator
from hardening.runtime.watchdog import Watchdog

HIDDEN, TOKENS, CALLS = 64, 8, 20


def connect(timeout: float) -> dist.Store:
    # The launcher's store (torchrun's agent), namespaced for the runtime's keys.
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=timeout)
    )
    return dist.PrefixStore(f"hardening/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}", store)


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    profile = load_profile("cpu")  # timeouts and compile settings; use your own YAML
    t = profile.timeouts
    state = RankState(rank=rank, world_size=world, record_path=Path(f"own_loop_rank{rank}.json"))
    terminator = Terminator(state, connect(t.setup))
    try:
        # 1. Watchdog before anything can block: heartbeats, abort key, deadlines.
        Watchdog(state, terminator, connect(t.setup), heartbeat_s=t.heartbeat, peer_lost_s=t.peer_lost,
                 first_heartbeat_s=t.setup, call_deadline_s=t.call_deadline).start()  # fmt: skip
        store = connect(t.pg)
        state.on_phase = lambda phase: store.set(f"phase/{rank}", phase)
        # 2. Data plane with a short timeout, then parity before the first collective.
        dist.init_process_group("gloo", timeout=timedelta(seconds=t.pg))
        side = SideChannel(store, rank=rank, world_size=world, timeout_s=t.pg)
        state.enter("parity")
        fp = build_fingerprint(compile_cfg=profile.compile, gates=profile.gates, parity=profile.parity, world_size=world,
                               backend="gloo", device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip
        check_parity(side, fp)
        side.create_group()

        # 3. Your TP layer: a row-parallel projection with a functional all-reduce.
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(HIDDEN, HIDDEN, generator=gen)[:, rank * HIDDEN // world : (rank + 1) * HIDDEN // world]
        layer = torch.compile(
            lambda x: funcol.all_reduce(F.linear(x[..., rank * HIDDEN // world : (rank + 1) * HIDDEN // world], w), "sum", dist.group.WORLD),
            fullgraph=True,
            backend="eager",
        )
        contract = CallContract(tensors=(TensorSpec(name="x", shape=(TOKENS, HIDDEN), dtype="float32"),))
        channel = Channel(control_group=side.group, data_group=dist.group.WORLD, device=torch.device("cpu"),
                          rank=rank, contract=contract)  # fmt: skip
        cache = lifecycle.KVCacheLifecycle()
        schedule = lifecycle.CacheSchedule(reset_every=4)

        # 4. The loop: envelope, lifecycle, digest, data plane; every step deadline-bound.
        state.enter("steady")
        for call_id in range(CALLS):
            state.begin_call(call_id, deadline_bound=True)
            if rank == 0:
                op, epoch, extra = schedule.plan(call_id)
                x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(call_id))
                env = envelope.send(
                    Envelope(kind=Kind.CALL, call_id=call_id, cache_epoch=epoch, tensors={"x": x},
                             plan={"expected_generator_calls": 1, "cache_op": op}, meta={"prompt": "a cat", **extra}),
                    channel,
                    digest=True,  # the leader's input digest rides in the frame
                )  # fmt: skip
            else:
                env = envelope.receive(channel)
                drift.check_input(env, rank=rank, leader=0)  # what arrived is what the leader sent
            lifecycle.apply_transition(cache, op=env.plan["cache_op"], epoch=env.cache_epoch, tokens=TOKENS, call_id=call_id)
            out = layer(env.tensors["x"])
            state.end_call()
        if rank == 0:
            envelope.send(Envelope(kind=Kind.SHUTDOWN, call_id=CALLS), channel)
        elif envelope.receive(channel).kind is not Kind.SHUTDOWN:
            raise RuntimeError("expected SHUTDOWN")
        side.exchange("done", rank)  # nobody leaves while a peer still needs it
        print(f"rank {rank}: {CALLS} hardened calls, last output norm {out.norm():.3f}", flush=True)
    except BaseException as exc:  # noqa: BLE001 - every end is recorded and named
        terminator.end(exc)
    terminator.end(None)


if __name__ == "__main__":
    main()
