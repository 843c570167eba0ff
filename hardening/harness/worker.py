"""The harness's rank: a rank spec and a region, served through the runtime's Session.

``run_rank`` is entered in a fresh process per rank (forked from the fork server) and
never returns: every path ends in :meth:`Terminator.end` with a final record and the
cause's exit code. The harness asks the Session for exactly what a user's own loop asks
for (``hardening.runtime.session``), so a case exercises the code path users run; faults
act through the runtime's seams. With ``hardened: false`` the rank runs the stock loop
instead (:mod:`hardening.harness.stock`), the baseline of the detection benchmark.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from hardening.harness import pipeline_workload, region
from hardening.harness.profile import Profile, load_profile
from hardening.harness.region import Region, RegionContext
from hardening.runtime.compile.dump import DUMP_DIR, DUMP_ENV
from hardening.runtime.compile.trace import TRACE_DIR, start_torch_trace
from hardening.runtime.config import RuntimeConfig
from hardening.runtime.envelope import CallContract, TensorSpec
from hardening.runtime.session import KVCache, Session, cuda_device

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


def run_rank(spec: RankSpec) -> NoReturn:
    profile = load_profile(spec.profile_path)
    if wants_dump(profile):  # the Session, the program's own too, dumps there as it ends
        os.environ[DUMP_ENV] = str(Path(spec.rank_dir) / DUMP_DIR)
    if profile.program is not None:
        run_program(spec, profile.program, trace=wants_trace(profile))
    if not profile.hardened:
        from hardening.harness import stock

        stock.run_rank(spec, profile)
    workload = os.environ.get(pipeline_workload.WORKLOAD_ENV, "").strip()
    config = runtime_config(profile)
    if workload:
        config = pipeline_workload.runtime_config(config, profile, workload)
    session = Session(
        config,
        rank=spec.rank,
        world_size=spec.world_size,
        store_host=spec.store_host,
        store_port=spec.store_port,
        store_prefix=spec.store_prefix,
        record_path=Path(spec.rank_dir) / "record.json",
        device=device_of(profile, spec.rank),
        backend=profile.world.backend,
        dtype=DTYPES[profile.region.dtype],
        fingerprint=profile.fingerprint_keys(),
        parent_pid=spec.parent_pid,
    )
    try:
        if wants_trace(profile):  # before anything compiles
            session.state.artifacts["torch_trace"] = start_trace(Path(spec.rank_dir))
        with session as s:
            if workload:
                pipeline_workload.run(s, profile, workload)
            else:
                serve_region(s, profile)
    except BaseException as exc:  # noqa: BLE001 - every end must be recorded, KeyboardInterrupt included
        session.terminator.end(exc)
    session.terminator.end(None)


def run_program(spec: RankSpec, program: str, *, trace: bool = False) -> NoReturn:
    """Run the user's own program as this rank, as ``python program.py`` would, with what
    ``Session.from_env`` needs to join this case: the store, the record path, the parent.
    Its ``@hr.record`` ends the process with the record the runner judges; a program that
    returns without one is ``no_final_record``, never a completion.

    ``trace``: its compile trace goes to ``rank<r>/torch_trace`` like a region's, and its
    Session's depyf dump to ``rank<r>/depyf`` (``DUMP_ENV``): the runner finds both there."""
    if trace:
        start_trace(Path(spec.rank_dir))
    os.environ.update(
        {
            "HARDENING_STORE": f"{spec.store_host}:{spec.store_port}",
            "HARDENING_STORE_PREFIX": spec.store_prefix,
            "HARDENING_RECORD": str(Path(spec.rank_dir) / "record.json"),
            "HARDENING_PARENT_PID": str(spec.parent_pid or ""),
        }
    )
    sys.argv = [program]
    sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
    code = 0
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a program that raised without @record: its traceback, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wants_trace(profile: Profile) -> bool:
    """Whether this rank writes torch's structured compile trace. From the first compile:
    a trace cannot be started once a failure shows, so every compiled rank traces and the
    runner keeps the trace only where the case did not pass (or where it was asked to)."""
    return profile.triage.torch_trace or (profile.compile.enabled and profile.triage.artifacts != "never")


def start_trace(rank_dir: Path) -> str:
    """This rank's compile trace into ``rank_dir/torch_trace``, unless the caller set
    ``TORCH_TRACE`` themselves: their directory is left as they chose it."""
    theirs = os.environ.get("TORCH_TRACE")
    if theirs:
        return f"{theirs} (the caller's TORCH_TRACE, left as it is)"
    return start_torch_trace(str(rank_dir / TRACE_DIR))


def wants_dump(profile: Profile) -> bool:
    """Whether this rank leaves a depyf dump as it ends (kept like the trace)."""
    return profile.compile.enabled and profile.triage.artifacts != "never"


def runtime_config(profile: Profile) -> RuntimeConfig:
    """The runtime's part of a profile (the rest is the harness's own)."""
    return RuntimeConfig(
        timeouts=profile.timeouts, compile=profile.compile, gates=profile.gates, parity=profile.parity, drift=profile.drift,
        pipeline=profile.pipeline,
    )  # fmt: skip


def serve_region(s: Session, profile: Profile) -> None:
    """Build the region, then warmup and steady state through the Session."""
    # 1. Build: the seed is the one that entered parity (a skewed config is this rank's).
    ctx = RegionContext(
        rank=s.rank, world_size=s.world_size, device=s.device, dtype=s.dtype, group=dist.group.WORLD,
        dims=dict(profile.region.dims), seed=int(s.user_keys["region.seed"]), profile=profile,
    )  # fmt: skip
    reg = region.build_region(profile.region.target, ctx)
    if reg.parity_keys:
        s.check_parity({f"region.{k}": v for k, v in reg.parity_keys.items()}, tag="region-parity")
    s.check_weights(reg.module, manifest=reg.weight_manifest, replicated=reg.replicated_params)
    compiled = s.compile(reg.module)
    plane = s.control_plane(contract_of(reg), cache=KVCache(reset_every=profile.drift.reset_every, reset_fn=reg.reset_cache))

    # 2. Calls: the leader makes the inputs, every rank runs the region on what arrived.
    def make_inputs(call_id: int) -> dict[str, torch.Tensor]:
        inputs = region.make_call_inputs(reg, call_id)
        return dict(zip(region.input_names(reg, len(inputs)), inputs))

    plane.warmup(compiled, calls=profile.warmup_calls, make_inputs=make_inputs)
    for call in plane.serve(profile.steps, make_inputs=make_inputs):
        compiled(*call.inputs)


def contract_of(reg: Region) -> CallContract:
    """The call contract from the region's call-0 inputs and its declared varying dims."""
    sample = region.make_call_inputs(reg, 0)
    names = region.input_names(reg, len(sample))
    undeclared = sorted(set(reg.varying_dims) - set(names))
    if undeclared:
        raise ValueError(f"Region.varying_dims names {undeclared}, which are not inputs {list(names)}")
    return CallContract(
        tensors=tuple(
            TensorSpec(
                name=n, shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                varying=region.varying_of(reg, n, t.dim()),
            )
            for n, t in zip(names, sample)
        )
    )  # fmt: skip


def device_of(profile: Profile, rank: int) -> torch.device:
    return cuda_device(rank) if profile.world.device == "cuda" else torch.device("cpu")
