"""Operator surfaces: the places a TP/PP server breaks, what each must guarantee, and
the code that enforces it. Data only; :mod:`hardening.harness.manual` renders it.

A surface names its **contract** in words (what a server must do, what it must never
do) and points at everything else: each tripwire is a ``module:qualname`` of the runtime
function that raises the named cause, each setting a dotted profile key, each field a
``module:Class.field`` of what the records and reports carry. The manual resolves every
pointer when it is generated, so a renamed function, key or field fails ``hardening
manual --check`` instead of leaving a stale line. Break-it tests are not listed here:
every case names its own surface (``Case.surface``).
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = (
    "env parity at init",
    "weight check after build",
    "side-channel exchange",
    "leader preflight",
    "mesh-leader preflight",
    "receiver checks",
    "warmup lockstep",
    "compile gates",
    "group checks",
    "queue bounds",
    "watchdog",
    "API misuse",
)
"""Where a tripwire lives, roughly in the order a run meets them. ``side-channel
exchange`` is every step the ranks take together on the side channel (parity, warmup
tickets, the gates, the done barrier); ``API misuse`` is a server calling the runtime
out of order: named at once, on the rank that did it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Tripwire:
    """One fail-fast check: the runtime function that raises, and where it runs."""

    where: str
    """One of :data:`STAGES`."""

    code: str
    """``module:qualname`` of the function that raises (or builds) the named cause; its
    docstring's first paragraph is the manual's description of the check."""

    check: str = ""
    """What the check refuses, where the function's docstring describes more than that
    (a public method whose misuse checks are a small part of it)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Surface:
    """One operator surface of the manual."""

    key: str
    """What cases name in ``Case.surface``."""

    title: str
    """Section heading."""

    summary: str
    """Why the surface matters, in two or three sentences."""

    must: tuple[str, ...]
    """The contract's must-haves."""

    forbid: tuple[str, ...]
    """The contract's forbidden patterns."""

    tripwires: tuple[Tripwire, ...]
    """Every fail-fast check of the surface, in the order a call meets them."""

    settings: tuple[str, ...] = ()
    """Dotted profile keys that bound or switch the surface's checks (gates, timeouts)."""

    fields: tuple[str, ...] = ()
    """``module:Class.field`` of the record and report fields the surface is judged by."""


def _t(where: str, *codes: str) -> tuple[Tripwire, ...]:
    return tuple(Tripwire(where=where, code=code) for code in codes)


def _misuse(code: str, check: str) -> Tripwire:
    return Tripwire(where="API misuse", code=code, check=check)


_ENVELOPE = "hardening.runtime.envelope"
_PIPELINE = "hardening.runtime.pipeline"
_SESSION = "hardening.runtime.session"
_WATCHDOG = "hardening.runtime.watchdog"
_RECORD = "hardening.runtime.records:RankRecord"
_RESULT = "hardening.harness.results"

