"""The Session: the runtime's recipe for one rank, in its one correct order.

A user's loop, or the harness's worker, asks for steps; the Session decides their order,
names the phases and writes the store keys, so that no caller can leave one out::

    @hr.record
    def main():
        with hr.Session.from_env(hr.RuntimeConfig(), fingerprint={"model": "tiny"}) as s:
            layer = s.compile(tp_layer)                      # counting probe + backend
            s.check_weights(tp_layer, replicated=("norm.weight",))
            plane = s.control_plane({"x": hr.Spec((8, 64), "float32")})
            plane.warmup(layer, calls=2, make_inputs=make)   # lockstep, gates, recompile guard
            for call in plane.serve(20, make_inputs=make):   # envelope, digest, cache, deadline
                out = layer(*call.inputs)

The order, and why:

1. ``__enter__``: the watchdog first (nothing after it can block unseen), then the data
   plane with a short timeout, then env parity before any peer is trusted, then the
   side group. Region factories may issue collectives (DTensor broadcasts), so parity
   comes before anything the caller builds.
2. ``compile`` / ``check_weights`` / ``control_plane``: the build phase; the control
   plane marks the rank ready (a launcher's setup deadline ends there). A pipeline
   server asks for ``topology`` / ``pipeline`` instead of the control plane
   (:mod:`hardening.runtime.pipeline`): its warmup, gates and SHUTDOWN follow the same
   order on rank 0 and on the mesh.
3. ``warmup``: calls in lockstep, each bound by the compile deadline; then the compile
   gate on gathered counters; then the recompile guard is armed for steady state.
4. ``serve``: one envelope per call, checked, under the call deadline.
5. ``__exit__``: SHUTDOWN, the steady-state gate (also the barrier that keeps every rank
   alive until all are done), then ``done``. On an exception: the named cause, the final
   record and the cause's exit code (``Terminator.end``).

Every fault hook is a call into :mod:`hardening.runtime.seams`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hardening.errors import CompileGateError, ContractError, HardeningError
from hardening.runtime import drift, envelope, seams, warmup
from hardening.runtime import store as store_keys
from hardening.runtime.compile import gates
from hardening.runtime.compile.backend import GroupRule, compile_region
from hardening.runtime.compile.collectives import CollectiveCheck
from hardening.runtime.compile.counters import CompileCounters
from hardening.runtime.compile.dump import DUMP_ENV, dump_on_end
from hardening.runtime.compile.guard import RecompileGuard
from hardening.runtime.compile.probe import CompileProbe, graph_break_from_exception
from hardening.runtime.config import RuntimeConfig
from hardening.runtime.envelope import CallContract, Channel, Envelope, Kind, TensorSpec
from hardening.runtime.kv_cache import CacheSchedule, KVCacheLifecycle
from hardening.runtime.overlap import pipeline_metrics
from hardening.runtime.parity import build_fingerprint, check_parity, check_user_keys
from hardening.runtime.pipeline import Pipeline
from hardening.runtime.records import RankState, Terminator, install
from hardening.runtime.sidechannel import SideChannel
from hardening.runtime.topology import MESH_LEADER, Declared, Topology, group_name
from hardening.runtime.watchdog import TermSignal, Watchdog

LEADER = 0
"""The rank that makes every call's inputs and sends them in the envelope."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Spec:
    """One input of every call: its shape, dtype, and the dimensions that may vary."""

    shape: tuple[int, ...]
    dtype: str | torch.dtype
    varying: dict[int, tuple[int, int]] = field(default_factory=dict)
    """``{dim: (low, high)}``: dimensions whose size may change from call to call (tokens)."""

    def named(self, name: str) -> TensorSpec:
        dtype = str(self.dtype).removeprefix("torch.")
        ndim = len(self.shape)
        for dim, bounds in self.varying.items():
            if not -ndim <= dim < ndim or not 0 <= bounds[0] <= bounds[1]:
                raise ValueError(f"Spec for {name!r}: varying {{{dim}: {bounds}}} must name a dimension of {self.shape} with 0 <= low <= high")
        varying = tuple(sorted((d % ndim, int(lo), int(hi)) for d, (lo, hi) in self.varying.items()))
        return TensorSpec(name=name, shape=tuple(self.shape), dtype=dtype, varying=varying)


