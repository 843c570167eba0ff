"""Compile baselines: what a region compiles to on each rank, kept as a plain-text file,
and the checker that compares a run against it.

A baseline holds, per region × profile × rank: the number of graphs, each distinct graph
break site (its normalized reason and ``file:line``), the recompiles after warmup, and
the collectives of each graph. The file is one entry a line, sorted, with no timestamps,
so that an unchanged region rewrites it byte for byte and two branches merge line by line::

    break_region.py:build cpu rank0 graphs 2
    break_region.py:build cpu rank0 break Tensor.item(): ... at break_region.py:29 in forward
    break_region.py:build cpu rank0 graph-001 all_reduce(sum) of float32 (8, 64) on group '0' at break_region.py:30

:func:`compare` is a pure function of the baseline and the run's per-rank counters, as
PyTorch's CI compares its expected CSVs: a new break, more graphs, more recompiles or
different collectives is a regression; fewer is an improvement that asks for a ratchet;
a break or collective that only moved to another line is neither (the file is stale).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardening.runtime.activity import without_location

HEADER = "# hardening compile baseline: one entry a line, sorted; regenerate with `hardening baseline update`"

_COUNTS = ("graphs", "recompiles")
_GRAPH_KEY = re.compile(r"^graph-(\d{3,})$")
_RANK = re.compile(r"^rank(\d+)$")
_AT_LINE = re.compile(r" at (\S+?):(\d+)( in \S+)?$")


@dataclass(frozen=True, order=True, slots=True)
class Entry:
    """One line of a baseline file."""

    region: str
    """The region's name: ``file.py:function`` (file name only) or ``module:function``."""
    profile: str
    rank: int
    key: str
    """``graphs``, ``recompiles``, ``break`` or ``graph-NNN`` (the collectives of graph NNN)."""
    value: str

    def line(self) -> str:
        return f"{self.region} {self.profile} rank{self.rank} {self.key} {self.value}".rstrip()


@dataclass(kw_only=True, slots=True)
class RankCompile:
    """What one rank compiled, as a baseline records it."""

    graphs: int = 0
    recompiles: int = 0
    breaks: list[str] = field(default_factory=list)
    """Distinct break sites, ``reason at file.py:LINE in fn``."""
    collectives: list[str] = field(default_factory=list)
    """Per graph: its collectives joined by ``"; "`` (``""`` for none)."""

    @classmethod
    def from_counters(cls, counters: dict[str, Any]) -> RankCompile:
        """From a rank's final-record counters (``session.summary``)."""
        total = counters.get("total") or {}
        return cls(
            graphs=int(counters.get("graphs", 0)),
            recompiles=int(counters.get("recompiles", 0)),
            breaks=sorted(set(counters.get("break_reasons") or [])),
            collectives=list(total.get("graph_collectives") or []),
        )

    def entries(self, region: str, profile: str, rank: int) -> list[Entry]:
        out = [Entry(region, profile, rank, "graphs", str(self.graphs))]
        out.append(Entry(region, profile, rank, "recompiles", str(self.recompiles)))
        out += [Entry(region, profile, rank, "break", b) for b in self.breaks]
        out += [Entry(region, profile, rank, f"graph-{i:03d}", c) for i, c in enumerate(self.collectives, 1)]
        return out


def region_name(target: str) -> str:
    """How a baseline names a region: the file's name for ``path/to/file.py:fn`` (a checkout
    may live anywhere), the target itself for ``package.module:fn``."""
    path, sep, fn = target.rpartition(":")
    if path.endswith(".py"):
        path = os.path.basename(path)
    return field_name(f"{path}{sep}{fn}")


def field_name(text: str) -> str:
    """``text`` as one space-free field of a line (region and profile names)."""
    return re.sub(r"\s", "_", text)


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


class BaselineError(ValueError):
    """A baseline file that cannot be read, named with its line."""


