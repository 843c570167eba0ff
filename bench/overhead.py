"""Benchmark: steady-state overhead of the hardening runtime on the compiled reference region.

Starts the ranks once (real processes, gloo on 127.0.0.1, the c10d store hosted by this
process as the runner hosts it), builds the reference region (``hardening.harness.reference``,
tensor-parallel over the ranks) and compiles it through ``compile_region``
with a ``CompileProbe``, as the worker does. Then every rank times interleaved blocks of
``--calls`` calls of the loops below, ``--repeats`` times (their order is rotated from one
repeat to the next, so drift and position effects fall on all of them alike):

A  lower bound, no control plane at all: the leader makes the inputs of the call
   (``region.make_inputs``) and ships each tensor with ``dist.broadcast`` on the data
   group; the KV cache is reset at the same calls as in B; every rank runs the compiled
   region. No call id, no plan, no meta travel: real serving code cannot be this bare.
S  stock, the loop the worker itself runs with ``hardened: false`` (the stock loop on a
   channel whose control group is the data group, as ``hardening/harness/stock.py`` runs it):
   ``RankState.begin_call``/``end_call``, the leader's envelope (as ``ControlPlane`` builds it),
   ``envelope.send``/``receive`` in their stock form (the header -- kind, call_id, epoch,
   plan, meta, tensor specs -- in two broadcasts (size, bytes) as ``broadcast_object_list`` does (JSON, not pickle),
   then the tensors; nothing checked), an unchecked ``KVCacheLifecycle(checked=False)``,
   the compiled region. No watchdog, no recompile guard. This is the realistic
   unhardened baseline: it ships its meta too.
B  hardened, what ``ControlPlane.serve`` does per call in steady state, inside the recompile guard
   entered once around the whole block (as the worker enters it once around its steady
   loop, not per call): ``RankState.begin_call``/``end_call``, the leader's
   the envelope and ``envelope.send(..., digest=True)`` on every call
   (``digest_every=1``: preflight, canonical JSON, staging, the input digest
   ``digest.input_digest`` -- CRC-32 of header+meta and two words per tensor -- computed
   before the commit, then the ``uint8[1024]`` control frame -- prefix + digest + header
   + meta -- broadcast on the gloo side group, plus one more broadcast only when the
   payload exceeds the frame; then the tensors on the data group), the followers'
   ``envelope.receive`` (validation against the call contract) and
   ``drift.check_input`` (digest what arrived, compare with the leader's digest from the
   frame; no collective), ``lifecycle.apply_transition``, the compiled region. A
   ``Watchdog`` thread runs in the rank for the whole block (heartbeat ``--heartbeat`` s
   into the store, abort poll, peer liveness, call deadline).
C  as B with the digest off (``send(..., digest=False)``, ``digest_every=0``): the frame
   carries no digest and ``check_input`` is a no-op, so C - B is the digest's local
   compute only (leader and followers), not a collective.
D  (attribution, no region, no Python around them) the control-plane collectives alone:
   B's control-frame broadcast (+ its continuation when digest+header+meta are longer
   than the frame) on the side group, and S's object broadcast (size, then bytes) of the
   header on the data group. Per call A issues 2 tensor broadcasts + the region's 2
   all-reduces; S issues 2 + 2 more broadcasts (object list) + the same all-reduces; B
   and C issue 1 broadcast (control frame) + 2 tensor broadcasts + the same all-reduces:
   one control collective per call, against S's two.

Per-call wall time is measured on every rank (the ranks run in lockstep, so the slowest
piece of either rank shows on both). The main table gives the median and the mean
per call of each loop on each rank (the mean is block wall time over calls, so it also
carries B's and C's guard enter/exit, once per block) and the ratios to S (the stock
loop) and to A (the bare lower bound); the second table splits each loop into its
pieces (in a lockstep loop, waiting for the peer lands in whichever piece holds the next
collective: a follower's ``receive`` includes the leader making the inputs and
computing its digest, a ``region call`` includes the slower rank's share of the
all-reduces). A last table times the local pieces alone, without any collective
(preflight, digest computation, ``check_input`` on an equal digest, guard enter/exit,
lifecycle), so that collective latency and Python cost can be told apart.

Not included (paid once per run, not per call): process launch and the fork server,
init and env parity, region parity keys, the weight fingerprints, warmup lockstep
tickets, the compile gates, the SHUTDOWN envelope, fault-injection install. The watchdog
is stopped during the A, S and D blocks so that they carry none of the runtime; its cost
in B and C is indirect (a thread doing 3 store requests per heartbeat, taking the
GIL) and shows only in the totals. Each rank uses ``--threads`` intra-op threads
(default 1: two ranks on a 2-core box). The numbers are wall times: anything else
running on the machine's cores inflates every collective's latency (the header prints
the load average before and after the run).

    python bench/overhead.py [--calls 100] [--repeats 15] [--hidden 256 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

VARIANTS = ("A", "S", "B", "C", "D")
RATIO_VARIANTS = ("A", "S", "B", "C")
BASELINES = ("S", "A")
TITLES = {
    "A": "A bare lower bound (make inputs, broadcast tensors, region)",
    "S": "S stock worker loop, hardened: false (header object, tensors, region)",
    "B": "B hardened (envelope + digest every call, check_input, lifecycle, watchdog, guard once per block)",
    "C": "C hardened, digest off (send digest=False; check_input a no-op)",
    "D": "D control-plane collectives alone (no region, no Python around them)",
}
PIECES = {
    "A": ("inputs", "broadcast", "region"),
    "S": ("bookkeeping", "make_envelope", "stock_envelope", "lifecycle", "region"),
    "B": ("bookkeeping", "make_envelope", "envelope", "check_input", "lifecycle", "region"),
    "D": ("control", "object_list"),
}
PIECES["C"] = PIECES["B"]
PIECE_TITLES = {
    "inputs": "leader makes the inputs (+ cache reset at the same calls as B)",
    "broadcast": "dist.broadcast of each input tensor",
    "region": "compiled region call",
    "bookkeeping": "begin_call/end_call (B, C: the recompile guard is entered once per block, not here)",
    "make_envelope": "the leader's envelope (schedule plan + inputs)",
    "envelope": "envelope.send (leader: preflight, staging, B: + digest.input_digest; control frame + tensors) "
    "/ envelope.receive (followers: control frame, validation, tensors)",
    "stock_envelope": "stock envelope.send / receive: header object (size + bytes) + tensors",
    "check_input": "drift.check_input (followers: digest what arrived, compare; C and leader: ~0, no-op)",
    "lifecycle": "lifecycle.apply_transition",
    "control": "broadcast uint8[1024] control frame (+ continuation if B's payload is longer), side group",
    "object_list": "S's header object (size + bytes broadcasts), data group",
}
LOCAL_TITLES = {
    "preflight": "envelope.preflight + canonical JSON (leader, no collective)",
    "input_digest": "digest.input_digest: CRC-32 of header+meta + 2 words per tensor (no collective)",
    "check_input": "drift.check_input on an equal digest (follower: digest + compare, no collective)",
    "guard": "RecompileGuard enter + exit (once per steady loop in the worker, once per block here)",
    "lifecycle": "lifecycle.apply_transition (advance, no reset)",
}


# ------------------------------------------------------------------------------------------
# Rank process
# ------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the benchmark's parent process dies."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def rank_main(spec: dict[str, Any]) -> None:
    _die_with_parent()
    import torch
    import torch.distributed as dist

    from hardening.runtime.compile.backend import compile_region
    from hardening.runtime.compile.guard import RecompileGuard
    from hardening.runtime.compile.probe import CompileProbe
    from hardening.runtime import digest, drift, envelope
    from hardening.harness import reference, region, stock
    from hardening.runtime import seams
    from hardening.runtime.session import LEADER, call_envelope, tokens_of
    from hardening.runtime.envelope import CallContract, Channel, TensorSpec
    from hardening.runtime.kv_cache import CacheSchedule, KVCacheLifecycle
    from hardening.harness.profile import load_profile
    from hardening.harness.region import RegionContext
    from hardening.runtime.sidechannel import SideChannel
    from hardening.runtime.records import RankState, Terminator
    from hardening.runtime.watchdog import Watchdog

    rank, world = spec["rank"], spec["world"]
    leader = rank == LEADER
    torch.set_num_threads(spec["threads"])
    timeout = timedelta(seconds=spec["pg_timeout"])

    def connect() -> dist.Store:
        raw = dist.TCPStore("127.0.0.1", spec["port"], is_master=False, timeout=timeout)
        return dist.PrefixStore("bench", raw)

    profile = load_profile(
        "cpu",
        {
            "world.ranks": world,
            "region.dims": spec["dims"],
            "compile.backend": spec["backend"],
            "drift.reset_every": spec["reset_every"],
            "timeouts.heartbeat": spec["heartbeat"],
            "timeouts.pg": spec["pg_timeout"],
        },
    )
    t = profile.timeouts
    store = connect()
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=world, timeout=timeout)
    side = SideChannel(store, rank=rank, world_size=world, timeout_s=t.pg)
    side.create_group()

    device, dtype = torch.device("cpu"), torch.float32
    ctx = RegionContext(
        rank=rank, world_size=world, device=device, dtype=dtype, group=dist.group.WORLD,
        dims=dict(profile.region.dims), seed=profile.region.seed, profile=profile,
    )
    reg = reference.build(ctx)
    sample = region.make_call_inputs(reg, 0)
    names = region.input_names(reg, len(sample))
    contract = CallContract(
        tensors=tuple(
            TensorSpec(name=n, shape=tuple(x.shape), dtype=str(x.dtype).removeprefix("torch."))
            for n, x in zip(names, sample)
        )
    )
    channel = Channel(
        control_group=side.group, data_group=dist.group.WORLD, device=device, leader=LEADER, rank=rank,
        contract=contract,
    )
    # The stock loop's channel, as hardening/harness/stock.py builds it.
    stock_channel = Channel(
        control_group=dist.group.WORLD, data_group=dist.group.WORLD, device=device, leader=LEADER, rank=rank,
        contract=contract,
    )
    lc = KVCacheLifecycle(reset_fn=reg.reset_cache)
    schedule = CacheSchedule(reset_every=profile.drift.reset_every)
    stock_lc = KVCacheLifecycle(reset_fn=reg.reset_cache, checked=False)
    stock_schedule = CacheSchedule(reset_every=profile.drift.reset_every)
    reset_every = profile.drift.reset_every
    probe = CompileProbe()
    probe.install()
    compiled = compile_region(reg.module, profile.compile, probe)

    out_dir = Path(spec["out"])
    state = RankState(rank=rank, world_size=world, record_path=out_dir / f"record{rank}.json")
    state.on_phase = lambda phase: store.set(f"phase/{rank}", phase)
    terminator = Terminator(state, connect())  # a real end (record, abort, exit code) if the watchdog fires
    guard = RecompileGuard() if profile.compile.enabled and profile.gates.max_recompiles == 0 else None
    pc = time.perf_counter

    def make_envelope(call_id: int, plan: CacheSchedule) -> Any:
        """The leader's envelope as ControlPlane builds it."""
        return call_envelope(call_id, plan, dict(zip(names, region.make_call_inputs(reg, call_id))), phase="steady")

    # -- the loops; each returns its pieces' seconds ---------------------------------------
    plain_id = 0
    stock_id = 0
    hard_id = 0

    def plain_call() -> list[float]:
        nonlocal plain_id
        call_id, plain_id = plain_id, plain_id + 1
        t0 = pc()
        if call_id == 0 or (reset_every and call_id % reset_every == 0):
            reg.reset_cache()
        if leader:
            tensors = reg.make_inputs(call_id)
        else:
            tensors = tuple(torch.empty(s.shape, dtype=getattr(torch, s.dtype)) for s in contract.tensors)
        t1 = pc()
        for x in tensors:
            dist.broadcast(x, src=LEADER)
        t2 = pc()
        compiled(*tensors)
        t3 = pc()
        return [t1 - t0, t2 - t1, t3 - t2]

    def stock_call() -> list[float]:
        """A steady call of the stock loop (hardening/harness/stock.py), in pieces."""
        nonlocal stock_id
        call_id, stock_id = stock_id, stock_id + 1
        t0 = pc()
        state.begin_call(call_id, deadline_bound=True)
        try:
            t1 = pc()
            if leader:
                env = make_envelope(call_id, stock_schedule)
                t2 = pc()
                env = stock.send(env, stock_channel)
            else:
                t2 = pc()
                env = stock.receive(stock_channel)
            t3 = pc()
            tokens = tokens_of(env.tensors)
            seams.cache_transition(stock_lc, op=env.plan["cache_op"], epoch=env.cache_epoch, tokens=tokens, call_id=call_id)
            t4 = pc()
            inputs = tuple(seams.call_inputs(env.tensors, call_id).values())
            compiled(*inputs)
            t5 = pc()
        finally:
            state.end_call()
        t6 = pc()
        return [(t1 - t0) + (t6 - t5), t2 - t1, t3 - t2, t4 - t3, t5 - t4]

    def hardened_call(digest: bool) -> list[float]:
        """A steady call as ControlPlane.serve runs it (the recompile guard is
        entered once around the block, by ``block``), timed in pieces."""
        nonlocal hard_id
        call_id, hard_id = hard_id, hard_id + 1
        t0 = pc()
        state.begin_call(call_id, deadline_bound=True)
        try:
            t1 = pc()
            if leader:
                env = make_envelope(call_id, schedule)
                t2 = pc()
                env = envelope.send(env, channel, digest=digest)
                t3 = pc()
            else:
                t2 = pc()
                env = envelope.receive(channel)
                t3 = pc()
                drift.check_input(env, rank=rank, leader=LEADER)
            t4 = pc()
            tokens = tokens_of(env.tensors)
            seams.cache_transition(lc, op=env.plan["cache_op"], epoch=env.cache_epoch, tokens=tokens, call_id=call_id)
            t5 = pc()
            inputs = tuple(seams.call_inputs(env.tensors, call_id).values())
            compiled(*inputs)
            t6 = pc()
        finally:
            state.end_call()
        t7 = pc()
        return [(t1 - t0) + (t7 - t6), t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5]

    probe_env = make_envelope(1, CacheSchedule(reset_every=reset_every))
    header, meta, _ = envelope.preflight(probe_env, Channel(
        control_group=None, data_group=None, device=device, leader=0, rank=rank, contract=contract, last_call_id=0))
    blob_len = len(header) + len(meta)
    frame_room = envelope.CONTROL_FRAME - 8 * envelope.PREFIX_LEN
    # B's frame payload: the digest words, then header+meta (C's is header+meta alone).
    digest_bytes = 8 * digest.digest_len(len(probe_env.tensors))
    payload_len = digest_bytes + blob_len
    specs = [(n, tuple(x.shape), str(x.dtype).removeprefix("torch.")) for n, x in probe_env.tensors.items()]
    stock_header = {"kind": int(probe_env.kind), "call_id": 1, "cache_epoch": probe_env.cache_epoch,
                    "plan": probe_env.plan, "meta": probe_env.meta, "specs": specs}  # fmt: skip

    def collectives_call() -> list[float]:
        """The control-plane collectives alone: B's control frame, S's object list."""
        t0 = pc()
        dist.broadcast(torch.zeros(envelope.CONTROL_FRAME, dtype=torch.uint8), src=LEADER, group=side.group)
        if payload_len > frame_room:
            dist.broadcast(torch.zeros(payload_len - frame_room, dtype=torch.uint8), src=LEADER, group=side.group)
        t1 = pc()
        stock.broadcast_object(stock_header if leader else None, stock_channel)
        t2 = pc()
        return [t1 - t0, t2 - t1]

    run_call = {
        "A": plain_call, "S": stock_call, "B": lambda: hardened_call(True), "C": lambda: hardened_call(False), "D": collectives_call,
    }

    class _BlockTerminator(Terminator):
        """The runtime's Terminator (record, abort, exit code on a real end), plus a stop
        flag so that the watchdog thread runs only during the hardened blocks."""

        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.stopped = False

        @property
        def ending(self) -> bool:
            return self.stopped or super().ending

    def start_watchdog() -> tuple[Watchdog, _BlockTerminator]:
        term = _BlockTerminator(state, terminator.store)
        dog = Watchdog(
            state, term, watchdog_store, heartbeat_s=t.heartbeat, peer_lost_s=t.peer_lost,
            first_heartbeat_s=t.setup, call_deadline_s=t.call_deadline, parent_pid=os.getppid(),
        )
        dog.start()
        return dog, term

    watchdog_store = connect()  # the watchdog's own client, as in run_rank

    def block(variant: str, calls: int) -> dict[str, Any]:
        dog = term = None
        if variant in ("B", "C"):
            dog, term = start_watchdog()
        dist.barrier(group=side.group)  # every rank starts the block together
        totals, pieces = [], []
        # B and C run inside the recompile guard entered once around the block, as the
        # worker enters it once around its steady loop; its enter/exit is in the wall time
        # (so in the mean per call), not in any call's pieces.
        hardened = variant in ("B", "C") and guard is not None
        b0 = pc()
        with guard if hardened else contextlib.nullcontext():
            for _ in range(calls):
                c0 = pc()
                p = run_call[variant]()
                totals.append(pc() - c0)
                pieces.append(p)
        wall = pc() - b0
        if dog is not None:
            term.stopped = True
            dog.join(timeout=5 * t.heartbeat + 1)
        return {"totals": totals, "pieces": pieces, "wall": wall, "ticks": dog._seq if dog is not None else 0}

    # -- warmup: the first call compiles (in A, before any guarded block), then each loop settles
    state.enter("warmup")
    for variant in VARIANTS:
        block(variant, spec["warmup"])
    after_warmup = probe.counters()
    state.enter("steady")  # the watchdog judges peers by this phase (peer_lost, not setup)

    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for i in range(spec["repeats"]):
        order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
        for variant in order:
            results[variant].append(block(variant, spec["calls"]))

    steady = probe.counters().delta(after_warmup)

    # -- local costs of the pieces, without any collective (no peer to wait for) ----------
    dist.barrier(group=side.group)
    local: dict[str, float] = {}

    def local_time(name: str, fn: Any, reps: int = 300) -> None:
        for _ in range(20):
            fn()
        xs = []
        for _ in range(reps):
            t0 = pc()
            fn()
            xs.append(pc() - t0)
        local[name] = statistics.median(xs)

    scratch = Channel(control_group=None, data_group=None, device=device, leader=0, rank=rank, contract=contract, last_call_id=0)
    local_time("preflight", lambda: envelope.preflight(probe_env, scratch))
    blob = header + meta
    local_time("input_digest", lambda: digest.input_digest(blob, probe_env.tensors))
    arrived = envelope.Envelope(
        kind=probe_env.kind, call_id=1, cache_epoch=probe_env.cache_epoch, plan=probe_env.plan, meta=probe_env.meta,
        tensors=dict(probe_env.tensors), blob=blob, digest=digest.input_digest(blob, probe_env.tensors),
    )
    local_time("check_input", lambda: drift.check_input(arrived, rank=rank, leader=LEADER))
    if guard is not None:
        local_time("guard", lambda: (guard.__enter__(), guard.__exit__(None, None, None)))
    scratch_lc = KVCacheLifecycle()
    scratch_lc.state.epoch = 1
    local_time("lifecycle", lambda: seams.cache_transition(scratch_lc, op="advance", epoch=1, tokens=1, call_id=0))
    dist.barrier(group=side.group)
    report = {
        "rank": rank,
        "results": results,
        "warmup_counters": after_warmup.to_json(),
        "steady_counters": steady.to_json(),
        "guard": guard.mechanism if guard is not None else "off",
        "local": local,
        "threads": torch.get_num_threads(),
        "blob_len": blob_len,
        "frame_room": frame_room,
        "digest_bytes": digest_bytes,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier(group=side.group)  # nobody leaves while a peer still needs the groups


# ------------------------------------------------------------------------------------------
# Parent: launch, collect, report
# ------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def summarize(reports: list[dict[str, Any]], args: argparse.Namespace, elapsed: float, load: tuple[float, float]) -> str:
    import torch
    from tabulate import tabulate

    ranks = range(len(reports))
    med = {(v, r): statistics.median(x for b in reports[r]["results"][v] for x in b["totals"]) for v in VARIANTS for r in ranks}
    mean = {
        (v, r): sum(b["wall"] for b in reports[r]["results"][v]) / sum(len(b["totals"]) for b in reports[r]["results"][v])
        for v in VARIANTS
        for r in ranks
    }
    # Spread of the per-block ratio (each block against the baseline's block of the same repeat).
    def block_ratios(v: str, base: str, r: int) -> list[float]:
        a = [b["wall"] for b in reports[r]["results"][base]]
        x = [b["wall"] for b in reports[r]["results"][v]]
        return sorted(xi / ai for xi, ai in zip(x, a))

    dims = {k: getattr(args, k) for k in ("hidden", "heads", "tokens", "cache", "mlp", "batch")}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    blob_len, room, digest_bytes = reports[0]["blob_len"], reports[0]["frame_room"], reports[0]["digest_bytes"]

    def fits(payload: int) -> str:
        return (f"{payload} bytes, fits the frame: 1 control broadcast per call" if payload <= room
                else f"{payload} bytes, longer than the frame: 2 control broadcasts per call")
    head = [
        f"ranks {args.ranks} (gloo, 127.0.0.1), reference region dims {json.dumps(dims)}, float32, "
        f"torch.compile backend {args.backend!r}",
        f"{args.repeats} repeats x {args.calls} calls per loop, interleaved {'/'.join(VARIANTS)} blocks "
        f"(order rotated per repeat), {args.warmup} warmup calls per loop",
        f"torch {torch.__version__}, python {sys.version.split()[0]}, {cores} cores, "
        f"{reports[0]['threads']} intra-op thread(s) per rank, reset_every {args.reset_every}, "
        f"watchdog heartbeat {args.heartbeat} s, recompile guard: {reports[0]['guard']}; total run {elapsed:.0f} s, "
        f"1-min load average {load[0]:.2f} before / {load[1]:.2f} after (others' load inflates every collective)",
        f"control frame payload ({room} bytes after the prefix): B digest+header+meta {fits(digest_bytes + blob_len)}; "
        f"C header+meta {fits(blob_len)}; the frame is the only control collective of a call",
    ]
    cols = ["loop"]
    for r in ranks:
        cols += [f"rank {r} median ms/call", f"rank {r} mean ms/call"]
    for base in BASELINES:
        cols += [f"/{base} (r0 median)", f"/{base} (r0 mean)", f"/{base} per block r0 (min..max)"]
    rows = []
    for v in RATIO_VARIANTS:
        row = [TITLES[v]]
        for r in ranks:
            row += [_ms(med[v, r]), _ms(mean[v, r])]
        for base in BASELINES:
            if v == base:
                row += ["1.00", "1.00", ""]
            else:
                br = block_ratios(v, base, 0)
                row += [f"{med[v, 0] / med[base, 0]:.3f}", f"{mean[v, 0] / mean[base, 0]:.3f}", f"{br[0]:.2f}..{br[-1]:.2f}"]
        rows.append(row)
    lines = head + ["", tabulate(rows, headers=cols, tablefmt="github", disable_numparse=True)]
    lines.append("")
    pairs = {
        ("B", "S"): "hardened, digest every call, vs stock",
        ("B", "A"): "hardened, digest every call, vs bare",
        ("C", "S"): "hardened, digest off, vs stock",
        ("C", "A"): "hardened, digest off, vs bare",
        ("S", "A"): "stock vs bare",
        ("B", "C"): "the input digest alone: leader computes, followers check, no collective",
    }
    for (v, base), what in pairs.items():
        lines.append(
            f"{v}/{base} ({what}): median {med[v, 0] / med[base, 0]:.3f} (rank 0), "
            + ", ".join(f"{med[v, r] / med[base, r]:.3f} (rank {r})" for r in ranks if r)
            + f"; mean {mean[v, 0] / mean[base, 0]:.3f} (rank 0); absolute {1e3 * (med[v, 0] - med[base, 0]):+.3f} ms/call "
            f"(rank 0 median), {1e3 * (mean[v, 0] - mean[base, 0]):+.3f} ms/call (rank 0 mean)"
        )

    # Breakdown: per-piece mean and median, microseconds; means add up to the mean per call.
    bcols = ["loop", "piece"]
    for r in ranks:
        bcols += [f"rank {r} median us", f"rank {r} mean us"]
    brows = []
    for v in VARIANTS:
        for i, piece in enumerate(PIECES[v]):
            row = [v, PIECE_TITLES[piece]]
            for r in ranks:
                xs = [p[i] for b in reports[r]["results"][v] for p in b["pieces"]]
                row += [_us(statistics.median(xs)), _us(sum(xs) / len(xs))]
            brows.append(row)
        row = [v, "whole call (timed around the call)"]
        for r in ranks:
            xs = [x for b in reports[r]["results"][v] for x in b["totals"]]
            row += [_us(statistics.median(xs)), _us(sum(xs) / len(xs))]
        brows.append(row)
    lines += ["", "where the time goes (per call):", tabulate(brows, headers=bcols, tablefmt="github", disable_numparse=True)]
    lcols = ["piece alone, no collective", *(f"rank {r} median us" for r in ranks)]
    lrows = [
        [title, *(_us(reports[r]["local"][name]) if name in reports[r]["local"] else "-" for r in ranks)]
        for name, title in LOCAL_TITLES.items()
    ]
    lines += ["", tabulate(lrows, headers=lcols, tablefmt="github", disable_numparse=True)]

    problems = []
    for r in ranks:
        steady = reports[r]["steady_counters"]
        if steady["compiles"] or steady["recompiles"]:
            problems.append(f"rank {r}: {steady['compiles']} compile(s) / {steady['recompiles']} recompile(s) after warmup")
        if reports[r]["warmup_counters"]["graph_breaks"]:
            problems.append(f"rank {r}: {reports[r]['warmup_counters']['graph_breaks']} graph break(s)")
    ticks = [sum(b["ticks"] for v in ("B", "C") for b in reports[r]["results"][v]) for r in ranks]
    lines += [
        "",
        f"compile: {reports[0]['warmup_counters']['graphs']} graph(s), no compile after warmup"
        if not problems
        else "WARNING: " + "; ".join(problems),
        f"watchdog ticks during the hardened blocks: {', '.join(f'rank {r}: {n}' for r, n in zip(ranks, ticks))}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--calls", type=int, default=100, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per loop (interleaved)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed calls per loop before timing")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache", type=int, default=64)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", default="eager", choices=("eager", "aot_eager", "inductor"))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--reset-every", type=int, default=4, help="KV-cache reset period (profile drift.reset_every)")
    parser.add_argument("--heartbeat", type=float, default=0.2, help="watchdog heartbeat seconds")
    parser.add_argument("--pg-timeout", type=float, default=30.0, help="process-group and store timeout seconds")
    parser.add_argument("--timeout", type=float, default=400.0, help="hard cap on the whole run, seconds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        code = 0
        try:
            rank_main(spec)
        except BaseException:  # noqa: BLE001 - report, then exit without a teardown that could hang
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    import torch.distributed as dist

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    master = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=args.pg_timeout), wait_for_workers=False
    )
    dims = {k: getattr(args, k) for k in ("hidden", "heads", "tokens", "cache", "mlp", "batch")}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="hardening-overhead-") as tmp:
        try:
            for rank in range(args.ranks):
                spec = {
                    "rank": rank, "world": args.ranks, "port": master.port, "out": tmp, "dims": dims,
                    "backend": args.backend, "threads": args.threads, "reset_every": args.reset_every,
                    "heartbeat": args.heartbeat, "pg_timeout": args.pg_timeout, "calls": args.calls,
                    "repeats": args.repeats, "warmup": args.warmup,
                }
                procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]))
            deadline = started + args.timeout
            while any(p.poll() is None for p in procs):
                failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
                if failed:
                    raise SystemExit(f"rank(s) {failed} failed (exit {[procs[r].returncode for r in failed]})")
                if time.perf_counter() > deadline:
                    raise SystemExit(f"benchmark ran past --timeout {args.timeout:g} s")
                time.sleep(0.1)
            failed = [r for r, p in enumerate(procs) if p.returncode != 0]
            if failed:
                raise SystemExit(f"rank(s) {failed} failed (exit {[procs[r].returncode for r in failed]})")
            reports = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.ranks)]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
    print(summarize(reports, args, time.perf_counter() - started, (load_before, os.getloadavg()[0])))


if __name__ == "__main__":
    main()
