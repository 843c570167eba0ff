"""Profiles: typed configuration of a run, loaded from YAML and validated.

Precedence is built-in defaults < profile file < CLI flags. A profile names only the
keys it changes; an unknown key, a wrong type or a bad value is a :class:`ProfileError`
naming the file and the dotted key, which the CLI turns into exit code 4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hardening.runtime.config import (
    MAX_COUNT,
    MAX_SECONDS,
    MIN_SECONDS,
    CompileConfig,
    DriftConfig,
    GateConfig,
    ParityConfig,
    Timeouts,
    short,
)

DEFAULT_PROFILE = "cpu"
MAX_RANKS = 64
"""Most ranks the one-host ``process`` launcher starts: beyond that, a typo."""
MAX_DIM = 2**24
"""Largest size in ``region.dims``."""
MAX_PROFILE_BYTES = 1 << 20
"""A profile is a few hundred bytes; a larger file is not one (and PyYAML is slow)."""

class ProfileError(ValueError):
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
    """``process``: one independent process per rank, forked from a preloaded fork server."""

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
        if self.launcher != "process":
            raise ValueError(f"launcher: only 'process' is implemented, got {self.launcher!r}")


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
        for name in ("detect", "case", "grace"):
            if getattr(self, name) > MAX_SECONDS:
                raise ValueError(f"{name}: must be at most {MAX_SECONDS:g} seconds (7 days)")
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")
            if getattr(self, name) < MIN_SECONDS:
                raise ValueError(f"{name}: must be at least {MIN_SECONDS:g} seconds")


@dataclass(kw_only=True, slots=True)
class TriageConfig:
    py_spy: bool = True
    """Dump every live rank's stacks with py-spy at a deadline."""

    native: bool = False
    """Pass --native to py-spy (C/C++ frames too; slower)."""

    timeout: float = 15.0
    """Seconds allowed for one py-spy dump."""

    torch_trace: bool = False
    """Each rank writes torch's structured compile trace (``TORCH_TRACE``) to
    ``rank<r>/torch_trace/`` of its case, for ``tlparse``. Best effort, never a gate."""

    def validate(self) -> None:
        if not 0 < self.timeout <= MAX_SECONDS:
            raise ValueError(f"timeout: must be positive and at most {MAX_SECONDS:g} seconds")


@dataclass(kw_only=True, slots=True)
class Profile:
    name: str = DEFAULT_PROFILE
    """Name (the file stem) of the profile."""

    source: str = "<defaults>"
    """Where the profile came from, for messages."""

    world: WorldConfig = field(default_factory=WorldConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

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
        if not 1 <= self.warmup_calls <= 1000:
            raise ValueError("warmup_calls: must be from 1 (compile happens in warmup) to 1000")
        if not 0 <= self.steps <= MAX_COUNT:
            raise ValueError(f"steps: must be from 0 to {MAX_COUNT}")


_NOT_KEYS = {"name", "source"}


def available_profiles() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("hardening.profiles").iterdir() if p.name.endswith(".yaml"))


def load_profile(
    name_or_path: str | None = None, overrides: dict[str, Any] | None = None, *, flags: dict[str, str] | None = None
) -> Profile:
    """Load a shipped profile by name or a YAML file by path, then apply dotted overrides.

    ``flags`` names the command-line flag behind each override key, so that a bad value
    is blamed on ``--ranks``, not on the profile file."""
    spec = name_or_path or DEFAULT_PROFILE
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        path = Path(spec)
        if not path.exists():
            raise ProfileError(f"{spec}: profile file not found")
        if not path.is_file():
            raise ProfileError(f"{spec}: not a regular file")
        source, name = str(path), path.stem
        text = _read_text(path, source)
    else:
        ref = resources.files("hardening.profiles").joinpath(f"{spec}.yaml")
        if not spec.strip() or not ref.is_file():
            raise ProfileError(f"unknown profile {spec!r}; shipped profiles: {', '.join(available_profiles())}")
        source, name = f"profiles/{spec}.yaml", spec
        text = _read_text(ref, source)
    data = _parse(text, source)
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: top level must be a mapping of keys")
    profile = Profile(name=name, source=source)
    _merge(profile, data, source=source, prefix="")
    _validate_all(profile, source)
    for key, value in (overrides or {}).items():
        # Validated one by one so that a bad flag is blamed on the flag, not the file.
        where = (flags or {}).get(key, "command line")
        _merge(profile, _nest(key, value), source=where, prefix="")
        _validate_all(profile, where)
    return profile


def _read_text(path: Any, source: str) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{source}: larger than {MAX_PROFILE_BYTES >> 10} KiB: not a profile")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{source}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def _parse(text: str, source: str) -> Any:
    """YAML to plain data, refusing what PyYAML lets through silently: a key given twice
    (it keeps the last) is named with its dotted path and both lines."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            return {}
        _refuse_duplicates(root, "", set())
        return yaml.safe_load(text)
    except ProfileError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{source}: not valid YAML: {short(' '.join(str(exc).split()))}") from None
    except RecursionError:
        raise ProfileError(f"{source}: nested too deeply to be a profile") from None


def _refuse_duplicates(node: Any, prefix: str, seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias: walked once (an alias bomb must not explode here)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None:
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ProfileError(f"key {prefix + key!r} is given twice (lines {lines[key]} and {line})")
                lines[key] = line
            _refuse_duplicates(value_node, f"{prefix}{key}." if key is not None else prefix, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, prefix, seen_nodes)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(obj: Any, data: dict[str, Any], *, source: str, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    known = [f.name for f in dataclasses.fields(obj) if f.name not in _NOT_KEYS]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in known:
            raise ProfileError(f"{source}: unknown key {short(dotted)} (known here: {', '.join(known)})")
        hint = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ProfileError(f"{source}: key {dotted!r} must be a mapping, got {type(value).__name__}")
            _merge(current, value, source=source, prefix=dotted + ".")
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ProfileError(f"{source}: key {dotted!r} must be a mapping, got {type(value).__name__}")
            merged = dict(current)
            merged.update(value)
            setattr(obj, key, merged)
        else:
            setattr(obj, key, _coerce(value, hint, source=source, key=dotted))


def _coerce(value: Any, hint: Any, *, source: str, key: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for opt in options:
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ProfileError(f"{source}: key {key!r} must be a finite number, got {short(value)}")
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if typing.get_origin(opt) is list and isinstance(value, list):
            (item,) = typing.get_args(opt)
            if all(isinstance(v, item) for v in value):
                return list(value)
    wanted = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
    raise ProfileError(f"{source}: key {key!r} must be {wanted}, got {type(value).__name__} {short(value)}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return hint.__name__


def _validate_all(profile: Profile, source: str) -> None:
    sections = [("", profile)] + [
        (f.name + ".", getattr(profile, f.name))
        for f in dataclasses.fields(profile)
        if dataclasses.is_dataclass(getattr(profile, f.name))
    ]
    for prefix, section in sections:
        check = getattr(section, "validate", None)
        if check is None:
            continue
        try:
            check()
        except ValueError as exc:
            key, _, why = str(exc).partition(": ")
            raise ProfileError(f"{source}: key {prefix + key!r} {why}") from None


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    return dataclasses.asdict(profile)
