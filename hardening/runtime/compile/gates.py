"""The cross-rank compile gate: counters gathered from every rank, judged the same way on
each, so that every rank raises the same :class:`~hardening.errors.CompileGateError`.

Closed twice: after warmup (local health of every rank, then symmetry across ranks) and
at the end of steady state (recompiles after warmup, then symmetry). Each gate is also a
side-channel exchange, so a rank that never gets there is named by the side channel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hardening.errors import CompileGateError
from hardening.runtime.compile.counters import CompileCounters, local_gate_problems, symmetry_problems

if TYPE_CHECKING:
    from hardening.runtime.config import GateConfig
    from hardening.runtime.sidechannel import SideChannel


def after_warmup(side: SideChannel, mine: CompileCounters, gates: GateConfig, *, compiled: bool) -> None:
    """Every rank's breaks, skipped frames and graphs within the gates, and the same on every rank."""
    gathered = [CompileCounters.from_json(c) for c in side.exchange("counters/warmup", mine.to_json())]
    problems = [f"rank {r}: {p}" for r, c in enumerate(gathered) for p in local_gate_problems(c, gates, compiled=compiled)]
    problems += symmetry_problems(gathered)
    if problems:
        raise CompileGateError(message("after warmup", problems))


def in_steady_state(side: SideChannel, steady: CompileCounters, gates: GateConfig) -> None:
    """No rank recompiled past ``gates.max_recompiles`` after warmup, and all did the same.
    The exchange is also the barrier that keeps every rank alive until all are done."""
    finals = [CompileCounters.from_json(c) for c in side.exchange("counters/steady", steady.to_json())]
    problems = [
        f"rank {r}: {c.recompiles} recompile(s) after warmup > max {gates.max_recompiles}"
        + (f" ({'; '.join(c.recompile_reasons)})" if c.recompile_reasons else "")
        for r, c in enumerate(finals)
        if c.recompiles > gates.max_recompiles
    ]
    problems += symmetry_problems(finals)
    if problems:
        raise CompileGateError(message("in steady state", problems))


def message(when: str, problems: list[str]) -> str:
    """First line carries the first problem: it is what tables and summaries show."""
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"compile gate failed {when}: {problems[0]}{more}" + "".join(f"\n  {p}" for p in problems[1:])
