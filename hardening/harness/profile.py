"""Profiles: typed configuration of a run, loaded from YAML and validated.

Precedence is built-in defaults < profile file < CLI flags. A profile names only the
keys it changes; an unknown key, a wrong type or a bad value is a :class:`ProfileError`
naming the file and the dotted key, which the CLI turns into exit code 4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hardening.runtime.config import (
    ConfigError,
    merge,
    nest,
    parse_yaml,
    read_text,
    validate_all,
    MAX_COUNT,
    MAX_SECONDS,
    CompileConfig,
    DriftConfig,
    GateConfig,
    ParityConfig,
    PipelineConfig,
    Timeouts,
    check_seconds,
    short,
)

DEFAULT_PROFILE = "cpu"
MAX_RANKS = 64
"""Most ranks the one-host ``process`` launcher starts: beyond that, a typo."""
MAX_DIM = 2**24
"""Largest size in ``region.dims``."""
MAX_PRELOAD = 32
"""Most modules ``world.preload`` names."""
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

ARTIFACT_POLICIES = ("on_failure", "always", "never")
"""Values of ``triage.artifacts``."""

class ProfileError(ConfigError):
    """A profile (or a flag overriding it) is unusable; the message names file and key."""


@dataclass(kw_only=True, slots=True)
class WorldConfig:
    ranks: int = 2
    """Number of rank processes (the TP degree of the reference region)."""

    backend: str = "gloo"
    """Data-plane backend: ``gloo`` (CPU) or ``nccl`` (CUDA). The side channel is always gloo."""

    device: str = "cpu"
    """``cpu`` or ``cuda``; with ``cuda`` rank r uses device ``r % device_count``."""

    launcher: str = "process"
    """``process``: one independent process per rank, forked from a preloaded fork server,
    the store hosted by the runner. ``torchrun``: each case under ``torch.distributed.run``
    (c10d rendezvous, the agent's store, ``--max-restarts 0``); slower to start (every rank
    imports torch), but the launcher users run, and the one that spans several nodes."""

    nnodes: int = 1
    """Nodes the ranks are split over, evenly (torchrun only): one runner per node."""

    node_rank: int = 0
    """This runner's node, 0..nnodes-1; node 0 writes the report with every node's ranks."""

    rdzv_endpoint: str = ""
    """``HOST:PORT`` every node's runner can reach (multi-node): node 0 listens there."""

    preload: list[str] = field(default_factory=list)
    """Modules the fork server imports once, before it forks any rank (``process``
    launcher): heavy libraries the region imports (``transformers``), which every rank of
    every case would otherwise import itself, seconds each on a small box. Installed
    libraries only (never the region's own module: user code does not run in the
    server), and none whose import starts a thread or touches CUDA (forking after that is
    unsafe). A module that fails to import there is said in ``forkserver.log``; the ranks
    then import it themselves."""

    rdzv_id: str = ""
    """The run's token, the same on every node (multi-node; like torchrun's ``--rdzv-id``):
    every key of the run lives under it, so nobody who does not know it can write one into
    the endpoint's store, which has no authentication. Empty: node 0 makes one up and
    publishes it there (readable by anyone who can reach the endpoint)."""

    def validate(self) -> None:
        if self.ranks < 1:
            raise ValueError("ranks: must be at least 1")
        if self.ranks > MAX_RANKS:
            raise ValueError(f"ranks: must be at most {MAX_RANKS} (one host), got {self.ranks}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: must be gloo or nccl, got {self.backend!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: must be cpu or cuda, got {self.device!r}")
        if self.backend == "nccl" and self.device != "cuda":
            raise ValueError("backend: nccl needs device: cuda")
        if self.launcher not in ("process", "torchrun"):
            raise ValueError(f"launcher: must be process or torchrun, got {self.launcher!r}")
        if self.nnodes < 1:
            raise ValueError("nnodes: must be at least 1")
        if self.nnodes > 1 and self.launcher != "torchrun":
            raise ValueError(f"nnodes: {self.nnodes} nodes need launcher: torchrun (the process launcher is one host)")
        if self.ranks % self.nnodes:
            raise ValueError(f"nnodes: {self.ranks} ranks do not split evenly over {self.nnodes} nodes")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank: must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint: {self.nnodes} nodes need HOST:PORT every node can reach, got {self.rdzv_endpoint!r}")
        elif self.rdzv_endpoint or self.rdzv_id:
            key = "rdzv_endpoint" if self.rdzv_endpoint else "rdzv_id"
            raise ValueError(f"{key}: only for nnodes > 1 (one node rendezvouses on loopback by itself)")
        if self.rdzv_id and not all(c.isalnum() or c in "-_" for c in self.rdzv_id):
            raise ValueError(f"rdzv_id: letters, digits, '-' and '_' only, got {self.rdzv_id!r}")
        if len(self.preload) > MAX_PRELOAD:
            raise ValueError(f"preload: at most {MAX_PRELOAD} modules, got {len(self.preload)}")
        for name in self.preload:
            if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
                raise ValueError(f"preload: {short(name)} is not a module name (dotted identifiers, e.g. transformers)")


