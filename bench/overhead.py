"""Benchmark: steady-state overhead of the hardening runtime on the compiled reference region.

Starts the ranks once (real processes, gloo on 127.0.0.1, the c10d store hosted by this
process as the runner hosts it). Every rank enters a ``hardening.runtime.Session``, builds
the reference region (``hardening.harness.reference``, tensor-parallel over the ranks),
checks its weights, compiles it with ``Session.compile`` and warms it up through the
control plane, exactly as a user's program does. Then every rank times interleaved
blocks of ``--calls`` calls of the loops below, ``--repeats`` times (their order rotated
from one repeat to the next, so drift and position effects fall on all of them alike):

A  bare, per tensor: the leader makes the inputs (``region.make_inputs``) and ships each
   tensor with ``dist.broadcast``; the KV cache is reset at the same period as in B;
   every rank runs the compiled region. What a hand-written TP loop does, minus any
   header: no call id, no plan, no meta, nothing checked.
F  bare, fused (the floor): as A, but the leader copies the inputs into one ``uint8``
   buffer and ships it in one broadcast; the others view their inputs in it. No loop can
   ship its inputs in fewer collectives.
S  stock: the unhardened loop of ``hardening/harness/stock.py`` (the header as a JSON
   object broadcast, size then bytes, as ``broadcast_object_list`` does; then the
   tensors; an unchecked KV-cache state machine). The realistic unhardened baseline: it
   ships its meta too.
B  hardened: ``for call in plane.serve(calls, make_inputs=...): region(*call.inputs)`` on
   the Session, nothing else. Per call: the call deadline opens; the leader's envelope,
   preflight and input digest on every call (``digest_every: 1``), then frame and
   tensors in one broadcast (the fused frame: the data plane is the host); the
   followers' validation against the call contract and their digest check; the KV-cache
   transition; the region under the recompile guard (entered once per ``serve``).
C  as B with the digest off (``drift.digest_every: 0``): B - C is the digest's local
   compute only (leader and followers), no collective.
D  (attribution, no region) the control collectives alone: B's one fused broadcast (frame
   plus tensors), A's per-tensor broadcasts, S's header object (size + bytes).

Per-call wall time is measured on every rank (the ranks run in lockstep, so the slowest
piece of either rank shows on both), split into the region call and everything around it
(for B and C: the Session's work between two calls, plus the wait for the peer). The
main table gives the median and the mean per call of each loop (the mean is block wall
time over calls, so it also carries B's and C's guard enter/exit, once per block) and the
ratios to F (the floor), A (bare) and S (stock); "paired blocks" is the median of each
block's wall time over the baseline's block of the same repeat (adjacent in time, so
the machine's drift cancels). A last table times the runtime's local
pieces alone, without any collective, so that collective latency and Python cost can be
told apart.

The Session's watchdog thread runs through every block, bare ones included (it lives as
long as the Session): a heartbeat every ``--heartbeat`` s, a few store requests each. Not
included (paid once per run): process launch, init, parity, the weight check, warmup
lockstep and the compile gate, the SHUTDOWN envelope, the done barrier. Each rank uses
``--threads`` intra-op threads (default 1: two ranks on a 2-core box). The numbers are
wall times: anything else running on the machine's cores inflates every collective (the
header prints the load average before and after the run).

    python bench/overhead.py [--calls 20] [--repeats 100] [--hidden 256 ...]
    python bench/overhead.py --device cuda --dist-backend nccl --dtype bfloat16 --ranks 1 --backend inductor \
        --hidden 1024 --heads 16 --tokens 256 --cache 1024 --mlp 4096      # the h200 profile's region, one GPU

On a CUDA device (``--device cuda``) every rank uses device ``rank % device_count`` and the
data plane is ``--dist-backend`` (nccl, or gloo with CUDA tensors); B's frame then travels
split (the control frame on the gloo side group, the tensors on the data group), F's one
buffer lives on the device, and every call ends with ``torch.cuda.synchronize`` in every
loop alike (the Session's own call end does the same), so a call's time is its kernels'.
"""

