"""The in-rank recipe: what one rank of a case does, in a fixed, commented order.

``run_rank`` is entered in a fresh process per rank (forked from the fork server) and
never returns: every path ends in :meth:`Terminator.end` with a final record and the
cause's exit code. The hook functions here (``apply_backend_settings``,
``resolve_compile_config``, ``make_envelope``) are runtime functions that faults patch
by name. With ``hardened: false`` the same loop runs with the runtime switched off: the
stock baseline of the detection benchmark.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from hardening.runtime.compile import gates
from hardening.runtime.compile.backend import compile_region
from hardening.runtime.compile.counters import CompileCounters
from hardening.runtime.compile.guard import RecompileGuard
from hardening.runtime.compile.probe import CompileProbe, graph_break_from_exception
from hardening.runtime.compile.trace import start_torch_trace
from hardening.runtime import drift, envelope, kv_cache as lifecycle, warmup
from hardening.harness import region
from hardening.runtime.envelope import CallContract, Channel, Envelope, Kind, TensorSpec
from hardening.errors import CompileGateError, ContractError, HardeningError
from hardening.runtime.kv_cache import CacheSchedule, KVCacheLifecycle
from hardening.inject import FaultContext, install_from_env
from hardening.runtime.parity import build_fingerprint, check_parity
from hardening.harness.profile import CompileConfig, Profile, load_profile
from hardening.harness.region import Region, RegionContext
from hardening.runtime import store as store_keys
from hardening.runtime.sidechannel import SideChannel
from hardening.runtime.record import RankState, Terminator
from hardening.runtime.watchdog import Watchdog

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True, slots=True)
class RankSpec:
    """What the launcher tells one rank process (JSON over the fork-server pipe)."""

    rank: int
    world_size: int
    store_host: str
    store_port: int
    store_prefix: str
    """Namespace of this case in the launcher's store (the store outlives every case)."""
    profile_path: str
    """A YAML file holding the resolved profile of the run."""
    rank_dir: str
    """Where this rank writes record.json (its stdout/stderr are redirected there too)."""
    parent_pid: int | None = None
    """The process whose death must end this rank (the fork server)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RankSpec":
        return cls(**data)


def apply_backend_settings(profile: Profile) -> None:
    """Apply the profile's kernel-backend settings (fault hook: C-04 diverges one rank)."""
    if profile.world.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = profile.region.dtype != "float32"


def resolve_compile_config(profile: Profile) -> CompileConfig:
    """The compile settings this rank will use (fault hook: C-01 flips enabled on one rank)."""
    return profile.compile


def connect_store(spec: RankSpec, timeout_s: float) -> dist.Store:
    return store_keys.connect(spec.store_host, spec.store_port, prefix=spec.store_prefix, timeout_s=timeout_s)


def run_rank(spec: RankSpec) -> NoReturn:
    profile = load_profile(spec.profile_path)
    state = RankState(rank=spec.rank, world_size=spec.world_size, record_path=Path(spec.rank_dir) / "record.json")
    timeouts = profile.timeouts
    terminator = Terminator(state, None, runtime=profile.hardened)
    try:
        # Store clients first: the terminator and the watchdog each get their own
        # connection, because the main thread's may be blocked in a wait when they act.
        store = connect_store(spec, timeouts.setup)
        terminator.store = connect_store(spec, timeouts.setup)

        def on_fire(fault: Any) -> None:
            state.fired_at, state.fault_touched = fault.fired_at, fault.touched
            store.set(store_keys.key("fired", spec.rank), json.dumps({"t": fault.fired_at, "touched": fault.touched}))

        def on_skip(fault: Any) -> None:
            state.fault_skipped = fault.skipped
            store.set(store_keys.key("skipped", spec.rank), fault.skipped)

        state.on_phase = lambda phase: store.set(store_keys.key("phase", spec.rank), phase)
        if profile.triage.torch_trace:  # before anything compiles
            state.artifacts["torch_trace"] = start_torch_trace(str(Path(spec.rank_dir) / "torch_trace"))
        # The fault goes in before anything it may patch runs; it acts only on its ranks.
        install_from_env(
            FaultContext(
                rank=spec.rank, world_size=spec.world_size, warmup_calls=profile.warmup_calls, on_fire=on_fire, on_skip=on_skip
            )
        )
        if profile.hardened:
            Watchdog(
                state,
                terminator,
                connect_store(spec, timeouts.setup),
                heartbeat_s=timeouts.heartbeat,
                peer_lost_s=timeouts.peer_lost,
                first_heartbeat_s=timeouts.setup,
                call_deadline_s=timeouts.call_deadline,
                parent_pid=spec.parent_pid,
            ).start()
        _recipe(spec, profile, state, store)
    except BaseException as exc:  # noqa: BLE001 - every end must be recorded, KeyboardInterrupt included
        terminator.end(exc)
    terminator.end(None)


LEADER = 0


