"""The terminal report: one row per case, a detail block per non-passing case, a summary.

This module owns how a result reads as plain text (no colours): the table users read
before every merge, and the per-rank wording (:func:`rank_end`, :func:`rank_detail_lines`)
that the JUnit failure bodies reuse so both reports say the same thing.
"""

from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate

from hardening.harness.results import CaseResult, Outcome, RankResult, SuiteResult, Verdict, summarize

DASH = "—"
MESSAGE_WIDTH = 160
MAX_REASONS = 5
HEADERS = ["case", "fault", "expect", "outcome", "verdict", "t_detect", "ranks", "breaks", "recompiles", "wall"]


def render_table(result: SuiteResult) -> str:
    """The full terminal report for ``result`` as one string (ends without a newline)."""
    rows = [_row(case) for case in result.cases]
    parts = [tabulate(rows, headers=HEADERS, tablefmt="simple", disable_numparse=True)]
    details = [_detail_block(case) for case in result.cases if case.verdict is not Verdict.PASS]
    if details:
        parts.append("\n\n".join(details))
    parts.append(_summary(result))
    return "\n\n".join(parts)


# -- cells ------------------------------------------------------------------------------


def seconds(value: float | None, digits: int = 2) -> str:
    """``0.41s``, or a dash when unknown."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return DASH
    return f"{value:.{digits}f}s"


def rank_end(rank: RankResult) -> str:
    """How one rank ended, in a word: ``ParityError``, ``ok``, ``signal SIGKILL``, ``exit 3``, ``hung@warmup``."""
    if rank.exit_code is None:  # alive at the deadline, or unknown (a node that never said)
        return rank.error_class or "hung" + (f"@{rank.phase}" if rank.phase else "")
    if rank.error_class:
        return rank.error_class
    if rank.exit_code == 0:
        return "ok"
    if rank.signal:
        return f"signal {rank.signal}"
    return f"exit {rank.exit_code}"


def _ranks_cell(case: CaseResult) -> str:
    if not case.ranks:
        return DASH
    return " · ".join(f"r{r.rank} {rank_end(r)}" for r in _sorted_ranks(case))


def _counter_cell(case: CaseResult, key: str) -> str:
    ranks = _sorted_ranks(case)
    if not any(r.counters for r in ranks):
        return DASH
    values = []
    for r in ranks:
        value = r.counters.get(key) if r.counters else None
        values.append(DASH if value is None else str(value))
    return "/".join(values)


def _row(case: CaseResult) -> list[str]:
    return [
        case.id,
        case.fault or DASH,
        case.expectation or DASH,
        str(case.outcome),
        str(case.verdict).upper(),
        seconds(case.t_detect),
        _ranks_cell(case),
        _counter_cell(case, "graph_breaks"),
        _counter_cell(case, "recompiles"),
        seconds(case.wall_s, 1),
    ]


# -- details ----------------------------------------------------------------------------


def trim(text: str, width: int = MESSAGE_WIDTH) -> str:
    """First line of ``text``, cut to ``width`` characters with an ellipsis."""
    line = text.strip().splitlines()[0].strip() if text and text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _reasons(value: Any) -> list[str]:
    if value is None or value == [] or value == {} or value == "":
        return []
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, dict):
        items = [f"{k}: {v}" for k, v in value.items()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [str(v) for v in value]
    else:
        items = [str(value)]
    shown = [trim(i) for i in items[:MAX_REASONS]]
    if len(items) > MAX_REASONS:
        shown.append(f"(+{len(items) - MAX_REASONS} more)")
    return shown


def rank_detail_lines(rank: RankResult) -> list[str]:
    """Lines describing one rank's end: its end and first message line, then indented facts."""
    end = rank_end(rank)
    facts = []
    if rank.exit_code not in (0, None) and end != f"exit {rank.exit_code}":
        facts.append(f"exit {rank.exit_code}")
    if rank.signal and end != f"signal {rank.signal}":
        facts.append(f"signal {rank.signal}")
    if rank.phase and rank.exit_code is not None:  # a hung rank's end already names its phase
        facts.append(f"phase {rank.phase}")
    if rank.root_cause_rank is not None:
        facts.append(f"root cause r{rank.root_cause_rank}")
    if not rank.has_record:
        facts.append("no final record")
    head = f"r{rank.rank} {end}" + (f" ({', '.join(facts)})" if facts else "")
    message = trim(rank.message)
    lines = [head + (f": {message}" if message else "")]
    counters = rank.counters or {}
    for key, label in (
        ("break_reasons", "break reasons"),
        ("recompile_reasons", "recompile reasons"),
        ("warmup_recompile_reasons", "recompiles in warmup (allowed)"),
    ):
        reasons = _reasons(counters.get(key))
        if reasons:
            lines.append(f"  {label}:")
            lines.extend(f"    - {r}" for r in reasons)
    undecided = _reasons((counters.get("collective_check") or {}).get("undecided"))
    if undecided:
        lines.append("  collective check could not decide:")
        lines.extend(f"    - {r}" for r in undecided)
    if rank.exit_code is None:
        if rank.where:
            lines.append(f"  where: {trim(rank.where)}")
        lines.append(f"  stacks: {rank.stacks_path or '(none captured)'}")
    lines.extend(f"  {name}: {path}" for name, path in sorted((rank.artifacts or {}).items()))
    if rank.log_dir:
        lines.append(f"  log: {rank.log_dir}")
    return lines