@dataclass(kw_only=True, slots=True)
class KVCache:
    """The KV-cache schedule the leader announces and every rank checks."""

    reset_every: int | None = None
    """A new epoch (reset) every N calls, a recompute the call before; 0: only at call 0;
    None: ``config.drift.reset_every``."""
    reset_fn: Callable[[], None] | None = None
    """Clears this rank's cache buffers on a reset."""


@dataclass(kw_only=True, slots=True)
class Call:
    """One call as every rank sees it, after every check passed."""

    call_id: int
    tensors: dict[str, torch.Tensor]
    """The inputs in contract order; also reachable as attributes (``call.x``)."""
    meta: dict[str, Any]

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.tensors.values())

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise AttributeError(f"call {self.call_id} has no input {name!r} (inputs: {list(self.tensors)})") from None


class Session:
    """One rank's hardened run: entered once, left once (see the module docstring)."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        rank: int,
        world_size: int,
        store_host: str,
        store_port: int,
        store_prefix: str = "",
        record_path: str | Path,
        device: torch.device | None = None,
        backend: str | None = None,
        dtype: torch.dtype = torch.float32,
        fingerprint: dict[str, Any] | None = None,
        parent_pid: int | None = None,
    ) -> None:
        config.validate()
        check_user_keys(fingerprint or {})  # here, before any peer is involved: every rank says it alike
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.is_leader = rank == LEADER
        self.device = device or torch.device("cpu")
        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self.dtype = dtype
        self._store_at = (store_host, store_port, store_prefix)
        self._parent_pid = parent_pid
        self._fingerprint = dict(fingerprint or {})
        self.user_keys: dict[str, Any] = dict(self._fingerprint)
        """The caller's own settings as they entered parity (after the ``user_config`` seam)."""
        self.state = RankState(rank=rank, world_size=world_size, record_path=Path(record_path))
        self.terminator = Terminator(self.state, None)
        self.compile_config = config.compile
        self.probe: CompileProbe | None = None
        self.collective_check: CollectiveCheck | None = None
        """Agrees each compiled graph's collectives across ranks before it runs in warmup."""
        self.fault_context: Any = None
        """The installed fault's context, under a harness that set ``HARDENING_FAULT``."""
        self.side: SideChannel | None = None
        self.store: Any = None
        self._plane: ControlPlane | None = None
        self._pipe: Pipeline | None = None
        self._topology: Topology | None = None
        self._pipe_warm: CompileCounters | None = None
        self._term = TermSignal()

    @classmethod
    def from_env(
        cls, config: RuntimeConfig | None = None, *, fingerprint: dict[str, Any] | None = None, **kw: Any
    ) -> Session:
        """A Session for a rank started by torchrun (the agent's store at
        ``MASTER_ADDR:MASTER_PORT``, namespaced per run) or by ``hardening suite
        --program`` (``HARDENING_STORE``, ``HARDENING_RECORD``)."""
        env = os.environ
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise ValueError(f"Session.from_env: {', '.join(missing)} not set (start the program with torchrun or hardening)")
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if "HARDENING_STORE" in env:
            host, _, port = env["HARDENING_STORE"].rpartition(":")
            prefix = env.get("HARDENING_STORE_PREFIX", "")
        elif "MASTER_ADDR" in env and "MASTER_PORT" in env:
            host, port = env["MASTER_ADDR"], env["MASTER_PORT"]
            prefix = store_keys.torchrun_prefix(env)
        else:
            raise ValueError("Session.from_env: no store: set MASTER_ADDR and MASTER_PORT (torchrun does)")
        record = env.get("HARDENING_RECORD") or str(Path(".hardening") / "records" / f"rank{rank}.json")
        Path(record).parent.mkdir(parents=True, exist_ok=True)
        if "device" not in kw and torch.cuda.is_available() and kw.get("backend") == "nccl":
            kw["device"] = cuda_device(int(env.get("LOCAL_RANK", rank)))
        parent = env.get("HARDENING_PARENT_PID")
        return cls(
            config or RuntimeConfig(), rank=rank, world_size=world, store_host=host, store_port=int(port),
            store_prefix=prefix, record_path=record, fingerprint=fingerprint,
            parent_pid=int(parent) if parent else None, **kw,
        )  # fmt: skip

    # -- 1. enter: watchdog, data plane, parity, side group -----------------------------

    def _connect(self, timeout_s: float) -> Any:
        host, port, prefix = self._store_at
        return store_keys.connect(host, port, prefix=prefix, timeout_s=timeout_s)

    def __enter__(self) -> Session:
        try:
            return self._enter()
        except BaseException as exc:  # noqa: BLE001 - a failed start is a named end too, @record or not
            self.terminator.end(self._named(exc))

    def _enter(self) -> Session:
        t, s = self.config.timeouts, self.state
        install(self.terminator)  # from here on @record ends through this rank's terminator
        # Each thread that may act while another is blocked in a store wait gets its own client.
        self.store = self._connect(t.setup)
        self.terminator.store = self._connect(t.setup)
        s.on_phase = lambda phase: self.store.set(store_keys.key("phase", self.rank), phase)
        self.fault_context = install_fault(self.state, self.store)  # before any seam it may replace is reached
        self.watchdog = Watchdog(
            s, self.terminator, self._connect(t.setup), heartbeat_s=t.heartbeat, peer_lost_s=t.peer_lost,
            first_heartbeat_s=t.setup, call_deadline_s=t.call_deadline, node_lost_s=t.node_lost,
            parent_pid=self._parent_pid, term=self._term if self._term.install() else None,
        )  # fmt: skip
        self.terminator.watchdog = self.watchdog
        self.watchdog.start()

        s.enter("init")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a device given directly may not be current yet
        seams.apply_backend_settings(self.device, self.dtype)
        dist.init_process_group(
            self.backend, store=dist.PrefixStore(store_keys.PG_PREFIX, self.store), rank=self.rank,
            world_size=self.world_size, timeout=timedelta(seconds=t.pg),
        )  # fmt: skip
        self.side = SideChannel(self.store, rank=self.rank, world_size=self.world_size, timeout_s=t.pg)

        s.enter("parity")
        self.compile_config = seams.resolve_compile_config(self.config.compile)
        self.user_keys = seams.user_config(dict(self._fingerprint))
        check_parity(
            self.side,
            build_fingerprint(
                compile_cfg=self.compile_config, gates=self.config.gates, parity=self.config.parity,
                world_size=self.world_size, backend=self.backend, device=self.device, dtype=self.dtype,
                user_keys=self.user_keys,
            ),
        )  # fmt: skip
        self.side.create_group()
        s.enter("build")
        return self

    def check_parity(self, keys: dict[str, Any], *, tag: str) -> None:
        """Settings that become known only after build (a region's own keys) agree on every rank."""
        assert self.side is not None, "enter the Session first"
        check_parity(self.side, {k: _json(v) for k, v in sorted(keys.items())}, tag=tag)

    # -- 2. build: compile, weights, control plane --------------------------------------

    def compile(self, module: Any) -> Any:
        """``module`` compiled through the counting backend per ``config.compile`` (or as
        it is, when compile is off); the probe counts from the first compile on."""
        if self.probe is None:
            self.probe = CompileProbe()
            self.probe.install()
            dump_dir, probe = os.environ.get(DUMP_ENV, "").strip(), self.probe
            if dump_dir and self.state.on_end is None:
                probe.keep_graphs = True
                self.state.on_end = lambda ok: dump_on_end(self.state, probe, dump_dir)
        cfg = self.compile_config
        if self.collective_check is None and cfg.enabled and cfg.check_collectives and self._topology is None:
            # (a pipeline's mesh runs on a subgroup, which the check does not compare yet)
            assert self.store is not None, "enter the Session first"
            self.collective_check = CollectiveCheck(
                self.store, rank=self.rank, world_size=self.world_size, timeout_s=self.config.timeouts.compile or 300.0
            )
        return compile_region(
            seams.module_to_compile(module), self.compile_config, self.probe, self.collective_check, groups=self._group_rule
        )

    def _group_rule(self) -> GroupRule | None:
        """A mesh rank's compiled region may issue collectives on ``mesh_pg`` only (read
        when a graph compiles, so compile() may come before pipeline())."""
        pipe = self._pipe
        if pipe is None or pipe.is_control:
            return None
        known = pipe.topology.names()
        mesh = group_name(pipe.topology.group("mesh_pg"))
        return GroupRule(allowed={mesh: known[mesh]}, known=known, rank=self.rank)

    def check_weights(self, module: torch.nn.Module, *, manifest: dict[str, Any] | None = None, replicated: Sequence[str] = ()) -> None:
        """DriftError on every rank naming parameter and rank when a shard is not what the
        ``manifest`` says, or a replicated parameter (declared, or a DTensor placed
        ``Replicate``) differs across ranks."""
        assert self.side is not None, "enter the Session first"
        seams.weights_loaded(module, manifest=manifest, replicated=tuple(replicated))
        if self.config.drift.weights:
            drift.check_weights(self.side, module, manifest=manifest, replicated=tuple(replicated))

    def control_plane(self, inputs: dict[str, Spec] | CallContract, *, cache: KVCache | None = None) -> ControlPlane:
        """The per-call envelope: the leader sends the inputs ``inputs`` describes, every
        rank checks them (and the KV-cache transition) before its data plane."""
        assert self.side is not None, "enter the Session first"
        contract = inputs if isinstance(inputs, CallContract) else CallContract(tensors=tuple(s.named(n) for n, s in inputs.items()))
        if self._plane is not None or self._pipe is not None:
            raise ContractError("control_plane() called twice, or after pipeline(): one Session serves one of them")
        # Every rank derives the frame's layout from its own contract: they must agree
        # before the first frame, or the first broadcast would not even line up.
        layout = envelope.host_layout(contract, self.device)
        check_parity(
            self.side, contract_keys(contract, layout), tag="runtime/contract",
            hint="(every rank must describe the same inputs to control_plane(): the leader's calls are checked against it)",
        )  # fmt: skip
        cache = cache or KVCache()
        if cache.reset_every is None:
            cache = KVCache(reset_every=self.config.drift.reset_every, reset_fn=cache.reset_fn)
        self._plane = ControlPlane(self, contract, cache, layout)
        self.store.set(store_keys.key("ready", self.rank), "1")  # past build
        return self._plane

    def topology(self) -> Topology:
        """The process groups of ``config.pipeline.kind`` (see
        :mod:`hardening.runtime.topology`), built once by every rank in the declared order
        and checked against the declaration on every rank (the declaration by parity,
        before any group exists; then each group's members and a probe message on each
        p2p group). ``pipeline()`` builds it too; call it first when the region needs
        ``mesh_pg`` before the pipeline's contract is known."""
        assert self.side is not None, "enter the Session first"
        if self._topology is None:
            declared = Declared.of(self.config.pipeline.kind, self.world_size)
            check_parity(self.side, declared.parity_keys(), tag="runtime/topology", hint="(every rank must declare the same topology)")
            self._topology = Topology.build(declared, rank=self.rank, device=self.device, connect_s=self.config.timeouts.pg)
        return self._topology

    def pipeline(self, inputs: dict[str, Spec], outputs: dict[str, Spec]) -> Pipeline:
        """The pipeline of ``config.pipeline`` (PP0 or PP1, see
        :mod:`hardening.runtime.topology`): its groups built and checked against the
        declared topology on every rank, the contract of a chunk's ``inputs`` and a
        result's ``outputs`` (fixed shapes) agreed by parity, then the rank is ready.
        Rank 0 drives it (``warmup``/``submit``/``drain``), every other rank ``serve``s."""
        assert self.side is not None, "enter the Session first"
        if self._pipe is not None or self._plane is not None:
            raise ContractError("pipeline() after pipeline() or control_plane(): one Session serves one of them")
        cfg, t = self.config.pipeline, self.config.timeouts
        if t.call_deadline and cfg.queue_timeout >= t.call_deadline:
            raise ValueError(
                f"pipeline.queue_timeout ({cfg.queue_timeout:g}s) must be below timeouts.call_deadline ({t.call_deadline:g}s): "
                "a full queue must be named before the call deadline ends the rank"
            )
        specs = {}
        for what, contract in (("inputs", inputs), ("outputs", outputs)):
            if not contract:
                raise ValueError(f"pipeline(): {what} must name at least one tensor")
            for name, spec in contract.items():
                if spec.varying:
                    raise ValueError(f"pipeline(): {what}[{name!r}] declares varying dims; pipeline messages have fixed shapes")
                dtype = str(spec.dtype).removeprefix("torch.")
                if dtype not in envelope.ALLOWED_DTYPES:
                    raise ValueError(f"pipeline(): {what}[{name!r}] has dtype {dtype}; allowed: {', '.join(sorted(envelope.ALLOWED_DTYPES))}")
                if any(not isinstance(d, int) or d < 1 for d in spec.shape):
                    raise ValueError(f"pipeline(): {what}[{name!r}] has shape {spec.shape}; every dim must be a positive int")
            specs[what] = tuple(spec.named(name) for name, spec in contract.items())
        topology = self.topology()
        keys = {
            "pipeline.depth_in": str(cfg.depth_in), "pipeline.depth_out": str(cfg.depth_out),
            "pipeline.queue_timeout": str(cfg.queue_timeout),
            **{f"pipeline.{what}.{t.name}": t.describe() for what, ts in specs.items() for t in ts},
        }  # fmt: skip
        check_parity(self.side, keys, tag="runtime/pipeline", hint="(every rank must declare the same pipeline)")
        self._pipe = Pipeline(self, topology, specs["inputs"], specs["outputs"])
        self.store.set(store_keys.key("ready", self.rank), "1")  # past build
        return self._pipe

    def pipeline_gate_after_warmup(self) -> None:
        """The compile gate over the mesh's counters (every rank takes part: the control
        runs no region). Called by the pipeline as its warmup ends, on every rank."""
        pipe = self._pipe
        assert pipe is not None
        mine = self.probe.counters() if self.probe is not None and not pipe.is_control else CompileCounters()
        self._pipe_warm = mine
        if not pipe.is_control and self.probe is not None:
            self.state.counters = summary(mine, None, warmup=mine, check=self.collective_check)
        gates.after_warmup(self.side, mine, self.config.gates, compiled=self.compile_config.enabled, among=pipe.topology.mesh)

    def steady_guard(self) -> RecompileGuard | None:
        """The recompile guard for this rank's steady state, when the gates ask for one."""
        if self.probe is not None and self.compile_config.enabled and self.config.gates.max_recompiles == 0:
            return RecompileGuard()
        return None

    def _finish_pipeline(self, pipe: Pipeline) -> None:
        """SHUTDOWN (the control's close), the timelines gathered so every record holds the
        overlap metrics, then the steady-state gate over the mesh (also the done barrier)."""
        pipe.close()
        record = pipe.summary()
        # Only the timelines travel (rank 0's history stays in its own record).
        mine = {"timelines": record["timelines"], "segments": record.get("segments", [])}
        summaries = self.side.exchange("pipeline/timelines", mine)
        control, leader = summaries[0], summaries[MESH_LEADER]
        record["metrics"] = {
            name: pipeline_metrics(control["timelines"][str(index)], leader["timelines"][str(index)])
            for index, name in enumerate(control["segments"])
            if str(index) in leader["timelines"] and leader["timelines"][str(index)]["chunks"] > 0
        }
        self.state.pipeline = record
        warm = self._pipe_warm
        if warm is None:
            self.side.exchange("done", self.rank)
            return
        steady = CompileCounters()
        if self.probe is not None and not pipe.is_control:
            total = self.probe.counters()
            steady = total.delta(warm)
            self.state.counters = summary(total, steady, warmup=warm, check=self.collective_check)
        gates.in_steady_state(self.side, steady, self.config.gates, among=pipe.topology.mesh)

    # -- 5. exit: shutdown, steady gate, done --------------------------------------------

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None:
            self.terminator.end(self._named(exc))  # never returns
        try:
            self._finish()
        except BaseException as err:  # noqa: BLE001 - a gate or SHUTDOWN failing here is a named end
            self.terminator.end(self._named(err))
        return False

    def _finish(self) -> None:
        if self._pipe is not None:
            self._finish_pipeline(self._pipe)
            self._done()
            return
        plane = self._plane
        if plane is not None:
            plane.close()
            if not plane.shut_down:
                plane.shutdown()
        if self.probe is not None and plane is not None and plane.after_warmup is not None:
            total = self.probe.counters()
            steady = total.delta(plane.after_warmup)
            self.state.counters = summary(total, steady, warmup=plane.after_warmup, check=self.collective_check)
            gates.in_steady_state(self.side, steady, self.config.gates)
        else:
            self.side.exchange("done", self.rank)  # nobody leaves while a peer still needs it
        self._done()

    def _done(self) -> None:
        self.state.enter("done")
        # Peers stop watching this rank, and it stops watching them: whatever the program
        # does next (report, exit without @record) is no longer a death to anyone.
        self.store.set(store_keys.key("done", self.rank), "1")
        self.store.add(store_keys.EVENTS, 1)
        self.watchdog.stop()
        self._term.uninstall()

    def _named(self, exc: BaseException) -> BaseException:
        """A recompile under the guard or a break under fullgraph is the compile gate's cause."""
        if isinstance(exc, HardeningError) or self.probe is None:
            return exc
        plane = self._plane
        warm = plane.after_warmup if plane is not None else self._pipe_warm
        reason = RecompileGuard.reason(exc)
        if reason is not None and warm is not None:
            total = self.probe.counters()
            steady = RecompileGuard.count_stopped(total.delta(warm), reason)
            self.state.counters = summary(total, steady, warmup=warm, check=self.collective_check)
            gate = CompileGateError(f"rank {self.rank} recompiled at call {self.state.call_id}, after warmup: {reason}")
        else:
            reason = graph_break_from_exception(exc)
            if reason is None:
                return exc
            gate = CompileGateError(f"graph break in the region (fullgraph=True): {reason}")
        gate.__cause__ = exc
        return gate