def parse(text: str, *, source: str = "<baseline>") -> list[Entry]:
    """Entries of a baseline file; blank lines and ``#`` comments are ignored."""
    entries = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(" ", 4)
        if len(parts) < 4:
            raise BaselineError(f"{source}:{n}: expected 'REGION PROFILE rankN KEY VALUE', got {raw!r}")
        region, profile, rank_text, key = parts[:4]
        value = parts[4] if len(parts) == 5 else ""
        rank = _RANK.match(rank_text)
        if rank is None:
            raise BaselineError(f"{source}:{n}: third field must be rankN (rank0, rank1, ...), got {rank_text!r}")
        if key in _COUNTS:
            if not value.isdigit():
                raise BaselineError(f"{source}:{n}: {key} must be a non-negative integer, got {value!r}")
        elif key == "break":
            if not value:
                raise BaselineError(f"{source}:{n}: a break entry needs its site")
        elif not _GRAPH_KEY.match(key):
            raise BaselineError(f"{source}:{n}: unknown key {key!r} (graphs, recompiles, break, graph-NNN)")
        entries.append(Entry(region, profile, int(rank.group(1)), key, value))
    return entries


def load(path: str | Path) -> list[Entry]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise BaselineError(f"{path}: file not found (create it with `hardening baseline update --out {path}`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, source=str(path))


_TORCH_LINE = "# recorded with torch "


def render(entries: Iterable[Entry], *, torch_version: str | None = None) -> str:
    """The file's text. ``torch_version``: named in the header, since break texts change
    between torch versions (a gate on another one says so)."""
    header = [HEADER] + ([_TORCH_LINE + torch_version] if torch_version else [])
    return "\n".join([*header, *sorted({e.line() for e in entries})]) + "\n"


def recorded_torch(path: str | Path) -> str | None:
    """The torch version a baseline file says it was recorded with, if it says."""
    try:
        for line in Path(path).read_text().splitlines()[:5]:
            if line.startswith(_TORCH_LINE):
                return line[len(_TORCH_LINE) :].strip()
    except (OSError, UnicodeDecodeError):
        pass
    return None


def write(path: str | Path, entries: Iterable[Entry], *, torch_version: str | None = None) -> None:
    """Atomically: a reader (or a Ctrl-C) never sees half a file. The mode is what a
    plain ``open`` would give (mkstemp's 0600 would make a committed file owner-only)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".baseline-", dir=target.parent or ".")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            fh.write(render(entries, torch_version=torch_version))
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def merged(existing: list[Entry], region: str, profile: str, new: list[Entry]) -> list[Entry]:
    """``existing`` with every entry of (region, profile) replaced by ``new``."""
    return [e for e in existing if (e.region, e.profile) != (region, profile)] + new


def regions(entries: Iterable[Entry]) -> dict[tuple[str, str], dict[int, RankCompile]]:
    """Entries grouped by (region, profile), then rank."""
    out: dict[tuple[str, str], dict[int, RankCompile]] = {}
    for e in sorted(entries):
        rank = out.setdefault((e.region, e.profile), {}).setdefault(e.rank, RankCompile())
        if e.key == "graphs":
            rank.graphs = int(e.value)
        elif e.key == "recompiles":
            rank.recompiles = int(e.value)
        elif e.key == "break":
            rank.breaks.append(e.value)
        else:
            index = int(_GRAPH_KEY.match(e.key).group(1))  # type: ignore[union-attr]  # parse() checked it
            rank.collectives += [""] * (index - len(rank.collectives))
            rank.collectives[index - 1] = e.value
    return out


def select(entries: list[Entry], region: str, profile: str, *, source: str) -> tuple[str, dict[int, RankCompile]]:
    """The baseline of (region, profile) in a file, and the region name it is filed under.

    A file that holds exactly one region for this profile is that region's baseline even
    under another name (a region copied to a new file keeps its baseline); otherwise a
    missing region is an error that lists what the file holds."""
    grouped = regions(entries)
    if (region, profile) in grouped:
        return region, grouped[(region, profile)]
    same_profile = sorted(r for r, p in grouped if p == profile)
    if len(same_profile) == 1:
        return same_profile[0], grouped[(same_profile[0], profile)]
    held = ", ".join(f"{r} ({p})" for r, p in sorted(grouped)) or "nothing"
    raise BaselineError(f"{source}: no entries for region {region} under profile {profile}; it holds {held}")


def renamed(per_rank: dict[int, RankCompile], old: str, new: str) -> dict[int, RankCompile]:
    """A baseline filed under region ``old`` read for region ``new``: sites in ``old``'s
    file (``at break_region.py:37``) are read as sites in ``new``'s file."""
    old_file, new_file = old.rpartition(":")[0], new.rpartition(":")[0]
    if not (old_file.endswith(".py") and new_file.endswith(".py")) or old_file == new_file:
        return per_rank

    def move(text: str) -> str:
        return text.replace(f" at {old_file}:", f" at {new_file}:")

    return {
        rank: RankCompile(
            graphs=rc.graphs, recompiles=rc.recompiles, breaks=sorted(move(b) for b in rc.breaks),
            collectives=["; ".join(move(c) for c in g.split("; ")) if g else g for g in rc.collectives],
        )  # fmt: skip
        for rank, rc in per_rank.items()
    }


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class Comparison:
    """A run against its baseline. ``regressions`` fail the gate; ``improvements`` fail
    it only under ``--fail-on-improvement``; ``moved`` never fails (the file is stale)."""

    regressions: list[str] = field(default_factory=list)
    improvements: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)

    @property
    def unchanged(self) -> bool:
        return not (self.regressions or self.improvements or self.moved)