def make_envelope(reg: Region, call_id: int, schedule: CacheSchedule, *, phase: str) -> Envelope:
    """The leader's envelope for call ``call_id`` (fault hook: OM-01..03, OM-06, OM-10)."""
    op, epoch, extra = schedule.plan(call_id)
    inputs = region.make_call_inputs(reg, call_id)
    return Envelope(
        kind=Kind.CALL,
        call_id=call_id,
        cache_epoch=epoch,
        plan={"expected_generator_calls": 1, "cache_op": op},
        meta={"phase": phase, **extra},
        tensors=dict(zip(region.input_names(reg, len(inputs)), inputs)),
    )


def _recipe(spec: RankSpec, profile: Profile, state: RankState, store: dist.Store) -> None:
    timeouts = profile.timeouts
    device = _device(profile, spec.rank)
    dtype = DTYPES[profile.region.dtype]
    is_leader = spec.rank == LEADER
    hardened = profile.hardened

    # 1. Backends, then the data plane with an explicit short timeout (never 600/1800 s).
    state.enter("init")
    apply_backend_settings(profile)
    dist.init_process_group(
        profile.world.backend,
        store=dist.PrefixStore(store_keys.PG_PREFIX, store),
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=timeouts.pg) if hardened else None,  # stock: torch's 600/1800 s
    )
    side = SideChannel(store, rank=spec.rank, world_size=spec.world_size, timeout_s=timeouts.pg)

    # 2. Env parity before anything else talks to a peer: region factories may issue
    #    collectives (DTensor's distribute_tensor broadcasts), so parity precedes build.
    state.enter("parity")
    compile_cfg = resolve_compile_config(profile)
    fingerprint = build_fingerprint(
        compile_cfg=compile_cfg,
        gates=profile.gates,
        parity=profile.parity,
        world_size=spec.world_size,
        backend=profile.world.backend,
        device=device,
        dtype=dtype,
        user_keys=profile.fingerprint_keys(),
    )
    if hardened:
        check_parity(side, fingerprint)
        side.create_group()

    # 3. Build the region; its own parity keys and its weights are checked before the
    #    first call (a perturbed shard is named here, not found as drift later).
    state.enter("build")
    ctx = RegionContext(
        rank=spec.rank,
        world_size=spec.world_size,
        device=device,
        dtype=dtype,
        group=dist.group.WORLD,
        dims=dict(profile.region.dims),
        seed=profile.region.seed,
        profile=profile,
    )
    reg = region.build_region(profile.region.target, ctx)
    if reg.parity_keys and hardened:
        check_parity(side, {f"region.{k}": json.dumps(v, default=str) for k, v in sorted(reg.parity_keys.items())}, tag="region-parity")
    if profile.drift.weights and hardened:
        drift.check_weights(side, reg.module, manifest=reg.weight_manifest, replicated=reg.replicated_params)
    store.set(store_keys.key("ready", spec.rank), "1")  # past build: `timeouts.setup` covers a factory that never returns
    sample = region.make_call_inputs(reg, 0)
    contract = CallContract(
        tensors=tuple(
            TensorSpec(
                name=n,
                shape=tuple(t.shape),
                dtype=str(t.dtype).removeprefix("torch."),
                varying=region.varying_of(reg, n, t.dim()),
            )
            for n, t in zip(region.input_names(reg, len(sample)), sample)
        )
    )
    undeclared = sorted(set(reg.varying_dims) - {t.name for t in contract.tensors})
    if undeclared:
        raise ValueError(f"Region.varying_dims names {undeclared}, which are not inputs {[t.name for t in contract.tensors]}")
    channel = Channel(
        control_group=side.group if hardened else dist.group.WORLD,
        data_group=dist.group.WORLD,
        device=device,
        leader=LEADER,
        rank=spec.rank,
        contract=contract,
        stock=not hardened,
    )
    lifecycle = KVCacheLifecycle(reset_fn=reg.reset_cache)
    schedule = CacheSchedule(reset_every=profile.drift.reset_every)

    # 4. Compile with the counting probe installed first, so no compile goes uncounted.
    probe = CompileProbe()
    probe.install()
    compiled = compile_region(reg.module, compile_cfg, probe)

    def step(call_id: int, *, phase: str) -> None:
        """One call: envelope, lifecycle, digest, then the data plane. The call deadline
        covers all of it (the leader making inputs, a follower waiting for them)."""
        # Every call has a deadline: a warmup call may compile, so it gets the compile bound
        # (a hang inside it is still caught at call_deadline: see Watchdog._check_blocked).
        state.begin_call(call_id, deadline_bound=hardened, deadline_s=timeouts.compile if phase == "warmup" else None)
        try:
            if is_leader:
                every = profile.drift.digest_every
                due = hardened and phase == "steady" and every > 0 and call_id % every == 0
                env = envelope.send(make_envelope(reg, call_id, schedule, phase=phase), channel, digest=due)
            else:
                env = envelope.receive(channel)
                drift.check_input(env, rank=spec.rank, leader=LEADER)
            first = next(iter(env.tensors.values()), None)
            tokens = int(first.shape[-2]) if first is not None and first.dim() >= 2 else 1
            lifecycle_apply(
                lifecycle, op=env.plan["cache_op"], epoch=env.cache_epoch, tokens=tokens, call_id=call_id, validate=hardened
            )
            inputs = region.inputs_of(reg, env.tensors, call_id)
            compiled(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            state.end_call()

    # 5. Warmup in lockstep; a break under fullgraph=True raises here on the first call.
    state.enter("warmup")
    if not hardened:
        num_warmup = warmup.planned_warmup_calls(profile.warmup_calls)
        for k in range(num_warmup):
            step(k, phase="warmup")
        _stock_steady(spec, profile, state, step, channel, first_call=num_warmup)
        return
    try:
        next_call = warmup.run_lockstep(
            side,
            num_calls=warmup.planned_warmup_calls(profile.warmup_calls),
            first_call_id=0,
            run_call=lambda k: step(k, phase="warmup"),
        )
    except HardeningError:
        raise
    except Exception as exc:
        reason = graph_break_from_exception(exc)
        if reason is None:
            raise
        raise CompileGateError(f"graph break in the region (fullgraph=True): {reason}") from exc
    after_warmup = probe.counters()
    state.counters = _summary(after_warmup, None, warmup=after_warmup)

    # 6. Gates after warmup: local health of every rank and symmetry across ranks,
    #    decided on gathered counters so that every rank raises the same error.
    gates.after_warmup(side, after_warmup, profile.gates, compiled=compile_cfg.enabled)

    # 7. Steady state under the recompile guard: a recompile on any rank raises at once
    #    with its guard-failure text. Entered once for the loop (not per call: it patches
    #    dynamo's config), on this thread: dynamo config is per thread.
    state.enter("steady")
    guard = RecompileGuard() if (compile_cfg.enabled and profile.gates.max_recompiles == 0) else None
    with guard if guard is not None else contextlib.nullcontext():
        for call_id in range(next_call, next_call + profile.steps):
            try:
                step(call_id, phase="steady")
            except HardeningError:
                raise
            except Exception as exc:
                reason = RecompileGuard.reason(exc)
                if reason is None:
                    raise
                total = probe.counters()
                steady = RecompileGuard.count_stopped(total.delta(after_warmup), reason)
                state.counters = _summary(total, steady, warmup=after_warmup)
                raise CompileGateError(f"rank {spec.rank} recompiled at call {call_id}, after warmup: {reason}") from exc
    if is_leader:
        envelope.send(Envelope(kind=Kind.SHUTDOWN, call_id=next_call + profile.steps), channel)
    else:
        env = envelope.receive(channel)
        if env.kind is not Kind.SHUTDOWN:
            raise ContractError(f"expected SHUTDOWN after {profile.steps} steps, got {env.kind.name} {env.call_id}")

    # 8. Final symmetric gate on steady-state compiles; the exchange is also the barrier
    #    that keeps every rank alive until all are done.
    steady = probe.counters().delta(after_warmup)
    state.counters = _summary(probe.counters(), steady, warmup=after_warmup)
    gates.in_steady_state(side, steady, profile.gates)
    state.enter("done")


def _stock_steady(spec: RankSpec, profile: Profile, state: RankState, step: Any, channel: Channel, *, first_call: int) -> None:
    """The same loop with nothing checked: what an unhardened TP worker does."""
    state.enter("steady")
    for call_id in range(first_call, first_call + profile.steps):
        step(call_id, phase="steady")
    if spec.rank == LEADER:
        envelope.send(Envelope(kind=Kind.SHUTDOWN, call_id=first_call + profile.steps), channel)
    else:
        envelope.receive(channel)
    dist.barrier()
    state.enter("done")


def lifecycle_apply(lc: KVCacheLifecycle, **kwargs: Any) -> None:
    # Looked up at call time so that a fault patching lifecycle.apply_transition acts.
    lifecycle.apply_transition(lc, **kwargs)


def _summary(
    total: "CompileCounters",
    steady: "CompileCounters | None",
    *,
    warmup: "CompileCounters",
) -> dict[str, Any]:
    """Counters in the final record: top-level numbers the reports show, details nested."""
    return {
        "graphs": total.graphs,
        "compiles": total.compiles,
        "graph_breaks": total.graph_breaks,
        "recompiles": steady.recompiles if steady is not None else 0,
        "break_reasons": total.break_reasons,
        "recompile_reasons": (steady.recompile_reasons if steady is not None else []),
        # Warmup may recompile (a new shape, a new branch): allowed, but never silent.
        "warmup_recompiles": warmup.recompiles,
        "warmup_recompile_reasons": warmup.recompile_reasons,
        "total": total.to_json(),
        "steady": steady.to_json() if steady is not None else None,
    }


def _device(profile: Profile, rank: int) -> torch.device:
    if profile.world.device == "cuda":
        index = rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
