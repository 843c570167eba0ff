"""Compile counters and their judgement: pure Python, so gathered counters can be judged
anywhere (the runner, a peer) without torch.

:class:`CompileCounters` is what :mod:`.probe` counted on one rank; ``local_gate_problems``
judges one rank against the gates and ``symmetry_problems`` compares ranks. Break and
recompile reasons are normalized here so that the same cause reads the same on every rank.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hardening.runtime.config import GateConfig

_MAX_REASON_CHARS = 300

# Compiled-autograd ids look like "!<ca_id>" or "!<ca_id>/<frame>/<compile>"; some versions
# append an attempt suffix ("0/0_1"), which is why only the leading "frame/compile" is read.
_CA_PREFIX = re.compile(r"^!\d+/?")
_FRAME_COMPILE = re.compile(r"^(\d+)/(\d+)")

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
# Guards on object identity embed id() values, which differ between processes.
_OBJ_ID = re.compile(r"(___check_(?:obj|type)_id\([^,()]*,\s*)\d+")
_WHITESPACE = re.compile(r"\s+")

# Phrasings of "Dynamo gave up on the whole frame" across 2.6 ("Skipping frame because there
# is a graph break in a for/while loop") and 2.8+ (gb_type "graph break in loop", context
# "frame skipped: ...", explanation "Skipping the frame and falling back to eager").
_SKIP_TEXT = re.compile(
    r"skipping (?:the )?frame|frame skipped|graph break in (?:a )?(?:for/while )?loop",
    re.IGNORECASE,
)
# Since 2.8 a break raised while handling another is chained into one counter key.
_CHAINED_BREAK = "*** While handling this graph break, another graph break occurred: ***"


def normalize_reason(text: str) -> str:
    """One comparable line for a break/skip/recompile message.

    The same break must compare equal on two processes: keep only the first non-empty line
    (later lines carry user stack traces and debug context with object reprs), mask memory
    addresses and object ids, collapse whitespace and cap the length.
    """
    first = next((line for line in str(text).splitlines() if line.strip()), "")
    first = _ADDRESS.sub("0x?", first)
    first = _OBJ_ID.sub(r"\1?", first)
    first = _WHITESPACE.sub(" ", first).strip()
    if len(first) > _MAX_REASON_CHARS:
        first = first[: _MAX_REASON_CHARS - 3] + "..."
    return first


_EXPLANATION = re.compile(r"^\s*Explanation:\s*(.+)$", re.MULTILINE)
_USER_CODE_FILE = re.compile(r'from user code:\s*\n(?:.*\n)*?\s*File "([^"]+)", line (\d+), in (\S+)')
_CAUSED_BY = re.compile(r"Caused by: .*#\s*(\S+?):(\d+) in (\S+)")


def break_text(text: str) -> str:
    """What a user needs of a graph-break message, as one comparable line: torch's title
    *and* its explanation, the line that names ``print``, ``time.time`` or a
    data-dependent branch (the title alone is "Failed to trace builtin operator").
    Old-style one-line reasons pass through; ``generic_jump`` says what it means."""
    title = normalize_reason(text)
    if title.startswith("generic_jump"):
        return normalize_reason(f"Data-dependent branching ({title})")
    match = _EXPLANATION.search(str(text))
    if match is None:
        return title
    return normalize_reason(f"{title}: {match.group(1)}")


def _exception_location(text: str) -> str:
    """`` at file.py:LINE in fn`` from the user-code part of a fullgraph error."""
    match = _USER_CODE_FILE.search(text) or _CAUSED_BY.search(text)
    if match is None:
        return ""
    return f" at {match.group(1).rsplit('/', 1)[-1]}:{match.group(2)} in {match.group(3)}"


def _break_location(reason: object) -> str:
    """`` at file.py:LINE in fn`` for a GraphCompileReason: where the user must look.

    Messages such as ``generic_jump TensorVariable()`` (a data-dependent branch) name
    no place; the innermost user frame does, and it is the same on every rank.
    """
    stack = getattr(reason, "user_stack", None) or []
    if not stack:
        return ""
    frame = stack[-1]
    filename = str(getattr(frame, "filename", "")).rsplit("/", 1)[-1]
    return f" at {filename}:{getattr(frame, 'lineno', '?')} in {getattr(frame, 'name', '?')}"


def _frame_compile_id(compile_id: str) -> tuple[int, int] | None:
    """``(frame_id, frame_compile_id)`` of a Dynamo compile id, or None when it has no frame part."""
    match = _FRAME_COMPILE.match(_CA_PREFIX.sub("", str(compile_id).strip()))
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


@dataclass(kw_only=True, slots=True)
class CompileCounters:
    """What Dynamo compiled in one process over some interval (cumulative from install())."""

    graphs: int = 0
    """FX graphs the counting backend received from Dynamo (0 with compile on means skipped)."""

    compiles: int = 0
    """Dynamo frame compiles seen by the start callback (trigger DYNAMO only)."""

    recompiles: int = 0
    """Compiles whose compile id has ``frame_compile_id > 0`` (a cache miss on a compiled frame)."""

    graph_breaks: int = 0
    """Graph breaks: growth of ``torch._dynamo.utils.graph_break_reasons`` (sees data-dependent branches)."""

    break_reasons: list[str] = field(default_factory=list)
    """Normalized reason of each counted graph break, in order."""

    skip_reasons: list[str] = field(default_factory=list)
    """Normalized reasons of breaks that made Dynamo skip a whole frame (e.g. a break in a loop)."""

    recompile_reasons: list[str] = field(default_factory=list)
    """Normalized first failing guard of each recompile (compilation metrics, then guard_failures)."""

    graph_signatures: list[str] = field(default_factory=list)
    """Short hash of each graph's op sequence; rank-independent, unlike ``gm.code``."""

    graph_collectives: list[str] = field(default_factory=list)
    """Per graph, in order: the collectives it issues (``activity.collective_signature``,
    joined by ``"; "``), ``""`` for a graph that issues none."""

    notes: list[str] = field(default_factory=list)
    """Feature-detection fallbacks taken, each saying which weaker signal was used instead."""

    _INT_FIELDS = ("graphs", "compiles", "recompiles", "graph_breaks")
    _LIST_FIELDS = (
        "break_reasons", "skip_reasons", "recompile_reasons", "graph_signatures", "graph_collectives", "notes",
    )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (plain ints and lists of str)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self._INT_FIELDS}
        out.update({name: list(getattr(self, name)) for name in self._LIST_FIELDS})
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CompileCounters:
        """Inverse of :meth:`to_json`; missing keys take their defaults, unknown keys are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"compile counters: expected a mapping, got {type(d).__name__}")
        known = set(cls._INT_FIELDS) | set(cls._LIST_FIELDS)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"compile counters: unknown key(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name in cls._INT_FIELDS:
            if name in d:
                value = d[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"compile counters: {name} must be a non-negative int, got {value!r}")
                kwargs[name] = value
        for name in cls._LIST_FIELDS:
            if name in d:
                value = d[name]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"compile counters: {name} must be a list of str, got {value!r}")
                kwargs[name] = list(value)
        return cls(**kwargs)

    def delta(self, earlier: CompileCounters) -> CompileCounters:
        """What happened after ``earlier`` (an earlier snapshot of the same probe).

        Counts are subtracted and lists keep the tail added since ``earlier``. ``notes`` are
        kept whole: a fallback taken before ``earlier`` still qualifies the numbers after it.
        """
        for name in self._INT_FIELDS:
            if getattr(earlier, name) > getattr(self, name):
                raise ValueError(
                    f"delta: {name} went from {getattr(earlier, name)} to {getattr(self, name)}; "
                    "'earlier' is not an earlier snapshot of these counters"
                )
        kwargs: dict[str, Any] = {name: getattr(self, name) - getattr(earlier, name) for name in self._INT_FIELDS}
        for name in self._LIST_FIELDS:
            if name == "notes":
                kwargs[name] = list(self.notes)
            else:
                kwargs[name] = list(getattr(self, name)[len(getattr(earlier, name)) :])
        return CompileCounters(**kwargs)


# to_json/from_json/delta are driven by the two tables: they must name every field exactly.
assert {f.name for f in dataclasses.fields(CompileCounters)} == set(
    CompileCounters._INT_FIELDS + CompileCounters._LIST_FIELDS
)


# --------------------------------------------------------------------------------------------
# Judging counters (pure: usable on gathered counters without torch)
# --------------------------------------------------------------------------------------------


def local_gate_problems(c: CompileCounters, gates: GateConfig, *, compiled: bool) -> list[str]:
    """Problems of this rank's counters after warmup; [] when healthy.

    ``compiled`` says whether the region was meant to be compiled: only then is "no graph"
    a problem (a frame Dynamo skipped runs eagerly, silently, and passes every break gate).
    """
    problems: list[str] = []
    skip_reported = False
    if compiled and c.graphs == 0:
        why = "; ".join(c.skip_reasons) if c.skip_reasons else "no reason recorded"
        problems.append(f"nothing was compiled: Dynamo skipped the frame ({why})")
        skip_reported = True
    if c.graph_breaks > gates.max_graph_breaks:
        why = "; ".join(c.break_reasons) if c.break_reasons else "no reason recorded"
        problems.append(f"{c.graph_breaks} graph break(s) > max {gates.max_graph_breaks}: {why}")
    # A skipped frame is a graph break that graph_break_reasons never records.
    if c.skip_reasons and gates.max_graph_breaks == 0 and not skip_reported:
        problems.append(
            f"Dynamo skipped {len(c.skip_reasons)} frame(s) after a graph break (max graph breaks 0): "
            + "; ".join(c.skip_reasons)
        )
    return problems


def _ranks_text(ranks: list[int]) -> str:
    return ",".join(str(r) for r in ranks)


def _show(value: Any) -> str:
    text = repr(list(value)) if isinstance(value, tuple) else str(value)
    return text if len(text) <= 300 else text[:297] + "..."


def symmetry_problems(per_rank: list[CompileCounters], *, ranks: Sequence[int] | None = None) -> list[str]:
    """One message per counter field that differs across ranks; [] when symmetric.

    ``per_rank[i]`` is rank ``ranks[i]``'s counters (rank i's without ``ranks``). The ranks holding the most common value (ties go to
    the group with the lowest rank) are "the others"; every other group is named as odd.
    Op-sequence signatures are compared, never graph code, because rank constants differ.
    """
    if len(per_rank) < 2:
        return []
    by_rank = dict(zip(ranks if ranks is not None else range(len(per_rank)), per_rank))
    fields: list[tuple[str, Callable[[CompileCounters], Any], Callable[[CompileCounters], list[str]]]] = [
        ("graphs", lambda c: c.graphs, lambda c: c.skip_reasons),
        ("compiles", lambda c: c.compiles, lambda c: c.recompile_reasons),
        ("recompiles", lambda c: c.recompiles, lambda c: c.recompile_reasons),
        ("graph_breaks", lambda c: c.graph_breaks, lambda c: c.break_reasons),
        ("break_reasons", lambda c: tuple(sorted(c.break_reasons)), lambda c: []),
        ("graph_signatures", lambda c: tuple(c.graph_signatures), lambda c: []),
    ]
    problems: list[str] = []
    for name, get, reasons in fields:
        groups: dict[Any, list[int]] = {}
        for rank, counters in by_rank.items():
            groups.setdefault(get(counters), []).append(rank)
        if len(groups) == 1:
            continue
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
        (common_value, common_ranks), odd = ordered[0], ordered[1:]

        def describe(value: Any, ranks: list[int], *, common: bool) -> str:
            if common:
                # Always "ranks ... have": it names the other ranks as a group.
                text = f"ranks {_ranks_text(ranks)} have {_show(value)}"
            elif len(ranks) == 1:
                text = f"rank {ranks[0]} has {_show(value)}"
            else:
                text = f"ranks {_ranks_text(ranks)} have {_show(value)}"
            why = reasons(by_rank[ranks[0]])
            if why:
                text += f" (reason: {'; '.join(why)})"
            return text

        parts = [describe(value, ranks, common=False) for value, ranks in odd]
        parts.append(describe(common_value, common_ranks, common=True))
        problems.append(f"{name} differ: " + ", ".join(parts))
    return problems


def exception_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