def _site_without_line(site: str) -> str:
    """A break site with its line number masked: the same break after an edit above it."""
    return _AT_LINE.sub(lambda m: f" at {m.group(1)}:?{m.group(3) or ''}", site)


def _pair_moved(new: list[str], gone: list[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Split new/gone sites into really new, really gone, and (old, new) pairs that only moved."""
    moved, still_new = [], []
    gone = list(gone)
    for site in new:
        twin = next((g for g in gone if _site_without_line(g) == _site_without_line(site)), None)
        if twin is None:
            still_new.append(site)
        else:
            gone.remove(twin)
            moved.append((twin, site))
    return still_new, gone, moved


def _collective_list(per_graph: list[str]) -> list[str]:
    return [c for graph in per_graph for c in graph.split("; ") if c]


def compare(baseline: dict[int, RankCompile], run: dict[int, RankCompile]) -> Comparison:
    """The run's ranks against the baseline's, rank by rank (a pure function)."""
    out = Comparison()
    if sorted(baseline) != sorted(run):
        out.regressions.append(
            f"the baseline has ranks {','.join(map(str, sorted(baseline)))}, this run {','.join(map(str, sorted(run)))}:"
            " record it for this world size"
        )
        return out
    for rank in sorted(run):
        was, now = baseline[rank], run[rank]
        new, gone, moved = _pair_moved(
            [b for b in now.breaks if b not in was.breaks], [b for b in was.breaks if b not in now.breaks]
        )
        out.regressions += [f"rank {rank}: new graph break: {site}" for site in new]
        out.improvements += [f"rank {rank}: graph break gone: {site}" for site in gone]
        out.moved += [f"rank {rank}: graph break moved: {old} -> {site}" for old, site in moved]
        for name, before, after in (("graphs", was.graphs, now.graphs), ("recompiles after warmup", was.recompiles, now.recompiles)):
            if after > before:
                out.regressions.append(f"rank {rank}: {after} {name}, baseline {before}")
            elif after < before:
                out.improvements.append(f"rank {rank}: {after} {name}, baseline {before}")
        # Collectives are compared as one sequence: removing a break merges two graphs
        # without changing what the rank communicates.
        before_c, after_c = _collective_list(was.collectives), _collective_list(now.collectives)
        if [without_location(c) for c in before_c] != [without_location(c) for c in after_c]:
            out.regressions.append(
                f"rank {rank}: collectives changed: baseline [{'; '.join(before_c) or 'none'}], now [{'; '.join(after_c) or 'none'}]"
            )
        elif before_c != after_c or (was.collectives != now.collectives and not gone):
            out.moved.append(f"rank {rank}: collectives regrouped or moved: [{'; '.join(after_c) or 'none'}]")
    return out


# --------------------------------------------------------------------------------------------
# The gate: the checker applied to a run's control case
# --------------------------------------------------------------------------------------------

CONTROL_CASE = "C-00"
"""The unfaulted compile case: what a baseline records and what a gate judges."""


class Gate:
    """``--baseline FILE`` for one run: :meth:`check` judges the control case's per-rank
    counters against the file as the case ends (the runner calls it before it keeps or
    drops the case's artifacts, so a regression keeps its dumps); :attr:`report` and
    :meth:`summary` say what it found."""

    def __init__(
        self, path: str, region: str, filed_as: str, expected: dict[int, RankCompile], ratchet: str, *,
        fail_on_improvement: bool,
    ) -> None:  # fmt: skip
        self.path, self.region, self.filed_as, self.expected = path, region, filed_as, expected
        self.ratchet, self.fail_on_improvement = ratchet, fail_on_improvement
        self.comparison: Comparison | None = None
        self.unchecked = f"{CONTROL_CASE} was not run"
        self.report: dict[str, Any] | None = None
        """For the JSON report (``SuiteResult.baseline``): file, regressions, improvements, stale, ratchet."""

    def check(self, case: Any) -> None:
        """Judge ``case`` (a ``CaseResult``) if it is the control: a regression (or, under
        ``fail_on_improvement``, an improvement) makes it fail, naming the first."""
        from hardening.harness.results import Verdict

        if case.id != CONTROL_CASE:
            return
        run = {r.rank: RankCompile.from_counters(r.counters) for r in case.ranks if r.counters}
        if sorted(run) != sorted(self.expected):
            self.unchecked = f"{CONTROL_CASE} ended before every rank counted"
            return
        self.comparison = c = compare(self.expected, run)
        completed = case.verdict is Verdict.PASS
        if not completed:
            # A control the runtime's gate stopped: its counters still name what is new,
            # but fewer of anything proves nothing about a run cut short.
            c.improvements, c.moved = [], []
        failing = c.regressions + (c.improvements if self.fail_on_improvement else [])
        if failing:
            case.verdict = Verdict.FAIL
            more = f" (+{len(failing) - 1} more)" if len(failing) > 1 else ""
            case.reason = f"baseline {self.path}: {failing[0]}{more}" + ("" if completed else f"; {case.reason}")
        self.report = {
            "file": self.path, "region": self.region, "filed_as": self.filed_as, "regressions": c.regressions,
            "improvements": c.improvements, "moved": c.moved, "ratchet": self.ratchet,
        }  # fmt: skip

    def summary(self) -> str:
        """What the comparison found, for after the table; "" when nothing changed."""
        c = self.comparison
        lines = []
        if self.filed_as != self.region:
            lines.append(f"baseline {self.path}: region {self.region} compared with {self.filed_as}, the only region it holds")
        if c is None:
            lines.append(f"baseline {self.path}: not checked: {self.unchecked}")
            return "\n".join(lines)
        lines += [f"baseline {self.path}: REGRESSION {line}" for line in c.regressions]
        lines += [f"baseline {self.path}: improved: {line}" for line in c.improvements]
        lines += [f"baseline {self.path}: stale: {line}" for line in c.moved]
        if c.improvements or c.moved:
            lines.append(f"ratchet the baseline: {self.ratchet}")
        return "\n".join(lines)