class ControlPlane:
    """The per-call envelope between the leader and every other rank."""

    def __init__(self, session: Session, contract: CallContract, cache: KVCache, layout: envelope.Layout | None) -> None:
        self.session = session
        self.contract = contract
        self.channel = Channel(
            control_group=session.side.group, data_group=dist.group.WORLD, device=session.device,
            leader=LEADER, rank=session.rank, contract=contract, layout=layout,
        )  # fmt: skip
        self.cache = KVCacheLifecycle(reset_fn=cache.reset_fn)
        self.schedule = CacheSchedule(reset_every=int(cache.reset_every or 0))
        self.next_call = 0
        self.after_warmup: CompileCounters | None = None
        self.shut_down = False
        self._guard: RecompileGuard | None = None
        self._serving: Iterator[Call] | None = None

    def _begin(self, make_inputs: Callable[[int], dict[str, torch.Tensor]] | None, *, phase: str, meta: dict[str, Any] | None = None) -> Call:
        """Envelope, digest, cache transition: everything before the data plane."""
        s = self.session
        call_id = self.next_call
        self.next_call += 1
        limit = s.config.timeouts.compile if phase == "warmup" else None
        s.state.begin_call(call_id, deadline_bound=True, deadline_s=limit)
        if s.is_leader:
            every = s.config.drift.digest_every
            env = call_envelope(
                call_id, self.schedule, make_inputs(call_id), phase=phase, meta=meta,
                expected_calls=self.contract.expected_generator_calls,
            )  # fmt: skip
            due = phase == "steady" and every > 0 and call_id % every == 0
            env = envelope.send(seams.outgoing_envelope(env), self.channel, digest=due)
        else:
            env = seams.received_envelope(envelope.receive(self.channel))
            if env.kind is not Kind.CALL:
                raise ContractError(
                    f"expected call {call_id}, got {env.kind.name} {env.call_id}: the leader served fewer calls than this rank"
                )
            drift.check_input(env, rank=s.rank, leader=LEADER)
        seams.cache_transition(
            self.cache, op=env.plan["cache_op"], epoch=env.cache_epoch, tokens=tokens_of(env.tensors), call_id=call_id
        )
        return Call(call_id=call_id, tensors=seams.call_inputs(env.tensors, call_id), meta=env.meta)

    def _need_inputs(self, make_inputs: Any, what: str) -> None:
        """The leader makes every call's inputs: warmup() and serve() need ``make_inputs`` there."""
        if self.session.is_leader and make_inputs is None:
            raise ContractError(f"{what}: the leader (rank {LEADER}) needs make_inputs: it makes every call's inputs")

    def _end(self) -> None:
        if self.session.device.type == "cuda":
            torch.cuda.synchronize(self.session.device)
        self.session.state.end_call()

    # -- 3. warmup ----------------------------------------------------------------------

    def warmup(self, fn: Callable[..., Any], *, calls: int, make_inputs: Callable[[int], dict[str, torch.Tensor]] | None = None) -> None:
        """``calls`` warmup calls of ``fn(*call.inputs)`` in lockstep (a rank planning
        fewer is named before any compile), then the compile gate on every rank's
        counters, then the recompile guard for what follows."""
        s = self.session
        self._need_inputs(make_inputs, "warmup()")
        if calls < 1:
            raise ValueError(f"warmup(calls={calls}): at least one call (the first compile happens there)")
        s.state.enter("warmup")

        check = s.collective_check

        def one(_: int) -> None:
            call = self._begin(make_inputs, phase="warmup")
            try:
                if check is not None:
                    check.begin_call(call.call_id)
                fn(*call.inputs)
                if check is not None:
                    check.end_call()  # every collective of the call issued: compare the whole sequence
            finally:
                if check is not None:
                    check.active = False
                self._end()

        try:
            self.next_call = warmup.run_lockstep(
                s.side, num_calls=seams.planned_warmup_calls(calls), first_call_id=self.next_call, run_call=one
            )
        except HardeningError:
            raise
        except Exception as exc:
            named = s._named(exc)
            if named is exc:
                raise
            raise named from exc
        probe = s.probe
        if probe is None:
            return  # nothing compiled: no gate to close
        self.after_warmup = probe.counters()
        s.state.counters = summary(self.after_warmup, None, warmup=self.after_warmup, check=s.collective_check)
        gates.after_warmup(s.side, self.after_warmup, s.config.gates, compiled=s.compile_config.enabled)
        if s.compile_config.enabled and s.config.gates.max_recompiles == 0:
            self._guard = RecompileGuard()

    # -- 4. serve -----------------------------------------------------------------------

    def serve(self, calls: int, *, make_inputs: Callable[[int], dict[str, torch.Tensor]] | None = None, meta: dict[str, Any] | None = None) -> Iterator[Call]:
        """``calls`` steady-state calls, each yielded after its envelope and checks; the
        call deadline runs until the loop body returns. Under the recompile guard (entered
        once, on this thread: Dynamo's config is per thread)."""
        s = self.session
        self._need_inputs(make_inputs, "serve()")
        if s.probe is not None and self.after_warmup is None:
            raise ContractError("serve() before warmup(): compiled code must warm up in lockstep and pass the gate first")
        self._serving = self._calls(calls, make_inputs, meta)
        return self._serving

    def _calls(self, calls: int, make_inputs: Any, meta: dict[str, Any] | None) -> Iterator[Call]:
        self.session.state.enter("steady")
        fault = self.session.fault_context
        if fault is not None and fault.warmup_calls is None:
            fault.warmup_calls = self.next_call  # a fault's "first steady call" is this program's
        with self._guard if self._guard is not None else contextlib.nullcontext():
            for _ in range(calls):
                call = self._begin(make_inputs, phase="steady", meta=meta)
                try:
                    yield call
                finally:
                    self._end()

    def close(self) -> None:
        """End a serve() loop left unfinished: its call deadline and guard end with it."""
        if self._serving is not None:
            self._serving.close()
            self._serving = None

    def shutdown(self) -> None:
        """The leader's SHUTDOWN; a follower checks it got one, not another call."""
        if self.session.is_leader:
            envelope.send(Envelope(kind=Kind.SHUTDOWN, call_id=self.next_call), self.channel)
        else:
            env = envelope.receive(self.channel)
            if env.kind is not Kind.SHUTDOWN:
                raise ContractError(f"expected SHUTDOWN after call {self.next_call - 1}, got {env.kind.name} {env.call_id}")
        self.shut_down = True