@dataclass(kw_only=True, slots=True)
class RegionConfig:
    target: str = "hardening.harness.reference:build"
    """Region factory ``module:function`` (or ``path/to/file.py:function``) returning a Region."""

    dtype: str = "float32"
    """Parameter and activation dtype: float32, bfloat16 or float16."""

    dims: dict[str, int] = field(
        default_factory=lambda: {"hidden": 64, "heads": 4, "tokens": 8, "cache": 16, "mlp": 256, "batch": 1}
    )
    """Sizes handed to the factory (the reference region reads hidden, heads, tokens, cache, mlp, batch)."""

    seed: int = 0
    """Seed of the weights and of the inputs of every call."""

    def validate(self) -> None:
        if ":" not in self.target:
            raise ValueError(f"target: must be 'module:function', got {self.target!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        for key, value in self.dims.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIM:
                raise ValueError(f"dims.{key}: must be an integer from 1 to {MAX_DIM}, got {short(value)}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be from 0 to 2**63-1 (it seeds torch generators), got {short(self.seed)}")


@dataclass(kw_only=True, slots=True)
class TimeoutConfig(Timeouts):
    """The runtime's timeouts plus the harness's own bounds on a case."""

    detect: float = 20.0
    """Seconds after a fault fires before a rank still alive is declared hung."""

    case: float = 180.0
    """Hard cap on one case, from launch to the last rank's exit."""

    grace: float = 2.0
    """Seconds between SIGTERM and SIGKILL when the runner tears ranks down."""

    def validate(self) -> None:
        Timeouts.validate(self)  # slots dataclasses break zero-argument super() before 3.14
        check_seconds(self, ("detect", "case", "grace"))


@dataclass(kw_only=True, slots=True)
class TriageConfig:
    py_spy: bool = True
    """Dump every live rank's stacks with py-spy at a deadline."""

    native: bool = False
    """Pass --native to py-spy (C/C++ frames too; slower)."""

    timeout: float = 15.0
    """Seconds allowed for one py-spy dump."""

    torch_trace: bool = False
    """Every case keeps each rank's structured compile trace (``TORCH_TRACE``,
    ``rank<r>/torch_trace/``, for ``tlparse``), passing ones too. Best effort, never a gate."""

    artifacts: str = "on_failure"
    """The debug artifacts of a compiled region: each rank's ``TORCH_TRACE`` directory and
    depyf dump (``rank<r>/depyf/``), plus tlparse's all-ranks HTML when ``tlparse`` is
    installed. ``on_failure``: written by every compiled rank (a trace must start before
    the first compile, long before a failure shows) and kept only by cases that did not
    pass; ``always``: passing cases keep them too; ``never``: not written at all."""

    def validate(self) -> None:
        if not 0 < self.timeout <= MAX_SECONDS:
            raise ValueError(f"timeout: must be positive and at most {MAX_SECONDS:g} seconds")
        if self.artifacts not in ARTIFACT_POLICIES:
            raise ValueError(f"artifacts: must be one of {', '.join(ARTIFACT_POLICIES)}, got {short(self.artifacts)}")


@dataclass(kw_only=True, slots=True)
class StageWork:
    """The ``pp`` suite's stage work per chunk, **modelled**: each stage sleeps this long
    (on a CPU box the stages' real work would contend for the same cores, and the overlap
    figures would measure the scheduler). Every report that shows overlap says so."""

    produce_ms: float = 12.0
    """Rank 0 making one chunk's inputs."""
    consume_ms: float = 6.0
    """Rank 0 taking one result."""
    mesh_ms: float = 18.0
    """Each mesh rank's work on one chunk, on top of running the region."""
    jitter_ms: float = 12.0
    """Chunk-to-chunk variation of ``produce_ms`` and ``mesh_ms``: each chunk's is off by
    a uniform draw in ``±jitter_ms``, independent per stage (real stages vary: a slow
    chunk on one side meeting a fast one on the other is what one buffer cannot absorb)."""
    recompute_ms: float = 30.0
    """O-03: the mesh recomputing its cache on an epoch bump (the stashed variant restores it for free)."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if not 0 <= getattr(self, f.name) <= 10_000:
                raise ValueError(f"{f.name}: must be from 0 to 10000 ms")
        if self.jitter_ms > min(self.produce_ms, self.mesh_ms):
            raise ValueError("jitter_ms: must be at most produce_ms and mesh_ms (a stage cannot take negative time)")


@dataclass(kw_only=True, slots=True)
class PipelineGates:
    """The ``pp`` suite's metric gates: a metric case passes only within them."""

    min_overlap_score: float = 0.8
    """O-01 (every D >= 2) and O-02: the OverlapScore at least this."""
    max_mesh_idle_per_chunk_ms: float = 5.0
    """O-02: the mesh leader's wait for its next chunk, per steady chunk, at most this."""
    max_recompute_delta: float = 0.15
    """O-03: the stashed variant's OverlapScore minus the recompute variant's, at most this
    (overlap the recompute took away; see the checker)."""

    def validate(self) -> None:
        if not 0 <= self.min_overlap_score <= 1:
            raise ValueError("min_overlap_score: must be from 0 to 1")
        if not 0 <= self.max_mesh_idle_per_chunk_ms <= 60_000:
            raise ValueError("max_mesh_idle_per_chunk_ms: must be from 0 to 60000")
        if not -1 <= self.max_recompute_delta <= 1:
            raise ValueError("max_recompute_delta: must be from -1 to 1")


@dataclass(kw_only=True, slots=True)
class PipelineWorkload:
    """The harness's pipeline workload (the ``pp`` suite): how many chunks, which stage
    work, which depths to sweep, which gates."""

    chunks: int = 16
    """Steady chunks per measured segment."""
    sweep: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    """O-01: the depths swept (chunks rank 0 may have in flight, up to D_in), one measured
    segment each; the workload raises ``pipeline.depth_in`` to the deepest."""
    cut_every: int = 4
    """O-03: a hard cut (new epoch) every N chunks."""
    work: StageWork = field(default_factory=StageWork)
    gates: PipelineGates = field(default_factory=PipelineGates)

    def validate(self) -> None:
        if not 2 <= self.chunks <= 100_000:
            raise ValueError("chunks: must be from 2 to 100000")
        if not self.sweep or any(not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 64 for d in self.sweep):
            raise ValueError(f"sweep: must be a non-empty list of depths from 1 to 64, got {short(self.sweep)}")
        if not 1 <= self.cut_every <= MAX_COUNT:
            raise ValueError(f"cut_every: must be from 1 to {MAX_COUNT}")
        for name in ("work", "gates"):
            try:
                getattr(self, name).validate()
            except ValueError as exc:
                raise ValueError(f"{name}.{exc}") from None


@dataclass(kw_only=True, slots=True)
class Profile:
    name: str = DEFAULT_PROFILE
    """Name (the file stem) of the profile."""

    source: str = "<defaults>"
    """Where the profile came from, for messages."""

    world: WorldConfig = field(default_factory=WorldConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    program: str | None = None
    """A Python program every rank runs instead of the region (``--program``): it uses
    the runtime itself (``@hr.record`` and a ``Session``) and the harness judges it by the
    records it writes. ``region`` is then unused."""

    warmup_calls: int = 2
    """Warmup calls every rank runs in lockstep before the gates close."""

    steps: int = 4
    """Steady-state calls after warmup, under the recompile guard."""

    hardened: bool = True
    """False runs the same served loop with the hardening runtime switched off (the header
    as a JSON object broadcast, never a pickle; torch's default timeouts, no parity, watchdog, digests, lifecycle checks or
    gates): stock behaviour, for the detection benchmark. Never for real use."""

    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    pp: PipelineWorkload = field(default_factory=PipelineWorkload)
    triage: TriageConfig = field(default_factory=TriageConfig)

    def fingerprint_keys(self) -> dict[str, Any]:
        """The harness's own settings every rank must agree on, for the runtime's parity
        fingerprint (the harness is a user of it like any other)."""
        region = {"target": self.region.target, "dims": self.region.dims, "seed": self.region.seed}
        digest = hashlib.sha256(json.dumps(region, sort_keys=True, default=str).encode()).hexdigest()
        return {
            "region.target": self.region.target,
            "region.config_hash": digest[:16],
            "region.seed": self.region.seed,
            "region.dims": self.region.dims,
            "warmup_calls": self.warmup_calls,
            "steps": self.steps,
        }

    def validate(self) -> None:
        if self.program is not None and not self.program.endswith(".py"):
            raise ValueError(f"program: must be a path to a .py file, got {short(self.program)}")
        if not 1 <= self.warmup_calls <= 1000:
            raise ValueError("warmup_calls: must be from 1 (compile happens in warmup) to 1000")
        if not 0 <= self.steps <= MAX_COUNT:
            raise ValueError(f"steps: must be from 0 to {MAX_COUNT}")


def available_profiles() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("hardening.profiles").iterdir() if p.name.endswith(".yaml"))


def load_profile(
    name_or_path: str | None = None, overrides: dict[str, Any] | None = None, *, flags: dict[str, str] | None = None
) -> Profile:
    """Load a shipped profile by name or a YAML file by path, then apply dotted overrides.

    ``flags`` names the command-line flag behind each override key, so that a bad value
    is blamed on ``--ranks``, not on the profile file."""
    try:
        return _load(name_or_path, overrides, flags)
    except ProfileError:
        raise
    except ConfigError as exc:  # the shared loader's error, as the harness names it
        raise ProfileError(str(exc)) from None


def _load(name_or_path: str | None, overrides: dict[str, Any] | None, flags: dict[str, str] | None) -> Profile:
    spec = name_or_path or DEFAULT_PROFILE
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        path = Path(spec)
        if not path.exists():
            raise ProfileError(f"{spec}: profile file not found")
        if not path.is_file():
            raise ProfileError(f"{spec}: not a regular file")
        source, name = str(path), path.stem
        text = read_text(path, source)
    else:
        ref = resources.files("hardening.profiles").joinpath(f"{spec}.yaml")
        if not spec.strip() or not ref.is_file():
            raise ProfileError(f"unknown profile {spec!r}; shipped profiles: {', '.join(available_profiles())}")
        source, name = f"profiles/{spec}.yaml", spec
        text = read_text(ref, source)
    data = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: top level must be a mapping of keys")
    profile = Profile(name=name, source=source)
    merge(profile, data, source=source, prefix="")
    validate_all(profile, source)
    # Validated one by one so that a bad flag is blamed on the flag, not the file; the
    # launcher's keys constrain each other (nodes need an endpoint), so they go together.
    items = list((overrides or {}).items())
    together = [(k, v) for k, v in items if k in _TOGETHER]
    batches = [[(k, v)] for k, v in items if k not in _TOGETHER] + ([together] if together else [])
    for batch in batches:
        where = " ".join((flags or {}).get(key, "command line") for key, _ in batch)
        for key, value in batch:
            merge(profile, nest(key, value), source=where, prefix="")
        try:
            validate_all(profile, where)
        except ConfigError as exc:  # blame the one flag whose key the message names
            named = [key for key, _ in batch if f"'{key}'" in str(exc)]
            if len(batch) == 1 or not named:
                raise
            raise type(exc)(str(exc).replace(where, (flags or {}).get(named[0], "command line"), 1)) from None
    return profile


_TOGETHER = frozenset({"world.launcher", "world.nnodes", "world.node_rank", "world.rdzv_endpoint", "world.rdzv_id"})


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    return dataclasses.asdict(profile)
