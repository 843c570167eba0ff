"""The stock loop: the same served region with the runtime switched off.

What an unhardened TP worker does (torch's default process-group timeouts, the header as
a JSON object broadcast, no parity, watchdog, digests, cache checks or gates), for the
detection benchmark (``bench/detect.py``, ``hardened: false``) to measure against.
Faults act here through the same seams, at the same steps, as in the Session. Never for
real use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist

from hardening.harness import region
from hardening.harness.region import RegionContext
from hardening.runtime import seams
from hardening.runtime import store as store_keys
from hardening.runtime.compile.backend import compile_region
from hardening.runtime.compile.probe import CompileProbe
from hardening.runtime.digest import host_bytes
from hardening.runtime.envelope import ALLOWED_DTYPES, Channel, Envelope, Kind
from hardening.runtime.kv_cache import CacheSchedule, KVCacheLifecycle
from hardening.runtime.records import RankState, Terminator
from hardening.runtime.session import LEADER, call_envelope, install_fault, tokens_of

if TYPE_CHECKING:
    from hardening.harness.profile import Profile
    from hardening.harness.worker import RankSpec


def run_rank(spec: RankSpec, profile: Profile) -> NoReturn:
    from hardening.harness.worker import DTYPES, contract_of, device_of

    state = RankState(rank=spec.rank, world_size=spec.world_size, record_path=Path(spec.rank_dir) / "record.json")
    terminator = Terminator(state, None)  # no store: no abort, no attribution, nobody told
    try:
        store = store_keys.connect(spec.store_host, spec.store_port, prefix=spec.store_prefix, timeout_s=profile.timeouts.setup)
        state.on_phase = lambda phase: store.set(store_keys.key("phase", spec.rank), phase)
        fault = install_fault(state, store)
        device, dtype = device_of(profile, spec.rank), DTYPES[profile.region.dtype]

        state.enter("init")
        seams.apply_backend_settings(device, dtype)
        dist.init_process_group(
            profile.world.backend, store=dist.PrefixStore(store_keys.PG_PREFIX, store), rank=spec.rank,
            world_size=spec.world_size,
        )  # fmt: skip  (torch's default timeout: 30 min on gloo, 10 on NCCL)
        compile_cfg = seams.resolve_compile_config(profile.compile)
        keys = seams.user_config(profile.fingerprint_keys())

        state.enter("build")
        ctx = RegionContext(
            rank=spec.rank, world_size=spec.world_size, device=device, dtype=dtype, group=dist.group.WORLD,
            dims=dict(profile.region.dims), seed=int(keys["region.seed"]), profile=profile,
        )  # fmt: skip
        reg = region.build_region(profile.region.target, ctx)
        seams.weights_loaded(reg.module, manifest=reg.weight_manifest, replicated=reg.replicated_params)
        store.set(store_keys.key("ready", spec.rank), "1")
        probe = CompileProbe()
        probe.install()
        compiled = compile_region(seams.module_to_compile(reg.module), compile_cfg, probe)
        channel = Channel(
            control_group=dist.group.WORLD, data_group=dist.group.WORLD, device=device, leader=LEADER, rank=spec.rank,
            contract=contract_of(reg),
        )  # fmt: skip
        cache = KVCacheLifecycle(reset_fn=reg.reset_cache, checked=False)
        schedule = CacheSchedule(reset_every=profile.drift.reset_every)

        def step(call_id: int, phase: str) -> None:
            state.begin_call(call_id, deadline_bound=False)
            if spec.rank == LEADER:
                inputs = region.make_call_inputs(reg, call_id)
                tensors = dict(zip(region.input_names(reg, len(inputs)), inputs))
                env = send(seams.outgoing_envelope(call_envelope(call_id, schedule, tensors, phase=phase)), channel)
            else:
                env = seams.received_envelope(receive(channel))
            tokens = tokens_of(env.tensors)
            seams.cache_transition(cache, op=env.plan["cache_op"], epoch=env.cache_epoch, tokens=tokens, call_id=call_id)
            compiled(*seams.call_inputs(env.tensors, call_id).values())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            state.end_call()

        state.enter("warmup")
        warmup_calls = seams.planned_warmup_calls(profile.warmup_calls)
        for k in range(warmup_calls):
            step(k, "warmup")
        state.enter("steady")
        if fault is not None:
            fault.warmup_calls = warmup_calls
        for call_id in range(warmup_calls, warmup_calls + profile.steps):
            step(call_id, "steady")
        if spec.rank == LEADER:
            send(Envelope(kind=Kind.SHUTDOWN, call_id=warmup_calls + profile.steps), channel)
        else:
            receive(channel)
        dist.barrier()
        state.enter("done")
    except BaseException as exc:  # noqa: BLE001 - every end is recorded
        terminator.end(exc)
    terminator.end(None)


def broadcast_object(obj: Any, channel: Channel) -> Any:
    """The collectives of ``dist.broadcast_object_list`` for one object: broadcast the
    size, then the bytes. The bytes are plain JSON, not a pickle as torch's are: the
    stock loop is reachable from any profile, and nothing this package receives is
    ever unpickled."""
    is_leader = channel.rank == channel.leader
    data = json.dumps(obj).encode() if is_leader else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=channel.leader, group=channel.control_group)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if is_leader else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(payload, src=channel.leader, group=channel.control_group)
    return obj if is_leader else json.loads(bytes(host_bytes(payload)))


def send(env: Envelope, channel: Channel) -> Envelope:
    """Leader: the header as an object broadcast, then the tensors; nothing checked."""
    specs = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in env.tensors.items()]
    header = {"kind": int(env.kind), "call_id": env.call_id, "cache_epoch": env.cache_epoch, "plan": env.plan,
              "meta": env.meta, "specs": specs}  # fmt: skip
    broadcast_object(header, channel)
    for name in env.tensors:
        env.tensors[name] = env.tensors[name].to(channel.device).contiguous()
        dist.broadcast(env.tensors[name], src=channel.leader, group=channel.data_group)
    return env


def receive(channel: Channel) -> Envelope:
    """Follower: whatever header and tensors arrive."""
    h = broadcast_object(None, channel)
    env = Envelope(kind=Kind(h["kind"]), call_id=h["call_id"], cache_epoch=h["cache_epoch"], plan=h["plan"], meta=h["meta"])
    for name, shape, dtype in h["specs"]:
        tensor = torch.empty(shape, dtype=ALLOWED_DTYPES.get(dtype, torch.float32), device=channel.device)
        dist.broadcast(tensor, src=channel.leader, group=channel.data_group)
        env.tensors[name] = tensor
    return env