def _detail_block(case: CaseResult) -> str:
    head = f"{case.id} {str(case.verdict).upper()} ({case.outcome})"
    if case.title:
        head += f" {case.title}"
    lines = [head]
    indent = "    "
    lines.append(f"{indent}reason: {case.reason or '(none given)'}")
    if case.root_cause_rank is not None:
        lines.append(f"{indent}root cause: {case.root_cause}")
    if case.t_detect is not None:
        lines.append(f"{indent}t_detect: {seconds(case.t_detect)} (budget {seconds(case.budget_s)})")
    if case.metrics:
        lines.append(f"{indent}measured: {metrics_text(case.metrics)}")
    for rank in _sorted_ranks(case):
        lines.extend(indent + line for line in rank_detail_lines(rank))
    if case.run_dir:
        lines.append(f"{indent}case directory: {case.run_dir}")
    return "\n".join(lines)


def _summary(result: SuiteResult) -> str:
    counts = summarize(result)
    n = len(result.cases)
    skipped = f", {counts[Verdict.SKIPPED.value]} skipped" if counts[Verdict.SKIPPED.value] else ""
    line = (
        f"{n} case{'' if n == 1 else 's'}: {counts[Verdict.PASS.value]} pass, "
        f"{counts[Verdict.FAIL.value]} fail, {counts[Verdict.UNKNOWN.value]} unknown{skipped} "
        f"in {seconds(result.wall_s, 1)}"
    )
    interrupted = sum(1 for c in result.cases if c.outcome is Outcome.INTERRUPTED)
    if result.interrupted:
        line += f" -- INTERRUPTED{f' by {result.interrupted_by}' if result.interrupted_by else ''} (partial report"
        line += f", {interrupted} case(s) cut short)" if interrupted else ")"
    lines = [line]
    # A passing case shows no details: what the collective check could not decide is said here.
    for case in result.cases:
        if case.verdict is Verdict.PASS:
            for rank in _sorted_ranks(case):
                for why in _reasons(((rank.counters or {}).get("collective_check") or {}).get("undecided"))[:1]:
                    lines.append(f"note: {case.id} r{rank.rank}: the collective check could not decide: {why}")
        if case.verdict is Verdict.PASS and case.metrics:
            lines.append(f"measured: {case.id} {metrics_text(case.metrics)}")
    if result.harness_error:
        lines.append(f"harness error: {result.harness_error}")
    lines.append(f"run directory: {result.run_dir or DASH}")
    return "\n".join(lines)


def metrics_text(metrics: dict[str, Any]) -> str:
    """A checker's figures on one line: ``D=1 overlap_score 0.86, ...; delta 0.02 (note)``."""
    parts = []
    for key, value in metrics.items():
        if key == "note":
            continue
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {_figure(v)}" for k, v in value.items())
            parts.append(f"{key}: {inner}")
        else:
            parts.append(f"{key} {_figure(value)}")
    note = f" ({metrics['note']})" if "note" in metrics else ""
    return "; ".join(parts) + note


def _figure(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _sorted_ranks(case: CaseResult) -> list[RankResult]:
    return sorted(case.ranks, key=lambda r: r.rank)
