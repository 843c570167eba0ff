"""The runtime's settings: timeouts, compile, gates, parity and drift. Nothing else.

Built in code (``Timeouts(call_deadline=5)``) or from the ``timeouts:``/``compile:``/...
sections of a YAML profile; the harness's own keys (steps, region, triage, how long a case
may take) live in :mod:`hardening.harness.profile`, never here. ``validate()`` raises
``ValueError("key: why")``.
"""

from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass, field
from typing import Any

MAX_SECONDS = 7 * 24 * 3600.0
"""Longest timeout (a process-group timeout must fit a timedelta)."""
MIN_SECONDS = 0.01
"""Shortest timeout: below it nothing can succeed."""
MAX_COUNT = 10**9
"""Largest count (steps, calls, intervals)."""

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 4, 4, 2


def short(value: Any) -> str:
    """A bounded repr for messages: a YAML alias bomb must not become a 800 MB line."""
    return _short.repr(value)


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

    call_deadline: float = 15.0
    """Deadline of one steady-state call, and of a call blocked in a collective while no
    peer makes progress, warmup included (0 disables both)."""

    compile: float = 300.0
    """Deadline of one warmup call, which may compile (0 disables it)."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) > MAX_SECONDS:
                raise ValueError(f"{f.name}: must be at most {MAX_SECONDS:g} seconds (7 days)")
        _positive(self, ("setup", "pg", "heartbeat", "peer_lost"))
        for name in ("call_deadline", "compile"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0 disables it)")
            if 0 < getattr(self, name) < MIN_SECONDS:
                raise ValueError(f"{name}: must be 0 (off) or at least {MIN_SECONDS:g} seconds")
        if self.peer_lost <= 2 * self.heartbeat:
            raise ValueError("peer_lost: must exceed two heartbeats")


def _positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
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