from __future__ import annotations

import argparse
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

VARIANTS = ("A", "F", "S", "B", "C", "D")
RATIO_VARIANTS = ("F", "A", "S", "B", "C")
BASELINES = ("F", "A", "S")
TITLES = {
    "A": "A bare, per tensor (make inputs, broadcast each tensor, region)",
    "F": "F bare, fused: the floor (make inputs, one broadcast of all their bytes, region)",
    "S": "S stock loop, hardened: false (header object, tensors, region)",
    "B": "B hardened: plane.serve() (envelope, digest every call, checks, guard)",
    "C": "C hardened, digest off (drift.digest_every: 0)",
    "D": "D control collectives alone (no region)",
}
PIECES = {v: ("outside", "region") for v in RATIO_VARIANTS}
PIECES["D"] = ("fused", "per_tensor", "object")
PIECE_TITLES = {
    "outside": "everything but the region: inputs, transport, checks, and the wait for the peer",
    "region": "compiled region call",
    "fused": "B's one broadcast: frame + input bytes in one uint8 buffer",
    "per_tensor": "A's broadcasts, one per input tensor",
    "object": "S's header object (size + bytes broadcasts)",
}
LOCAL_TITLES = {
    "make_inputs": "region.make_inputs (leader; every loop pays it)",
    "preflight": "envelope.preflight + canonical JSON (leader)",
    "stage": "staging into the fused buffer's slots (leader)",
    "input_digest": "digest.input_digest: CRC-32 of header+meta and of each input (leader)",
    "check_input": "drift.check_input on an equal digest (followers: digest + compare)",
    "guard": "RecompileGuard enter + exit (once per serve())",
    "cache": "KV-cache transition (advance, no reset)",
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

    import hardening.runtime as hr
    from hardening.harness import reference, region, stock
    from hardening.harness.profile import load_profile
    from hardening.harness.region import RegionContext
    from hardening.harness.worker import contract_of
    from hardening.runtime import digest, drift, envelope, seams
    from hardening.runtime.compile.guard import RecompileGuard
    from hardening.runtime.config import CompileConfig, DriftConfig, Timeouts
    from hardening.runtime.envelope import Channel
    from hardening.runtime.kv_cache import CacheSchedule, KVCacheLifecycle
    from hardening.runtime.session import LEADER, call_envelope, tokens_of

    rank, world = spec["rank"], spec["world"]
    leader = rank == LEADER
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    if spec["device"] == "cuda":
        from hardening.runtime.session import cuda_device

        device = cuda_device(rank)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    reset_every = spec["reset_every"]
    config = hr.RuntimeConfig(
        timeouts=Timeouts(heartbeat=spec["heartbeat"], pg=spec["pg_timeout"]),
        compile=CompileConfig(backend=spec["backend"]),
        drift=DriftConfig(digest_every=1, reset_every=reset_every),
    )
    out_dir = Path(spec["out"])
    session = hr.Session(
        config, rank=rank, world_size=world, store_host="127.0.0.1", store_port=spec["port"], store_prefix="bench",
        record_path=out_dir / f"record{rank}.json", fingerprint={"bench": "overhead"}, parent_pid=os.getppid(),
        device=device, backend=spec["dist_backend"], dtype=getattr(torch, spec["dtype"]),
    )  # fmt: skip
    pc = time.perf_counter

    with session as s:
        # -- 1. build, as a user's program does: region, weights, compile, control plane --
        profile = load_profile("cpu", {"world.ranks": world, "region.dims": spec["dims"]})
        ctx = RegionContext(
            rank=rank, world_size=world, device=s.device, dtype=s.dtype, group=dist.group.WORLD,
            dims=dict(profile.region.dims), seed=profile.region.seed, profile=profile,
        )  # fmt: skip
        reg = reference.build(ctx)
        s.check_weights(reg.module, manifest=reg.weight_manifest, replicated=reg.replicated_params)
        compiled = s.compile(reg.module)
        contract = contract_of(reg)
        names = [t.name for t in contract.tensors]
        plane = s.control_plane(contract, cache=hr.KVCache(reset_every=reset_every, reset_fn=reg.reset_cache))
        fused = plane.channel.layout is not None  # B's frame and tensors in one host buffer (gloo on CPU)
        # F's one buffer, and D's and the local pieces' staging: the host layout, on the rank's device.
        layout = plane.channel.layout or envelope.host_layout(contract, torch.device("cpu"))
        assert layout is not None, "the reference region has no varying dims: its inputs always fit one buffer"

        def make_inputs(call_id: int) -> dict[str, torch.Tensor]:
            return dict(zip(names, region.make_call_inputs(reg, call_id)))

        # -- 2. the loops: each call returns (outside the region, region) seconds ----------
        # A and F reset the cache at the same period as B's schedule; their own call ids.
        bare_ids = iter(range(1 << 62))

        def bare_inputs() -> tuple[torch.Tensor, ...]:
            call_id = next(bare_ids)
            if call_id == 0 or (reset_every and call_id % reset_every == 0):
                reg.reset_cache()
            if leader:
                return tuple(make_inputs(call_id).values())
            return tuple(torch.empty(t.shape, dtype=envelope.ALLOWED_DTYPES[t.dtype], device=device) for t in contract.tensors)

        def bare_call() -> tuple[float, float]:
            t0 = pc()
            tensors = bare_inputs()
            for x in tensors:
                dist.broadcast(x, src=LEADER)
            t1 = pc()
            compiled(*tensors)
            sync()
            return t1 - t0, pc() - t1

        def fused_call() -> tuple[float, float]:
            t0 = pc()
            tensors = bare_inputs()
            buffer = torch.empty(layout.size, dtype=torch.uint8, device=device)
            views = [layout.slot(buffer, i, t) for i, t in enumerate(contract.tensors)]
            if leader:
                for view, x in zip(views, tensors):
                    view.copy_(x)
            dist.broadcast(buffer, src=LEADER)
            t1 = pc()
            compiled(*views)
            sync()
            return t1 - t0, pc() - t1

        # As hardening/harness/stock.py builds it; on a device the header object goes over the
        # gloo side group (an NCCL group takes no host tensors), as B's control frame does.
        stock_channel = Channel(
            control_group=dist.group.WORLD if fused else s.side.group, data_group=dist.group.WORLD, device=s.device,
            leader=LEADER, rank=rank, contract=contract,
        )  # fmt: skip
        stock_cache = KVCacheLifecycle(reset_fn=reg.reset_cache, checked=False)
        stock_schedule = CacheSchedule(reset_every=reset_every)
        stock_ids = iter(range(1 << 62))

        def stock_call() -> tuple[float, float]:
            call_id = next(stock_ids)
            t0 = pc()
            s.state.begin_call(call_id, deadline_bound=True)
            if leader:
                env = stock.send(call_envelope(call_id, stock_schedule, make_inputs(call_id), phase="steady"), stock_channel)
            else:
                env = stock.receive(stock_channel)
            seams.cache_transition(stock_cache, op=env.plan["cache_op"], epoch=env.cache_epoch, tokens=tokens_of(env.tensors), call_id=call_id)
            inputs = tuple(seams.call_inputs(env.tensors, call_id).values())
            t1 = pc()
            compiled(*inputs)
            sync()
            t2 = pc()
            s.state.end_call()
            return t1 - t0 + (pc() - t2), t2 - t1

        probe_env = call_envelope(1, CacheSchedule(reset_every=reset_every), make_inputs(1), phase="steady")
        header, meta, specs = envelope.preflight(probe_env, Channel(
            control_group=None, data_group=None, device=s.device, contract=contract, last_call_id=0))  # fmt: skip
        payload = 8 * digest.digest_len(len(specs)) + len(header) + len(meta)
        frame_room = envelope.CONTROL_FRAME - 8 * envelope.PREFIX_LEN
        stock_header = {"kind": 1, "call_id": 1, "cache_epoch": probe_env.cache_epoch, "plan": probe_env.plan,
                        "meta": probe_env.meta, "specs": [(t.name, t.shape, t.dtype) for t in specs]}  # fmt: skip

        def collectives_call() -> tuple[float, float, float]:
            t0 = pc()
            if fused:
                dist.broadcast(torch.empty(layout.size, dtype=torch.uint8), src=LEADER)
            else:  # split: B's control frame alone, on the gloo side group
                dist.broadcast(torch.empty(envelope.CONTROL_FRAME, dtype=torch.uint8), src=LEADER, group=s.side.group)
            if payload > frame_room:
                dist.broadcast(torch.empty(payload - frame_room, dtype=torch.uint8), src=LEADER, group=stock_channel.control_group)
            t1 = pc()
            for t in contract.tensors:
                dist.broadcast(torch.empty(t.shape, dtype=envelope.ALLOWED_DTYPES[t.dtype], device=device), src=LEADER)
            sync()
            t2 = pc()
            stock.broadcast_object(stock_header if leader else None, stock_channel)
            return t1 - t0, t2 - t1, pc() - t2

        simple = {"A": bare_call, "F": fused_call, "S": stock_call, "D": collectives_call}

        def block(variant: str, calls: int) -> dict[str, Any]:
            dist.barrier(group=s.side.group)  # every rank starts the block together
            totals, pieces = [], []
            b0 = pc()
            if variant in simple:
                for _ in range(calls):
                    c0 = pc()
                    p = simple[variant]()
                    totals.append(pc() - c0)
                    pieces.append(p)
            else:
                # The user's loop, nothing added: time between yields is the Session's.
                s.config.drift.digest_every = 1 if variant == "B" else 0
                last = pc()
                for call in plane.serve(calls, make_inputs=make_inputs):
                    t0 = pc()
                    compiled(*call.inputs)
                    sync()
                    t1 = pc()
                    totals.append(t1 - last)
                    pieces.append((t0 - last, t1 - t0))
                    last = t1
            return {"totals": totals, "pieces": pieces, "wall": pc() - b0}

        # -- 3. warmup through the control plane (lockstep, the compile gate), then each
        #       loop settles; then the timed, interleaved blocks ------------------------
        plane.warmup(compiled, calls=2, make_inputs=make_inputs)
        for variant in VARIANTS:
            block(variant, spec["warmup"])
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for i in range(spec["repeats"]):
            order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
            for variant in order:
                results[variant].append(block(variant, spec["calls"]))
        steady = s.probe.counters().delta(plane.after_warmup)

        # -- 4. the runtime's local pieces, without any collective -------------------------
        dist.barrier(group=s.side.group)
        local: dict[str, float] = {}

        def local_time(name: str, fn: Any, reps: int = 300) -> None:
            for _ in range(20):
                fn()
            xs = []
            for _ in range(reps):
                t0 = pc()
                fn()
                sync()  # on a device: the piece's kernels, not their launch
                xs.append(pc() - t0)
            local[name] = statistics.median(xs)

        scratch = Channel(control_group=None, data_group=None, device=s.device, contract=contract, last_call_id=0)
        inputs = make_inputs(1)
        buffer = torch.empty(layout.size, dtype=torch.uint8, device=device)
        staged = {t.name: layout.slot(buffer, i, t) for i, t in enumerate(contract.tensors)}
        for name, view in staged.items():
            view.copy_(inputs[name])
        blob = header + meta
        arrived = envelope.Envelope(
            kind=probe_env.kind, call_id=1, cache_epoch=probe_env.cache_epoch, plan=probe_env.plan, meta=probe_env.meta,
            tensors=staged, blob=blob, digest=digest.input_digest(blob, staged),
        )  # fmt: skip
        local_time("make_inputs", lambda: make_inputs(1))
        local_time("preflight", lambda: envelope.preflight(probe_env, scratch))
        local_time("stage", lambda: [layout.slot(buffer, i, t).copy_(inputs[t.name]) for i, t in enumerate(contract.tensors)])
        local_time("input_digest", lambda: digest.input_digest(blob, staged))
        local_time("check_input", lambda: drift.check_input(arrived, rank=rank, leader=LEADER))
        guard = RecompileGuard()
        local_time("guard", lambda: (guard.__enter__(), guard.__exit__(None, None, None)))
        scratch_cache = KVCacheLifecycle()
        scratch_cache.state.epoch = 1
        local_time("cache", lambda: seams.cache_transition(scratch_cache, op="advance", epoch=1, tokens=1, call_id=0))
        s.config.drift.digest_every = 1

    report = {
        "rank": rank,
        "results": results,
        "warmup_counters": plane.after_warmup.to_json(),
        "steady_counters": steady.to_json(),
        "local": local,
        "threads": torch.get_num_threads(),
        "payload": payload,
        "frame_room": frame_room,
        "buffer": layout.size,
        "fused": fused,
        "ticks": s.watchdog._seq,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


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

    def block_ratios(v: str, base: str, r: int) -> list[float]:
        """Each block's wall time against the baseline's block of the same repeat."""
        a = [b["wall"] for b in reports[r]["results"][base]]
        x = [b["wall"] for b in reports[r]["results"][v]]
        return sorted(xi / ai for xi, ai in zip(x, a))

    dims = {k: getattr(args, k) for k in ("hidden", "heads", "tokens", "cache", "mlp", "batch")}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    r0 = reports[0]
    long = r0["payload"] > r0["frame_room"]
    head = [
        f"ranks {args.ranks} ({args.dist_backend}, {args.device}, store on 127.0.0.1), reference region dims "
        f"{json.dumps(dims)}, {args.dtype}, torch.compile backend {args.backend!r}"
        + (f", device {r0['device_name']}" if r0.get("device_name") else ""),
        f"{args.repeats} repeats x {args.calls} calls per loop, interleaved {'/'.join(VARIANTS)} blocks "
        f"(order rotated per repeat), {args.warmup} warmup calls per loop",
        f"torch {torch.__version__}, python {sys.version.split()[0]}, {cores} cores, "
        f"{r0['threads']} intra-op thread(s) per rank, reset_every {args.reset_every}, "
        f"watchdog heartbeat {args.heartbeat} s; total run {elapsed:.0f} s, "
        f"1-min load average {load[0]:.2f} before / {load[1]:.2f} after (others' load inflates every collective)",
        (f"B's fused frame: {r0['buffer']} bytes (control frame + input slots), digest+header+meta {r0['payload']} bytes "
         + ("(longer than the frame: one more broadcast per call)" if long else f"(fits the frame's {r0['frame_room']}): one collective per call"))
        if r0["fused"] else
        (f"B's frame travels split: the control frame on the gloo side group, then each tensor on the {args.dist_backend} "
         f"data group; F's one buffer ({r0['buffer']} bytes) lives on the device, and D's first piece is B's control frame "
         f"alone. S's header object also goes over the gloo side group (a stock NCCL loop's broadcast_object_list stages "
         f"it through the device: S is cheaper here than that). Device collectives are asynchronous: their transfer time "
         f"shows in the region piece, and only the per-call totals compare"),
    ]  # fmt: skip
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
    lines = head + ["", tabulate(rows, headers=cols, tablefmt="github", disable_numparse=True), ""]
    pairs = {
        ("B", "F"): "hardened, digest every call, vs the floor",
        ("B", "A"): "hardened, digest every call, vs bare",
        ("B", "S"): "hardened, digest every call, vs stock",
        ("C", "F"): "hardened, digest off, vs the floor",
        ("C", "A"): "hardened, digest off, vs bare",
        ("A", "F"): "bare per tensor vs the floor",
        ("S", "A"): "stock vs bare",
        ("B", "C"): "the input digest alone: leader computes, followers check, no collective",
    }
    for (v, base), what in pairs.items():
        lines.append(
            f"{v}/{base} ({what}): median {med[v, 0] / med[base, 0]:.3f} (rank 0), "
            + ", ".join(f"{med[v, r] / med[base, r]:.3f} (rank {r})" for r in ranks if r)
            + f"; mean {mean[v, 0] / mean[base, 0]:.3f} (rank 0); paired blocks {statistics.median(block_ratios(v, base, 0)):.3f} (rank 0 median); absolute {1e3 * (med[v, 0] - med[base, 0]):+.3f} ms/call "
            f"(rank 0 median), {1e3 * (mean[v, 0] - mean[base, 0]):+.3f} ms/call (rank 0 mean)"
        )

    bcols = ["loop", "piece"]
    for r in ranks:
        bcols += [f"rank {r} median us", f"rank {r} mean us"]
    brows = []
    for v in VARIANTS:
        for i, piece in enumerate(PIECES[v]):
            title = PIECE_TITLES[piece] if r0["fused"] or piece != "fused" else "B's control frame alone (gloo side group)"
            row = [v, title]
            for r in ranks:
                xs = [p[i] for b in reports[r]["results"][v] for p in b["pieces"]]
                row += [_us(statistics.median(xs)), _us(sum(xs) / len(xs))]
            brows.append(row)
    lines += ["", "where the time goes (per call):", tabulate(brows, headers=bcols, tablefmt="github", disable_numparse=True)]
    lcols = ["piece alone, no collective", *(f"rank {r} median us" for r in ranks)]
    lrows = [[title, *(_us(reports[r]["local"][name]) for r in ranks)] for name, title in LOCAL_TITLES.items()]
    lines += ["", tabulate(lrows, headers=lcols, tablefmt="github", disable_numparse=True)]

    problems = []
    for r in ranks:
        steady = reports[r]["steady_counters"]
        if steady["compiles"] or steady["recompiles"]:
            problems.append(f"rank {r}: {steady['compiles']} compile(s) / {steady['recompiles']} recompile(s) after warmup")
        if reports[r]["warmup_counters"]["graph_breaks"]:
            problems.append(f"rank {r}: {reports[r]['warmup_counters']['graph_breaks']} graph break(s)")
    lines += [
        "",
        f"compile: {r0['warmup_counters']['graphs']} graph(s), no compile after warmup"
        if not problems
        else "WARNING: " + "; ".join(problems),
        "watchdog ticks over the whole run: " + ", ".join(f"rank {r}: {reports[r]['ticks']}" for r in ranks),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=100, help="timed blocks per loop (interleaved)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed calls per loop before timing")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache", type=int, default=64)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", default="eager", choices=("eager", "aot_eager", "inductor"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where each rank's region and tensors live")
    parser.add_argument("--dist-backend", default=None, choices=("gloo", "nccl"), help="data plane (default: gloo on cpu, nccl on cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--reset-every", type=int, default=4, help="KV-cache reset period (drift.reset_every)")
    parser.add_argument("--heartbeat", type=float, default=0.2, help="watchdog heartbeat seconds")
    parser.add_argument("--pg-timeout", type=float, default=30.0, help="process-group and store timeout seconds")
    parser.add_argument("--timeout", type=float, default=400.0, help="hard cap on the whole run, seconds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dist_backend = args.dist_backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.dist_backend == "nccl" and args.device != "cuda":
        parser.error("--dist-backend nccl needs --device cuda")
    if args.device == "cuda" and not args.worker:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible here")

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
                    "repeats": args.repeats, "warmup": args.warmup, "device": args.device,
                    "dist_backend": args.dist_backend, "dtype": args.dtype,
                }  # fmt: skip
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
