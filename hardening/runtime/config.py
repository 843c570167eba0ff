"""The runtime's settings: timeouts, compile, gates, parity, drift and pipeline. Nothing else.

Built in code (``Timeouts(call_deadline=5)``) or from the ``timeouts:``/``compile:``/...
sections of a YAML profile; the harness's own keys (steps, region, triage, how long a case
may take) live in :mod:`hardening.harness.profile`, never here. ``validate()`` of a section
raises ``ValueError("key: why")``; a file or a whole config, :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_SECONDS = 7 * 24 * 3600.0
"""Longest timeout (a process-group timeout must fit a timedelta)."""
MIN_SECONDS = 0.01
"""Shortest timeout: below it nothing can succeed."""
MAX_COUNT = 10**9
"""Largest count (steps, calls, intervals)."""

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 4, 4, 2


MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few hundred bytes; a larger file is not one (and PyYAML is slow)."""
NOT_KEYS = frozenset({"name", "source"})
"""Fields of a config object that are bookkeeping, never keys of its file."""


def short(value: Any) -> str:
    """A bounded repr for messages: a YAML alias bomb must not become a 800 MB line."""
    return _short.repr(value)


class ConfigError(ValueError):
    """A config file or value is unusable; the message names the file and the dotted key."""


INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(kw_only=True, slots=True)
class CompileConfig:
    enabled: bool = True
    """Compile the region with torch.compile (False runs it eagerly; the gates then only check parity)."""

    backend: str = "eager"
    """torch.compile backend wrapped by the counting backend: eager, aot_eager or inductor."""

    mode: str | None = None
    """torch.compile mode (inductor only), e.g. max-autotune-no-cudagraphs."""

    fullgraph: bool = False
    """Compile with fullgraph=True: any graph break raises at the first call."""

    dynamic: bool | None = False
    """torch.compile ``dynamic`` argument."""

    check_collectives: bool = True
    """Before a compiled graph first runs in warmup, ranks agree on the collectives it
    issues (``runtime.compile.collectives``): a rank-conditional collective is a
    ``CompileGateError`` instead of a hang. Off: such a hang ends at the call deadline."""

    def validate(self) -> None:
        if self.backend not in ("eager", "aot_eager", "inductor"):
            raise ValueError(f"backend: must be eager, aot_eager or inductor, got {short(self.backend)}")
        if self.mode is not None and self.mode not in INDUCTOR_MODES:
            raise ValueError(f"mode: must be null or one of {', '.join(INDUCTOR_MODES)}, got {short(self.mode)}")
        if self.mode is not None and self.backend != "inductor":
            raise ValueError(f"mode: {self.mode!r} applies to the inductor backend only, not {self.backend!r}")


@dataclass(kw_only=True, slots=True)
class Timeouts:
    """The runtime's bounds: nothing a rank waits for is unbounded."""

    setup: float = 60.0
    """Seconds from launch until every rank must have finished init, parity and building
    its region (and, once, for importing the region target)."""

    pg: float = 30.0
    """Timeout of every process group and store wait (never the 600 s / 1800 s defaults)."""

    heartbeat: float = 0.2
    """Seconds between heartbeats (and abort-key polls) of each rank's watchdog."""

    peer_lost: float = 3.0
    """A peer whose heartbeat is older than this is declared lost."""

    node_lost: float = 0.6
    """A peer on another node whose launcher has not vouched for it this long is lost:
    that node is gone (launchers vouch for their ranks every 0.1 s, from outside them;
    see :mod:`hardening.harness.liveness`). Ranks of one's own node are never judged by it."""

    call_deadline: float = 15.0
    """Deadline of one steady-state call, and of a call blocked in a collective while no
    peer makes progress, warmup included (0 disables both)."""

    compile: float = 300.0
    """Deadline of one warmup call, which may compile (0 disables it)."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) > MAX_SECONDS:
                raise ValueError(f"{f.name}: must be at most {MAX_SECONDS:g} seconds (7 days)")
        check_seconds(self, ("setup", "pg", "heartbeat", "peer_lost", "node_lost"))
        for name in ("call_deadline", "compile"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0 disables it)")
            if 0 < getattr(self, name) < MIN_SECONDS:
                raise ValueError(f"{name}: must be 0 (off) or at least {MIN_SECONDS:g} seconds")
        if self.peer_lost <= 2 * self.heartbeat:
            raise ValueError("peer_lost: must exceed two heartbeats")
        if self.node_lost < 0.3:
            raise ValueError("node_lost: must be at least 0.3 seconds (three of the launcher's 0.1 s beats)")


def check_seconds(obj: Any, names: tuple[str, ...]) -> None:
    """Each of ``names`` is a usable positive number of seconds: ValueError("name: why")."""
    for name in names:
        if getattr(obj, name) > MAX_SECONDS:
            raise ValueError(f"{name}: must be at most {MAX_SECONDS:g} seconds (7 days)")
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}: must be positive")
        if getattr(obj, name) < MIN_SECONDS:
            raise ValueError(f"{name}: must be at least {MIN_SECONDS:g} seconds")


@dataclass(kw_only=True, slots=True)
class GateConfig:
    max_graph_breaks: int = 0
    """Graph breaks allowed in the region (counted from graph_break_reasons, not counters)."""

    max_recompiles: int = 0
    """Recompiles allowed after warmup; 0 also arms the recompile guard."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if not 0 <= getattr(self, f.name) <= MAX_COUNT:
                raise ValueError(f"{f.name}: must be from 0 to {MAX_COUNT}")