SURFACES: tuple[Surface, ...] = (
    Surface(
        key="control-plane",
        title="Control-plane contract",
        summary=(
            "Every call starts with one message from the leader that tells every rank what to run. "
            "A message a peer cannot decode, or one the leader gives up on after its peers started "
            "waiting for the data plane, strands them in a collective for the process-group timeout."
        ),
        must=(
            "Frame every message: magic, protocol version and kind (CALL, SHUTDOWN, ERROR) before any payload; "
            "the control frame's size never depends on the call.",
            "Preflight before commit: serialize the meta, check every dtype and shape against the call contract, "
            "check the phase plan and stage the tensors *before* the control frame is broadcast; a failure there "
            "sends ERROR, so peers end with the leader's named cause.",
            "Manifest discipline: the header's `tensor_specs` lists exactly the tensors that follow, in order, "
            "and every entry matches the call contract built from the region (fixed dims fixed, varying dims "
            "within their declared bounds).",
            "Canonical meta: sorted-key JSON, no NaN, no pickle, so every rank decodes the same bytes the same way.",
            "Receivers check version, kind, call-id monotonicity and the manifest before they touch the data plane.",
        ),
        forbid=(
            "Pickled objects or free-form Python in the meta (`pickle`, `broadcast_object_list` of arbitrary objects).",
            "A tensor the manifest does not declare, or a dtype outside the envelope's allowed set.",
            "Failing *after* the commit point: once the frame is out, only the data-plane broadcasts may run.",
            "A leader that returns early (an exception, a `continue`) without sending ERROR or SHUTDOWN.",
        ),
        tripwires=(
            *_t("leader preflight", f"{_ENVELOPE}:preflight", f"{_ENVELOPE}:canonical_json", f"{_ENVELOPE}:_checked_specs"),
            *_t("leader preflight", f"{_PIPELINE}:Frames.preflight"),
            *_t("mesh-leader preflight", f"{_PIPELINE}:_as_outputs"),
            *_t("receiver checks", f"{_ENVELOPE}:receive", f"{_ENVELOPE}:_validate_call", f"{_SESSION}:ControlPlane._begin"),
            *_t("receiver checks", f"{_SESSION}:ControlPlane.shutdown", f"{_PIPELINE}:Frames.header"),
            _misuse(f"{_SESSION}:Session.control_plane", "control_plane() twice, or after pipeline(): one Session serves one of them."),
            *_t("API misuse", f"{_SESSION}:ControlPlane._need_inputs"),
            _misuse(f"{_SESSION}:ControlPlane.serve", "serve() before warmup() on a compiled Session: compiled code warms up in lockstep and passes the gate first."),
        ),
        settings=("steps", "warmup_calls"),
        fields=(f"{_RECORD}.last_call_id", f"{_RECORD}.phase", f"{_RECORD}.root_cause_rank"),
    ),
    Surface(
        key="multi-group",
        title="Multi-group deadlock avoidance",
        summary=(
            "A pipeline runs collectives on more than one process group: `world_pg` (every rank) and "
            "`mesh_pg` (the tensor-parallel mesh). A collective on the wrong group, one only some ranks "
            "issue, or groups created in a different order on different ranks is a hang with no error."
        ),
        must=(
            "Declare the topology once (which ranks form which group) and compare the declaration across ranks "
            "*before* any group is built: `new_group` is itself collective.",
            "Create the groups in one order on every rank and check each built group member by member.",
            "Name the group on every collective; the region's collectives run on `mesh_pg`, never on `world_pg`.",
            "Agree on the phase plan (how many region calls one message triggers) in the envelope, so every rank "
            "issues the same collectives in the same order.",
            "Give every p2p direction its own group, and post every receive a side may need before it waits.",
        ),
        forbid=(
            "Rank-conditional collectives: `if rank == 0: all_reduce(...)`, or a debug flag (a NaN check, a "
            "profiler) that adds a collective on the ranks where it is set.",
            "A collective on the default group inside a region meant for the mesh.",
            "One p2p group for both directions between two ranks (NCCL runs a pair's operations in issue order).",
        ),
        tripwires=(
            *_t("group checks", "hardening.runtime.topology:Topology.check_built", "hardening.runtime.topology:Topology.connect"),
            *_t("group checks", "hardening.runtime.topology:Topology.check", "hardening.runtime.compile.backend:refusing"),
            _misuse(f"{_SESSION}:Session.pipeline", "pipeline() twice, or after control_plane(): one Session serves one of them."),
            *_t("API misuse", f"{_PIPELINE}:Pipeline._claim_plan"),
        ),
        settings=("timeouts.pg", "compile.check_collectives", "pipeline.kind"),
        fields=("hardening.runtime.compile.counters:CompileCounters.graph_collectives",),
    ),
    Surface(
        key="backpressure",
        title="Backpressure and overlap",
        summary=(
            "A pipeline is only worth its complexity if the stages overlap; an unbounded queue hides a stalled "
            "stage until memory runs out, and a blocking one hides it forever. Queues are bounded, a full queue "
            "has a deadline, and overlap is measured, never assumed."
        ),
        must=(
            "Bound every queue: the mesh keeps `depth_in` receives posted, the control `depth_out`; the control "
            "sends only while fewer than `depth_in` chunks are in flight.",
            "Give a full queue a deadline (`pipeline.queue_timeout`) shorter than the call deadline, and end it "
            "with a named `BackpressureError` naming the stage that took nothing.",
            "Double-buffer (D=2): one chunk computing while the next is in transit. The measured sweep below shows "
            "what D=1 loses and what deeper queues do not add.",
            "Report OverlapScore and the mesh's idle time per chunk for every measured window, with the stage "
            "times said to be modelled or real.",
            "Measure what recompute on an epoch bump costs in overlap (recompute coupling) before choosing it "
            "over a stashed cache.",
        ),
        forbid=(
            "An unbounded producer (`isend` in a loop with no completion wait).",
            "A blocking wait with no deadline on a queue slot.",
            "Claiming overlap from throughput alone: a faster stage can raise results/s with no overlap at all.",
        ),
        tripwires=(
            *_t("queue bounds", f"{_PIPELINE}:Pipeline._full"),
            _misuse(f"{_PIPELINE}:Pipeline.submit", "submit() before warmup(): the mesh compiles on the warmup chunks and passes the gate first."),
            _misuse(f"{_PIPELINE}:Pipeline.serve", "serve() on rank 0: the control drives the pipeline (warmup, submit, drain)."),
            _misuse(f"{_PIPELINE}:Pipeline.close", "A mesh rank that leaves before the control's SHUTDOWN."),
            _misuse(f"{_PIPELINE}:Pipeline.segment", "segment() before warmup(): segments measure steady state."),
            *_t("API misuse", f"{_PIPELINE}:Pipeline._need_control", f"{_PIPELINE}:Pipeline._need_intact"),
        ),
        settings=(
            "pipeline.depth_in", "pipeline.depth_out", "pipeline.queue_timeout",
            "pp.gates.min_overlap_score", "pp.gates.max_mesh_idle_per_chunk_ms", "pp.gates.max_recompute_delta",
        ),  # fmt: skip
        fields=(f"{_RECORD}.pipeline", f"{_RESULT}:CaseResult.metrics"),
    ),
    Surface(
        key="shutdown",
        title="Graceful shutdown and anti-stranding",
        summary=(
            "When one rank ends, every other rank must end too, quickly and with the first rank's cause, and no "
            "process may outlive the job. Stock PyTorch leaves the survivors in a collective for 10 minutes (NCCL) "
            "or 30 (gloo), and a frozen rank is noticed by nobody."
        ),
        must=(
            "A terminal action on every path out of a server loop: SHUTDOWN when done, ERROR with the cause when not.",
            "A job-wide abort key in the store: the first failing rank writes its cause, every other rank reads it "
            "at its next watchdog tick and, two heartbeats later (its own main thread may still name its own "
            "cause), ends with `PeerError` naming it.",
            "Liveness from outside the rank: its launcher reads `/proc/<pid>/stat` and reports a dead or stopped "
            "(SIGSTOP) process at once; a rank holding the GIL is busy, not lost.",
            "A deadline on every call (`call_deadline`; `compile` for a warmup call that may compile, except a "
            "call blocked in a collective while every peer waits, which ends at `call_deadline` too).",
            "Shutdown by the runner is SIGTERM, grace, SIGKILL of each rank's whole process group; a rank whose "
            "launcher died ends itself (exit 11) instead of living on as an orphan.",
        ),
        forbid=(
            "Relying on the process-group timeout to end a stranded rank.",
            "\"Killed\" and \"hung\" in the same words: a timeout is data (`hung`, with every rank's stacks).",
            "A rank that catches an error and keeps serving without telling its peers.",
        ),
        tripwires=(
            *_t("receiver checks", f"{_PIPELINE}:Pipeline._next_frame"),
            *_t("side-channel exchange", "hardening.runtime.sidechannel:SideChannel.exchange"),
            *_t("watchdog", f"{_WATCHDOG}:Watchdog.run", f"{_WATCHDOG}:Watchdog._tick", f"{_WATCHDOG}:Watchdog._check_blocked"),
            *_t("watchdog", f"{_WATCHDOG}:Watchdog._silent_node", f"{_WATCHDOG}:Watchdog._check_peer"),
            *_t("watchdog", "hardening.runtime.records:follow_abort", "hardening.runtime.records:Terminator._attribute"),
        ),
        settings=(
            "timeouts.heartbeat", "timeouts.node_lost", "timeouts.peer_lost", "timeouts.call_deadline", "timeouts.compile",
            "timeouts.setup", "timeouts.detect", "timeouts.grace", "triage.py_spy",
        ),  # fmt: skip
        fields=(f"{_RECORD}.error_class", f"{_RECORD}.root_cause_rank", f"{_RESULT}:CaseResult.t_detect", f"{_RESULT}:RankResult.where"),
    ),
    Surface(
        key="determinism",
        title="Determinism across ranks",
        summary=(
            "Tensor parallelism is only correct if every rank runs the same program on the same inputs with the "
            "intended weights. A difference in any of them is silent: every rank exits 0 with a wrong answer."
        ),
        must=(
            "Compare a fingerprint at init, before the first collective: versions, world, compile settings, the "
            "*effective* backends each rank resolved, determinism flags and behaviour-changing environment "
            "variables (the parity table below).",
            "Digest the inputs on the leader before commit, carry the digest in the frame, and check it on every "
            "receiver before the data plane runs.",
            "Fingerprint each weight shard against the manifest of expected shards, and replicated parameters "
            "across ranks; a DTensor parameter by its local shard, never by a DTensor op (which could issue a "
            "collective on one rank only).",
        ),
        forbid=(
            "Comparing configured flags instead of measured ones (the SDPA kernel a rank really picks).",
            "Digests that round (float sums): a one-element change must change the digest.",
            "A rank that mutates its received inputs before the region runs.",
        ),
        tripwires=(
            *_t("env parity at init", "hardening.runtime.parity:check_parity"),
            *_t("weight check after build", "hardening.runtime.drift:check_weights"),
            *_t("receiver checks", "hardening.runtime.drift:check_input"),
        ),
        settings=("parity.ignore", "drift.digest_every", "drift.weights"),
    ),
    Surface(
        key="epochs",
        title="Idempotency and epochs",
        summary=(
            "A server that cancels work (a new prompt, a hard cut) still has results in flight. A result of the "
            "old epoch delivered as if it were new is the worst kind of wrong: plausible."
        ),
        must=(
            "Stamp every message with a chunk id that is monotonic over the run and a `cache_epoch` that never "
            "goes back.",
            "A result echoes its chunk's id and epoch; the receiver checks both.",
            "On a hard cut, drop every older result not yet handed over, count the drops and keep a delivery history.",
        ),
        forbid=(
            "Reusing ids after a restart of the loop, or resetting the epoch to 0.",
            "Delivering a stale result \"because it arrived\".",
        ),
        tripwires=_t("receiver checks", f"{_PIPELINE}:Pipeline._check_order", f"{_PIPELINE}:Pipeline._check_result"),
        fields=(f"{_RECORD}.pipeline",),
    ),
    Surface(
        key="kv-cache",
        title="KV-cache lifecycle",
        summary=(
            "A head-sharded KV cache is never broadcast: each rank keeps its own. Reset, advance and recompute "
            "are therefore a lockstep state machine; a rank that skips a reset attends over the wrong history "
            "and nothing else notices."
        ),
        must=(
            "Carry the cache operation (`reset`, `advance`, `recompute`) and the `cache_epoch` in the envelope.",
            "Every rank checks that the transition follows from its own state before the data plane runs.",
            "A recompute names its override explicitly (`meta.recompute_override`): no silent fallback to advance.",
        ),
        forbid=(
            "Deciding a cache reset locally on one rank (a timer, a length check that differs by rank).",
        ),
        tripwires=_t("receiver checks", "hardening.runtime.kv_cache:KVCacheLifecycle.validate"),
        settings=("drift.reset_every",),
    ),
    Surface(
        key="compiled-regions",
        title="Compiled distributed regions",
        summary=(
            "`torch.compile` over functional collectives works, and fails quietly: a graph break on one rank, a "
            "recompile after warmup, a collective only one rank's graph holds. Each is caught from the compiled "
            "graphs and Dynamo's own counters, before the graph runs where possible."
        ),
        must=(
            "Compile the same thing on every rank (compile settings are parity keys) and warm up in lockstep.",
            "Close the gates after warmup: graph breaks within `gates.max_graph_breaks`, the same graphs on every "
            "rank, at least one graph really compiled.",
            "Guard the steady state: a recompile after warmup is `CompileGateError` naming the failing guard.",
            "Compare the collectives each compiled graph issues across ranks, by position, before it runs.",
        ),
        forbid=(
            "Work objects, process groups or Python side effects inside the region (see the do/don't rules).",
            "`fullgraph=False` in production without a break budget in the gates.",
        ),
        tripwires=(
            *_t("warmup lockstep", "hardening.runtime.warmup:run_lockstep"),
            *_t("compile gates", "hardening.runtime.compile.collectives:CollectiveCheck._decide"),
            *_t("compile gates", "hardening.runtime.compile.collectives:CollectiveCheck._raise_if_decided"),
            *_t("compile gates", "hardening.runtime.compile.gates:after_warmup", "hardening.runtime.compile.gates:in_steady_state"),
            *_t("compile gates", f"{_SESSION}:Session._named"),
        ),
        settings=(
            "compile.enabled", "compile.backend", "compile.mode", "compile.fullgraph", "compile.dynamic",
            "gates.max_graph_breaks", "gates.max_recompiles", "warmup_calls", "timeouts.compile", "triage.artifacts",
        ),  # fmt: skip
        fields=(
            "hardening.runtime.compile.counters:CompileCounters.graphs",
            "hardening.runtime.compile.counters:CompileCounters.graph_breaks",
            "hardening.runtime.compile.counters:CompileCounters.recompiles",
            "hardening.runtime.compile.counters:CompileCounters.break_reasons",
            "hardening.runtime.compile.counters:CompileCounters.recompile_reasons",
            f"{_RECORD}.artifacts",
        ),
    ),
)

BY_KEY = {s.key: s for s in SURFACES}


def get_surface(key: str) -> Surface:
    """The surface ``key``; ValueError names the known ones."""
    try:
        return BY_KEY[key]
    except KeyError:
        raise ValueError(f"unknown surface {key!r}; known surfaces: {', '.join(BY_KEY)}") from None
