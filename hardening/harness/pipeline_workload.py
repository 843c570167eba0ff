"""The harness's pipeline workload: the ``pp`` suite's program, on the runtime's pipeline.

A case names it in ``Case.workload`` (``pp0``, ``pp1``, ``pp1:sweep``, ``pp0:recompute``);
the runner sets it identically on every rank (``HARDENING_WORKLOAD``, so env parity
compares it) and the worker runs :func:`run` instead of the envelope loop:

1. the topology (``mesh_pg`` and the p2p groups), checked on every rank;
2. the mesh builds the region on ``mesh_pg`` (its rank and world are the mesh's) and
   runs it once eagerly, so that the leader can publish the chunk and result contracts
   on the side channel: rank 0 runs no region and learns them from there;
3. the pipeline; rank 0 makes every chunk's inputs (seeded by the chunk id) and drives
   warmup, then the mode's measured segments; the mesh serves.

Stage work is modelled by sleeps of ``pp.work`` (see :class:`~hardening.harness.profile.StageWork`),
each chunk's produce and mesh work varying by ``±jitter_ms``.
Modes: ``steady`` (one segment), ``sweep`` (one segment per depth in ``pp.sweep``) and
``recompute`` (segment ``stash`` then ``recompute``, a hard cut every ``pp.cut_every``
chunks; the mesh pays ``recompute_ms`` on each new epoch only in the second).
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import torch

from hardening.harness import region
from hardening.harness.cases import MODELLED, WORKLOAD_ENV
from hardening.harness.profile import Profile
from hardening.harness.region import RegionContext
from hardening.runtime.config import RuntimeConfig
from hardening.runtime.pipeline import Chunk
from hardening.runtime.session import Session, Spec
from hardening.runtime.topology import MESH_LEADER

MODES = ("steady", "sweep", "recompute")
SEGMENTS = {"recompute": ("stash", "recompute")}


def parse(workload: str) -> tuple[str, str]:
    """``pp1:sweep`` -> (``pp1``, ``sweep``); ValueError naming what is wrong."""
    kind, _, mode = workload.partition(":")
    mode = mode or "steady"
    if kind not in ("pp0", "pp1") or mode not in MODES:
        raise ValueError(f"workload {workload!r}: expected pp0 or pp1, optionally ':' one of {', '.join(MODES)}")
    return kind, mode


def runtime_config(config: RuntimeConfig, profile: Profile, workload: str) -> RuntimeConfig:
    """The profile's runtime config with the workload's topology (and, for a sweep,
    queues as deep as its deepest segment)."""
    kind, mode = parse(workload)
    depth = max(profile.pp.sweep) if mode == "sweep" else profile.pipeline.depth_in
    pipeline = dataclasses.replace(profile.pipeline, kind=kind, depth_in=max(depth, profile.pipeline.depth_in))
    return dataclasses.replace(config, pipeline=pipeline)


def run(s: Session, profile: Profile, workload: str) -> None:
    _, mode = parse(workload)
    work = profile.pp.work
    # 1. Topology: every rank builds and checks the declared groups.
    topology = s.topology()
    # 2. The mesh builds the region on mesh_pg; the leader publishes the contracts.
    reg = None
    contract = None
    if not topology.is_control:
        mesh = topology.mesh
        ctx = RegionContext(
            rank=mesh.index(s.rank), world_size=len(mesh), device=s.device, dtype=s.dtype,
            group=topology.group("mesh_pg"), dims=dict(profile.region.dims),
            seed=int(s.user_keys["region.seed"]), profile=profile,
        )  # fmt: skip
        reg = region.build_region(profile.region.target, ctx)
        sample = region.make_call_inputs(reg, 0)
        outputs = output_shapes(reg, sample)
        contract = {
            "inputs": [[n, list(t.shape), _dtype(t)] for n, t in zip(region.input_names(reg, len(sample)), sample)],
            "outputs": [[f"output{i}", list(t.shape), _dtype(t)] for i, t in enumerate(outputs)],
            "int_high": {n: int(t.max()) + 1 for n, t in zip(region.input_names(reg, len(sample)), sample) if not t.is_floating_point()},
        }
    published = s.side.exchange("pipeline/contract", contract if s.rank == MESH_LEADER else None)[MESH_LEADER]
    specs = {what: {n: Spec(shape=tuple(shape), dtype=dtype) for n, shape, dtype in published[what]} for what in ("inputs", "outputs")}
    # 3. The pipeline: rank 0 drives it, the mesh serves.
    pipe = s.pipeline(specs["inputs"], specs["outputs"])
    pipe.stage_note = MODELLED
    if topology.is_control:
        _drive(pipe, profile, mode, published, seed=int(s.user_keys["region.seed"]))
        return
    assert reg is not None
    compiled = s.compile(reg.module)

    first_of: dict[int, int] = {}

    def stage(*inputs: torch.Tensor) -> Any:
        chunk = pipe.current
        index = chunk.chunk_id - first_of.setdefault(chunk.segment, chunk.chunk_id)  # k-th chunk of its segment
        _sleep(work.mesh_ms + jitter(work, "mesh", index))
        return compiled(*inputs)

    def on_epoch(chunk: Chunk) -> None:
        if reg.reset_cache is not None:
            reg.reset_cache()
        if mode == "recompute" and chunk.segment == SEGMENTS["recompute"].index("recompute"):
            _sleep(work.recompute_ms)

    pipe.serve(stage, warmup=profile.warmup_calls, on_epoch=on_epoch)


def output_shapes(reg: Any, sample: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """What the region returns for ``sample``, as shapes and dtypes only: traced under a
    fake tensor mode, so nothing runs, no collective is issued (a region on the wrong
    group would hang right here) and no cache advances. Where fake tensors are not
    available or the region cannot be traced so, the result is taken to look like the
    first input (hidden states in, hidden states out); the leader's preflight names a
    region that returns something else."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode  # private: feature-detected, with the fallback below

        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            out = reg.module(*sample)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(torch.empty(tuple(t.shape), dtype=t.dtype) for t in outputs)
    except Exception:  # noqa: BLE001 - any failure to trace means: fall back
        return (torch.empty(tuple(sample[0].shape), dtype=sample[0].dtype),)


