"""The cross-rank compile gate: counters gathered from every rank, judged the same way on
each, so that every rank raises the same :class:`~hardening.errors.CompileGateError`.

Closed twice: after warmup (local health of every rank, then symmetry across ranks) and
at the end of steady state (recompiles after warmup, then symmetry). Each gate is also a
side-channel exchange, so a rank that never gets there is named by the side channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hardening.errors import CompileGateError
from hardening.runtime.compile.counters import CompileCounters, local_gate_problems, symmetry_problems

if TYPE_CHECKING:
    from hardening.runtime.config import GateConfig
    from hardening.runtime.sidechannel import SideChannel


def after_warmup(
    side: SideChannel, mine: CompileCounters, gates: GateConfig, *, compiled: bool, among: Sequence[int] | None = None
) -> None:
    """Every rank's breaks, skipped frames and graphs within the gates, and the same on every
    rank; ``among``: only these ranks run the region (a pipeline's mesh), every rank still
    takes part in the exchange."""
    ranks, gathered = _gather(side, "counters/warmup", mine, among)
    problems = [f"rank {r}: {p}" for r, c in zip(ranks, gathered) for p in local_gate_problems(c, gates, compiled=compiled)]
    problems += symmetry_problems(gathered, ranks=ranks)
    if problems:
        raise CompileGateError(message("after warmup", problems))


def in_steady_state(side: SideChannel, steady: CompileCounters, gates: GateConfig, *, among: Sequence[int] | None = None) -> None:
    """No rank recompiled past ``gates.max_recompiles`` after warmup, and all did the same.
    The exchange is also the barrier that keeps every rank alive until all are done."""
    ranks, finals = _gather(side, "counters/steady", steady, among)
    problems = [
        f"rank {r}: {c.recompiles} recompile(s) after warmup > max {gates.max_recompiles}"
        + (f" ({'; '.join(c.recompile_reasons)})" if c.recompile_reasons else "")
        for r, c in zip(ranks, finals)
        if c.recompiles > gates.max_recompiles
    ]
    problems += symmetry_problems(finals, ranks=ranks)
    if problems:
        raise CompileGateError(message("in steady state", problems))


def _gather(side: SideChannel, tag: str, mine: CompileCounters, among: Sequence[int] | None) -> tuple[list[int], list[CompileCounters]]:
    everyone = [CompileCounters.from_json(c) for c in side.exchange(tag, mine.to_json())]
    ranks = list(among) if among is not None else list(range(len(everyone)))
    return ranks, [everyone[r] for r in ranks]


def message(when: str, problems: list[str]) -> str:
    """First line carries the first problem: it is what tables and summaries show."""
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"compile gate failed {when}: {problems[0]}{more}" + "".join(f"\n  {p}" for p in problems[1:])