@dataclass(kw_only=True, slots=True)
class ParityConfig:
    ignore: list[str] = field(default_factory=list)
    """Fingerprint keys not compared across ranks: exact keys (``env.NCCL_SOCKET_IFNAME``)
    or shell patterns (``env.MY_JOB_*``), for values that legitimately differ per rank or
    host. The list itself is compared."""

    def validate(self) -> None:
        for pattern in self.ignore:
            if not pattern.strip():
                raise ValueError("ignore: entries must be non-empty fingerprint keys or patterns")


@dataclass(kw_only=True, slots=True)
class DriftConfig:
    digest_every: int = 1
    """Check the input digest every N steady-state calls (0 disables; warmup is never checked)."""

    weights: bool = True
    """Check weight fingerprints (manifest and replicated parameters) after build."""

    reset_every: int = 4
    """The leader resets the KV cache every N calls (a new cache_epoch); 0: only at call 0."""

    def validate(self) -> None:
        for name in ("digest_every", "reset_every"):
            if not 0 <= getattr(self, name) <= MAX_COUNT:
                raise ValueError(f"{name}: must be from 0 to {MAX_COUNT}")


PIPELINE_KINDS = ("pp0", "pp1")


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    kind: str = "pp1"
    """pp0: rank 0 sends each chunk to every mesh rank over p2p; pp1: to the mesh leader
    (rank 1), which validates it and broadcasts it on ``mesh_pg``."""

    depth_in: int = 2
    """D_in: chunks rank 0 may have in flight (sent, result not yet taken); the mesh
    keeps this many input buffers posted. 2 is double buffering."""

    depth_out: int = 2
    """D_out: results the mesh leader may have sent and rank 0 not yet taken; rank 0
    keeps this many result buffers posted."""

    queue_timeout: float = 5.0
    """Seconds a full queue may stay full (rank 0 waiting for a result with D_in chunks
    in flight, the leader waiting to hand over a result) before BackpressureError."""

    def validate(self) -> None:
        if self.kind not in PIPELINE_KINDS:
            raise ValueError(f"kind: must be one of {', '.join(PIPELINE_KINDS)}, got {short(self.kind)}")
        for name in ("depth_in", "depth_out"):
            if not 1 <= getattr(self, name) <= 64:
                raise ValueError(f"{name}: must be from 1 to 64 (bounded queues)")
        check_seconds(self, ("queue_timeout",))


@dataclass(kw_only=True, slots=True)
class RuntimeConfig:
    """Everything the runtime is configured by, and nothing a harness or server adds."""

    timeouts: Timeouts = field(default_factory=Timeouts)
    compile: CompileConfig = field(default_factory=CompileConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RuntimeConfig:
        """The sections of a YAML file (``timeouts:``, ``compile:``...); a key the runtime
        does not know, a wrong type or a bad value is a ConfigError naming file and key."""
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"{source}: config file not found")
        data = parse_yaml(read_text(Path(path), source), source)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of keys")
        config = cls()
        merge(config, data, source=source, prefix="")
        validate_all(config, source, itself=False)
        return config

    def validate(self) -> None:
        validate_all(self, "RuntimeConfig", itself=False)


def read_text(path: Any, source: str) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES >> 10} KiB: not a config file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def parse_yaml(text: str, source: str) -> Any:
    """YAML to plain data, refusing what PyYAML lets through silently: a key given twice
    (it keeps the last) is named with its dotted path and both lines."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            return {}
        _refuse_duplicates(root, "", set())
        return yaml.safe_load(text)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {short(' '.join(str(exc).split()))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config file") from None


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
                    raise ConfigError(f"key {prefix + key!r} is given twice (lines {lines[key]} and {line})")
                lines[key] = line
            _refuse_duplicates(value_node, f"{prefix}{key}." if key is not None else prefix, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, prefix, seen_nodes)


def nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def merge(obj: Any, data: dict[str, Any], *, source: str, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    known = [f.name for f in dataclasses.fields(obj) if f.name not in NOT_KEYS]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in known:
            raise ConfigError(f"{source}: unknown key {short(dotted)} (known here: {', '.join(known)})")
        hint = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key {dotted!r} must be a mapping, got {type(value).__name__}")
            merge(current, value, source=source, prefix=dotted + ".")
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key {dotted!r} must be a mapping, got {type(value).__name__}")
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
                raise ConfigError(f"{source}: key {key!r} must be a finite number, got {short(value)}")
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if typing.get_origin(opt) is list and isinstance(value, list):
            (item,) = typing.get_args(opt)
            if all(isinstance(v, item) for v in value):
                return list(value)
    wanted = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
    raise ConfigError(f"{source}: key {key!r} must be {wanted}, got {type(value).__name__} {short(value)}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return hint.__name__


def validate_all(config: Any, source: str, *, itself: bool = True) -> None:
    """``validate()`` of each section of ``config`` (and of ``config`` itself unless
    ``itself`` is False); ConfigError names the dotted key."""
    sections = ([("", config)] if itself else []) + [
        (f.name + ".", getattr(config, f.name))
        for f in dataclasses.fields(config)
        if dataclasses.is_dataclass(getattr(config, f.name))
    ]
    for prefix, section in sections:
        check = getattr(section, "validate", None)
        if check is None:
            continue
        try:
            check()
        except ValueError as exc:
            key, _, why = str(exc).partition(": ")
            raise ConfigError(f"{source}: key {prefix + key!r} {why}") from None