def _drive(pipe: Any, profile: Profile, mode: str, contract: dict[str, Any], *, seed: int) -> None:
    work, n = profile.pp.work, profile.pp.chunks

    def make(chunk_id: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + chunk_id)
        out = {}
        for name, shape, dtype in contract["inputs"]:
            if name in contract["int_high"]:
                out[name] = torch.randint(0, contract["int_high"][name], tuple(shape), generator=g, dtype=getattr(torch, dtype))
            else:
                out[name] = torch.randn(tuple(shape), generator=g).to(getattr(torch, dtype))
        return {k: v.to(pipe.session.device) for k, v in out.items()}

    def consume(results: list[Any]) -> None:
        for _ in results:
            _sleep(work.consume_ms)

    pipe.warmup(make, calls=profile.warmup_calls)
    if mode == "steady":
        segments: list[tuple[str, int | None]] = [("steady", None)]
    elif mode == "sweep":
        segments = [(f"D={d}", d) for d in profile.pp.sweep]
    else:
        segments = [(name, None) for name in SEGMENTS["recompute"]]
    for name, depth in segments:
        if mode != "steady":
            consume(pipe.segment(name, depth=depth))
        for k in range(n):
            if mode == "recompute" and k > 0 and k % profile.pp.cut_every == 0:
                pipe.hard_cut()
            _sleep(work.produce_ms + jitter(work, "produce", k))
            consume(pipe.submit(make(pipe.next_chunk_id)))
    consume(pipe.drain())


def jitter(work: Any, stage: str, index: int) -> float:
    """This stage's deviation for the ``index``-th chunk of a segment: uniform in
    ``±jitter_ms``, drawn independently per stage from a generator seeded by both, so every
    segment (every depth of a sweep) and every run sees the same stage times."""
    if work.jitter_ms <= 0:
        return 0.0
    return random.Random(f"{stage}/{index}").uniform(-work.jitter_ms, work.jitter_ms)


def _sleep(ms: float) -> None:
    if ms > 0:
        time.sleep(ms / 1000.0)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


__all__ = ["MODES", "WORKLOAD_ENV", "parse", "run", "runtime_config"]