def cuda_device(index: int) -> torch.device:
    """The CUDA device of local rank ``index`` (wrapping over the visible ones), made
    current: without it every rank's NCCL setup lands on GPU 0."""
    device = torch.device("cuda", index % max(1, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def call_envelope(
    call_id: int,
    schedule: CacheSchedule,
    tensors: dict[str, torch.Tensor],
    *,
    phase: str,
    expected_calls: int = 1,
    meta: dict[str, Any] | None = None,
) -> Envelope:
    """The leader's envelope of call ``call_id``: the cache schedule's plan, the phase and
    the inputs (in contract order)."""
    op, epoch, extra = schedule.plan(call_id)
    return Envelope(
        kind=Kind.CALL, call_id=call_id, cache_epoch=epoch,
        plan={"expected_generator_calls": expected_calls, "cache_op": op},
        meta={"phase": phase, **(meta or {}), **extra}, tensors=dict(tensors),
    )  # fmt: skip


def contract_keys(contract: CallContract, layout: envelope.Layout | None) -> dict[str, str]:
    """The call contract as parity keys: each tensor's shape and dtype, their order, the
    region calls per envelope, and how its frames travel (``layout``, from this rank's device)."""
    keys = {f"contract.tensor.{s.name}": s.describe() for s in contract.tensors}
    keys["contract.order"] = ",".join(s.name for s in contract.tensors)
    keys["contract.expected_generator_calls"] = str(contract.expected_generator_calls)
    keys["contract.frame"] = f"fused, {layout.size} bytes" if layout is not None else "split"
    return keys


def tokens_of(tensors: dict[str, torch.Tensor]) -> int:
    """Tokens a call writes to the cache: the first input's second-to-last dimension."""
    first = next(iter(tensors.values()), None)
    return int(first.shape[-2]) if first is not None and first.dim() >= 2 else 1


def install_fault(state: RankState, store: Any) -> Any:
    """The fault ``HARDENING_FAULT`` names (set identically on every rank by a harness),
    acting on the ranks it names; when it acts or finds it cannot, the rank's record and
    the store say so (the store first: the fault may kill the rank next). Returns its
    ``FaultContext`` (None without a fault): the loop tells it where steady state starts."""
    if not os.environ.get("HARDENING_FAULT", "").strip():
        return None
    from hardening.inject import FaultContext, install_from_env  # only when asked: faults are test code

    def on_fire(fault: Any) -> None:
        state.fired_at, state.fault_touched = fault.fired_at, fault.touched
        store.set(store_keys.key("fired", state.rank), json.dumps({"t": fault.fired_at, "touched": fault.touched}))

    def on_skip(fault: Any) -> None:
        state.fault_skipped = fault.skipped
        store.set(store_keys.key("skipped", state.rank), fault.skipped)

    ctx = FaultContext(rank=state.rank, world_size=state.world_size, on_fire=on_fire, on_skip=on_skip)
    install_from_env(ctx)
    return ctx


def summary(
    total: CompileCounters, steady: CompileCounters | None, *, warmup: CompileCounters, check: CollectiveCheck | None = None
) -> dict[str, Any]:
    """Counters in the final record: top-level numbers the reports show, details nested."""
    out = {
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
    if check is not None:
        # What the collective check could not decide is never silent either.
        out["collective_check"] = {"seconds": round(check.checked_s, 4), "undecided": list(check.undecided)}
    return out


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


__all__ = [
    "Call", "ControlPlane", "KVCache", "LEADER", "Session", "Spec", "call_envelope", "cuda_device", "install_fault",
    "summary", "tokens_of",
]  # fmt: skip
