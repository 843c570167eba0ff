"""Compile health: what Dynamo really compiled in this process, and whether that is acceptable.

This module owns the *counting* of compilation (graphs, Dynamo compiles, recompiles, graph
breaks, frames Dynamo skipped) and the *local judgement* of those counts: the per-rank gates,
the cross-rank symmetry comparison and the recompile guard used after warmup. Gathering the
counters across ranks and turning problems into a :class:`~hardening.errors.CompileGateError`
belong to the worker.

Why not the obvious counters (see ``shared/research/anchors_compile.md``):

* ``counters["graph_break"]`` never sees data-dependent branches (``if t.sum() > 0:``), and
  neither it nor ``explain()`` sees a loop break that makes Dynamo skip the whole frame, where
  nothing is compiled at all. ``explain()`` is ``graph_count - 1`` and resets Dynamo.
* ``counters["frames"]`` stays empty under ``fullgraph=True``.

So graphs are counted by a wrapping backend, compiles and recompiles by a Dynamo start
callback (compile id ``frame/compile``, recompile iff ``compile > 0``), graph breaks by the
delta of ``torch._dynamo.utils.graph_break_reasons``, and skipped frames from new
``counters["unimplemented"]`` entries whose text says the frame was skipped.

Every private torch API is feature-detected (torch 2.6 to 2.15): a missing one never raises,
the probe falls back to a weaker signal and records what it did in ``CompileCounters.notes``.

Everything above :class:`CompileProbe` is pure Python so the runner can judge gathered
counters without importing torch; torch is imported lazily by the probe and the guard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hardening import activity

if TYPE_CHECKING:
    from hardening.profile import CompileConfig, GateConfig

INNER_BACKENDS = ("eager", "aot_eager", "inductor")
"""Backends the counting backend can wrap (the values CompileConfig.backend accepts)."""

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

    notes: list[str] = field(default_factory=list)
    """Feature-detection fallbacks taken, each saying which weaker signal was used instead."""

    _INT_FIELDS = ("graphs", "compiles", "recompiles", "graph_breaks")
    _LIST_FIELDS = ("break_reasons", "skip_reasons", "recompile_reasons", "graph_signatures", "notes")

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


def symmetry_problems(per_rank: list[CompileCounters]) -> list[str]:
    """One message per counter field that differs across ranks; [] when symmetric.

    ``per_rank[i]`` is rank i's counters. The ranks holding the most common value (ties go to
    the group with the lowest rank) are "the others"; every other group is named as odd.
    Op-sequence signatures are compared, never graph code, because rank constants differ.
    """
    if len(per_rank) < 2:
        return []
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
        for rank, counters in enumerate(per_rank):
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
            why = reasons(per_rank[ranks[0]])
            if why:
                text += f" (reason: {'; '.join(why)})"
            return text

        parts = [describe(value, ranks, common=False) for value, ranks in odd]
        parts.append(describe(common_value, common_ranks, common=True))
        problems.append(f"{name} differ: " + ", ".join(parts))
    return problems


# --------------------------------------------------------------------------------------------
# Counting (imports torch lazily)
# --------------------------------------------------------------------------------------------


def _exception_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def graph_break_from_exception(exc: BaseException) -> str | None:
    """The reason and the user's file:line when ``exc`` is (or was caused by) a graph break.

    ``fullgraph=True`` raises Dynamo's ``Unsupported`` on any graph break, including
    data-dependent branches and loop skips; ``.item()`` in a branch raises ``UserError``
    ("Could not guard on data-dependent expression") instead, a break all the same.
    Returns None for any other exception.
    """
    try:
        from torch._dynamo.exc import Unsupported, UserError
    except Exception:  # torch missing or reorganised: nothing here can be a Dynamo break
        return None
    for link in _exception_chain(exc):
        text = str(link)
        if isinstance(link, Unsupported):
            return break_text(text) + _exception_location(text)
        if isinstance(link, UserError) and "data-dependent" in text:
            return normalize_reason(f"Data-dependent guard: {normalize_reason(text)}") + _exception_location(text)
    return None


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    try:
        from torch.fx.node import _get_qualified_name

        return _get_qualified_name(target)
    except Exception:  # private helper, and not every callable has a qualified name
        pass
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    module = getattr(target, "__module__", None)
    if name:
        return f"{module}.{name}" if module else str(name)
    return _ADDRESS.sub("0x?", str(target))


def graph_signature(gm: Any) -> str:
    """Short hash of the op sequence of an FX graph module.

    Built from call targets, not ``gm.code``: Dynamo constant-folds ``dist.get_rank()`` and
    similar, so the code differs between ranks whose graphs do the same work.
    """
    ops = [
        f"{node.op}:{_target_name(node.target)}"
        for node in gm.graph.nodes
        if node.op in ("call_function", "call_method", "call_module")
    ]
    return hashlib.sha1("\n".join(ops).encode()).hexdigest()[:12]


def _split_skip_key(key: str) -> str | None:
    """Normalized skip reason of an ``unimplemented`` counter key, or None when no frame was skipped."""
    if not _SKIP_TEXT.search(key):
        return None
    segments = [s for s in key.split(_CHAINED_BREAK) if s.strip()]
    original = normalize_reason(segments[0]) if segments else normalize_reason(key)
    skip = next((normalize_reason(s) for s in segments if _SKIP_TEXT.search(s)), original)
    return skip if skip == original else f"{skip} (after: {original})"


class CompileProbe:
    """Counts what Dynamo compiles in this process from install() on.

    Process-global state is read as deltas against baselines snapshotted by :meth:`install`,
    so reasons recorded before install (an earlier region, another test) are never counted.
    ``torch._dynamo.reset()`` clears the registered callback: call it before install(), never
    after (a cleared callback is detected and noted).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._installed = False
        self._baselined = False
        self._use_callback = False
        self._callback: Callable[..., None] | None = None
        self._compile_ids: list[str] = []
        self._graph_sigs: list[str] = []
        self._notes: list[str] = []
        # Global lists are consumed incrementally (from the callback, the backend and
        # counters()) so a bounded or reset global loses as little as possible.
        self._break_reasons: list[str] = []
        self._gbr_seen = 0
        self._gbr_last: Any = None
        self._unimpl_base: dict[str, int] = {}
        self._metrics_seen: dict[int, Any] = {}
        self._metrics_new: list[Any] = []
        self._guard_seen: dict[Any, int] = {}
        # Lists handed out by counters() only ever grow, so CompileCounters.delta() can take
        # tails. Metrics and guard_failures report the same recompile at different times
        # (guard_failures before the compile, metrics after it): each reason seen from one
        # source waits here to absorb its twin from the other.
        self._recompile_reasons: list[str] = []
        self._unmatched: dict[str, dict[str, int]] = {"metrics": {}, "guards": {}}
        self._skip_reasons: list[str] = []
        self._graph_break_counter_base: int | None = None

    # ---- notes -----------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.append(text)

    # ---- install / remove -------------------------------------------------------------------

    def install(self) -> None:
        """Register the start callback and snapshot the baselines of every global we read."""
        if self._installed:
            raise ValueError("CompileProbe.install(): already installed; call remove() first")
        import torch._dynamo  # noqa: F401  (registers torch._dynamo.utils / callback_handler)

        # A second install() after remove() starts a fresh count against fresh baselines.
        self._reset_state()

        utils = torch._dynamo.utils
        gbr = getattr(utils, "graph_break_reasons", None)
        if isinstance(gbr, list):
            self._gbr_seen = len(gbr)
            self._gbr_last = gbr[-1] if gbr else None
        else:
            self._note(
                "graph_break_reasons unavailable: graph breaks counted from counters['graph_break'],"
                " which misses data-dependent branches"
            )
            self._graph_break_counter_base = self._graph_break_counter_total()
        counters = getattr(utils, "counters", None)
        if counters is not None:
            self._unimpl_base = dict(counters.get("unimplemented", {}))
        else:
            self._note("dynamo counters unavailable: frames skipped after a break are not detected")
        metrics = self._metrics_now()
        self._metrics_seen = {id(m): m for m in metrics}
        guard_failures = getattr(utils, "guard_failures", None)
        if guard_failures is not None:
            self._guard_seen = {code: len(reasons) for code, reasons in list(guard_failures.items())}
        # Registered last so a compile on another thread never syncs against missing baselines.
        handler = getattr(torch._dynamo, "callback_handler", None)
        register = getattr(handler, "register_start_callback", None)
        self._use_callback = register is not None
        if register is not None:
            self._callback = self._on_compile_start
            register(self._callback)
        else:
            self._note("start callback unavailable: compiles counted from compilation metrics")
        self._installed = True
        self._baselined = True

    def remove(self) -> None:
        """Unregister the start callback (idempotent); counts taken so far stay readable."""
        if self._callback is not None:
            import torch._dynamo

            remove = getattr(torch._dynamo.callback_handler, "remove_start_callback", None)
            if remove is not None:
                try:
                    remove(self._callback)
                except ValueError:
                    pass  # already cleared by torch._dynamo.reset()
        self._callback = None
        self._installed = False

    # ---- signals ----------------------------------------------------------------------------

    def _on_compile_start(self, *args: Any) -> None:
        # Older torch calls start callbacks with no argument; newer ones pass CallbackArgs.
        arg = args[0] if args else None
        trigger = getattr(arg, "callback_trigger", None)
        if trigger is not None and getattr(trigger, "name", str(trigger)) != "DYNAMO":
            return  # cudagraph recordings and lazy backward compiles are not Dynamo compiles
        compile_id = getattr(arg, "compile_id", None)
        if compile_id is None:
            try:
                from torch._guards import CompileContext

                compile_id = CompileContext.current_compile_id()
            except Exception:  # private API moved: the compile still counts, its id is unknown
                compile_id = None
        with self._lock:
            self._compile_ids.append(str(compile_id) if compile_id is not None else "?")
        self._sync()

    def _graph_break_counter_total(self) -> int:
        from torch._dynamo.utils import counters

        return sum(counters.get("graph_break", {}).values())

    def _metrics_now(self) -> list[Any]:
        try:
            from torch._dynamo.utils import get_compilation_metrics
        except Exception:
            self._note("compilation metrics unavailable: recompile reasons come from guard_failures only")
            return []
        try:
            return list(get_compilation_metrics())
        except Exception:
            self._note("compilation metrics unreadable: recompile reasons come from guard_failures only")
            return []

    def _sync(self) -> None:
        """Pull what is new in Dynamo's global lists into the probe's own lists."""
        if not self._baselined:
            return  # without baselines everything recorded before would count as new
        try:
            import torch._dynamo.utils as utils
        except Exception:
            return
        with self._lock:
            gbr = getattr(utils, "graph_break_reasons", None)
            if isinstance(gbr, list):
                still_prefix = len(gbr) >= self._gbr_seen and (
                    self._gbr_seen == 0 or gbr[self._gbr_seen - 1] is self._gbr_last
                )
                if not still_prefix:
                    self._note("graph_break_reasons was cleared after install() (torch._dynamo.reset()?): re-based")
                    self._gbr_seen = 0
                for reason in gbr[self._gbr_seen :]:
                    # One per site: a frame traced again (warmup's second call after a
                    # recompile, a resume function) records the same break once more.
                    site = break_text(getattr(reason, "reason", reason)) + _break_location(reason)
                    if site not in self._break_reasons:
                        self._break_reasons.append(site)
                self._gbr_seen = len(gbr)
                self._gbr_last = gbr[-1] if gbr else None
            guard_failures = getattr(utils, "guard_failures", None)
            if guard_failures is not None:
                for code, reasons in list(guard_failures.items()):
                    seen = self._guard_seen.get(code, 0)
                    if len(reasons) < seen:
                        seen = 0  # cleared by reset() and refilled
                    for reason in reasons[seen:]:
                        self._add_recompile_reason(normalize_reason(reason), source="guards")
                    self._guard_seen[code] = len(reasons)
            for metric in self._metrics_now():
                if id(metric) not in self._metrics_seen:
                    # Holding the object keeps its id() from being reused by a later entry.
                    self._metrics_seen[id(metric)] = metric
                    self._metrics_new.append(metric)
                    reason = getattr(metric, "recompile_reason", None)
                    if reason:
                        self._add_recompile_reason(normalize_reason(reason), source="metrics")
            dynamo_counters = getattr(utils, "counters", None)
            if dynamo_counters is not None:
                for key, count in list(dynamo_counters.get("unimplemented", {}).items()):
                    seen = self._unimpl_base.get(key, 0)
                    if count < seen:
                        seen = 0  # counters.clear() after install()
                    if count > seen:
                        skip = _split_skip_key(str(key))
                        if skip is not None:
                            self._skip_reasons.extend([skip] * (count - seen))
                    self._unimpl_base[key] = count

    def _add_recompile_reason(self, reason: str, *, source: str) -> None:
        other = self._unmatched["guards" if source == "metrics" else "metrics"]
        if other.get(reason, 0) > 0:
            other[reason] -= 1
            return
        mine = self._unmatched[source]
        mine[reason] = mine.get(reason, 0) + 1
        self._recompile_reasons.append(reason)

    # ---- backend ----------------------------------------------------------------------------

    def backend(self, inner: str, *, mode: str | None = None) -> Callable[..., Any]:
        """A torch.compile backend that records each Dynamo graph, then compiles it with ``inner``.

        ``mode`` is applied here because torch.compile refuses ``mode=`` with a callable
        backend; only inductor has modes.
        """
        if inner not in INNER_BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(INNER_BACKENDS)}, got {inner!r}")
        compile_fn = self._inner_compiler(inner, mode)

        def counting_backend(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
            signature = graph_signature(gm)
            with self._lock:
                self._graph_sigs.append(signature)
            self._sync()
            return activity.record_graph(gm, compile_fn(gm, example_inputs, **kwargs))

        counting_backend.__name__ = f"counting_{inner}"
        return counting_backend

    def _inner_compiler(self, inner: str, mode: str | None) -> Callable[..., Any]:
        import torch._dynamo

        if mode is None or mode == "default":
            return torch._dynamo.lookup_backend(inner)
        if inner != "inductor":
            self._note(f"mode {mode!r} ignored: only the inductor backend has modes (backend is {inner!r})")
            return torch._dynamo.lookup_backend(inner)
        try:
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx
        except Exception:
            self._note(f"inductor mode options unavailable: mode {mode!r} ignored")
            return torch._dynamo.lookup_backend(inner)
        try:
            options = dict(list_mode_options(mode))
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"mode: unknown inductor mode {mode!r} ({exc})") from None
        try:
            accepts_patches = "config_patches" in inspect.signature(compile_fx).parameters
        except (TypeError, ValueError):
            accepts_patches = False
        if not accepts_patches:
            self._note(f"compile_fx takes no config_patches: mode {mode!r} ignored")
            return torch._dynamo.lookup_backend(inner)

        def inductor_with_mode(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
            patches = {**options, **(kwargs.pop("config_patches", None) or {})}
            return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)

        return inductor_with_mode

    # ---- reading ----------------------------------------------------------------------------

    def counters(self) -> CompileCounters:
        """Cumulative counters since install()."""
        if not self._baselined:
            raise ValueError("CompileProbe.counters(): call install() first")
        self._sync()
        try:
            import torch._dynamo

            start_callbacks = getattr(torch._dynamo.callback_handler, "start_callbacks", None)
        except Exception:
            start_callbacks = None
        if self._installed and self._callback is not None and start_callbacks is not None:
            if self._callback not in start_callbacks:
                self._note(
                    "start callback was cleared after install() (torch._dynamo.reset()?):"
                    " later compiles are not counted"
                )

        with self._lock:
            metrics = list(self._metrics_new)
            if self._use_callback:
                compile_ids = list(self._compile_ids)
            else:
                # Fallback: every Dynamo frame compile logs one forward, non-runtime metrics entry.
                compile_ids = [
                    str(getattr(m, "compile_id", None) or "?")
                    for m in metrics
                    if getattr(m, "is_forward", True) is not False and not getattr(m, "is_runtime", False)
                ]
            recompiles = sum(1 for cid in compile_ids if (fc := _frame_compile_id(cid)) is not None and fc[1] > 0)

            if self._graph_break_counter_base is not None:
                graph_breaks = max(0, self._graph_break_counter_total() - self._graph_break_counter_base)
                break_reasons: list[str] = []
            else:
                graph_breaks = len(self._break_reasons)
                break_reasons = list(self._break_reasons)

            return CompileCounters(
                graphs=len(self._graph_sigs),
                compiles=len(compile_ids),
                recompiles=recompiles,
                graph_breaks=graph_breaks,
                break_reasons=break_reasons,
                skip_reasons=list(self._skip_reasons),
                recompile_reasons=list(self._recompile_reasons),
                graph_signatures=list(self._graph_sigs),
                notes=list(self._notes),
            )


def start_torch_trace(directory: str) -> str:
    """Write this process's structured compile trace (what ``TORCH_TRACE`` turns on; read
    it with ``tlparse``) into ``directory``. Returns the directory, or ``unavailable: why``:
    an artifact is best effort, never a gate.

    ``TORCH_TRACE`` is read once, when torch sets up its logging at import, which under the
    fork server happened in the server, without a directory: the trace handler is rebuilt
    here, in the rank, before anything compiles."""
    try:
        from torch._logging import _internal as logs

        if not all(hasattr(logs, name) for name in ("_init_logs", "LOG_TRACE_HANDLER", "TRACE_ENV_VAR")):
            return "unavailable: this torch has no structured trace logging to redirect"
        os.makedirs(directory, exist_ok=True)
        os.environ[logs.TRACE_ENV_VAR] = directory
        logs.LOG_TRACE_HANDLER = None  # built without a directory; _init_logs keeps an existing one
        logs._init_logs()
        return directory
    except Exception as exc:  # noqa: BLE001 - best effort, reported in the record
        return f"unavailable: {type(exc).__name__}: {exc}"


def compile_region(module_or_fn: Any, cfg: CompileConfig, probe: CompileProbe) -> Callable[..., Any]:
    """``torch.compile`` the region through the probe's counting backend, or return it as is.

    ``mode`` goes to the counting backend, not torch.compile, which refuses a mode together
    with a callable backend.
    """
    if not cfg.enabled:
        return module_or_fn
    import torch

    return torch.compile(
        module_or_fn,
        backend=probe.backend(cfg.backend, mode=cfg.mode),
        fullgraph=cfg.fullgraph,
        dynamic=cfg.dynamic,
    )


# --------------------------------------------------------------------------------------------
# Recompile guard
# --------------------------------------------------------------------------------------------

_GUARD_LINE = re.compile(r"^\s*-\s+(\S.*)$")


class RecompileGuard:
    """After warmup: any recompile on this rank raises at once, with the guard-failure text.

    Mechanisms, in order of preference (``.mechanism`` says which was used):

    * ``"config"``: ``torch._dynamo.config.patch(error_on_recompile=True)``. Fails only real
      recompiles and raises ``torch._dynamo.exc.RecompileError``. From torch 2.12 Dynamo's
      config is thread-local (ContextVar), so the guard must be entered **on the thread that
      calls the compiled region**; entered on another thread it silently guards nothing.
    * ``"stance"``: ``torch.compiler.set_stance("fail_on_recompile")`` when the config key is
      missing. Process-global (every thread), raises a plain ``RuntimeError`` ("Detected
      recompile ..."), and also fails a *first* compile, so enter it only after warmup.
      Its message carries the guard failures only from torch 2.10.
    * ``"none"``: neither exists; nothing is guarded (the recompile count still gates).

    ``mechanism="config"`` or ``"stance"`` forces one (ValueError if this torch lacks it).
    """

    _MECHANISMS = ("auto", "config", "stance")

    def __init__(self, *, mechanism: str = "auto") -> None:
        if mechanism not in self._MECHANISMS:
            raise ValueError(f"mechanism: must be one of {', '.join(self._MECHANISMS)}, got {mechanism!r}")
        self._wanted = mechanism
        self._cm: Any = None
        self.mechanism: str = "none"
        """Which mechanism guards the block: config, stance or none (set on __enter__)."""

    @staticmethod
    def _has_config_key() -> bool:
        try:
            import torch._dynamo

            return hasattr(torch._dynamo.config, "error_on_recompile")
        except Exception:
            return False

    @staticmethod
    def _has_stance() -> bool:
        try:
            import torch.compiler

            return callable(getattr(torch.compiler, "set_stance", None))
        except Exception:
            return False

    def __enter__(self) -> RecompileGuard:
        if self._cm is not None:
            raise ValueError("RecompileGuard is not re-entrant")
        use_config = self._wanted == "config" or (self._wanted == "auto" and self._has_config_key())
        use_stance = not use_config and self._wanted in ("auto", "stance") and self._has_stance()
        if self._wanted == "config" and not self._has_config_key():
            raise ValueError("mechanism: torch._dynamo.config has no error_on_recompile in this torch")
        if self._wanted == "stance" and not use_stance:
            raise ValueError("mechanism: torch.compiler.set_stance is not available in this torch")
        if use_config:
            import torch._dynamo

            cm = torch._dynamo.config.patch(error_on_recompile=True)
            self.mechanism = "config"
        elif use_stance:
            import torch.compiler

            cm = torch.compiler.set_stance("fail_on_recompile")
            self.mechanism = "stance"
        else:
            self.mechanism = "none"
            return self
        cm.__enter__()
        self._cm = cm
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(*exc_info)
        return False

    @staticmethod
    def reason(exc: BaseException) -> str | None:
        """The guard failures of a recompile error from either mechanism, else None.

        Returns the normalized ``0/0: tensor 'x' stride mismatch ...`` lines joined by "; ";
        when the message lists none (stance errors before torch 2.10), its first line.
        """
        try:
            from torch._dynamo.exc import RecompileError
        except Exception:  # name moved: only the text test remains
            RecompileError = ()  # type: ignore[assignment]  # noqa: N806
        for link in _exception_chain(exc):
            text = str(link)
            if isinstance(link, RecompileError) or (isinstance(link, RuntimeError) and "Detected recompile" in text):
                lines = [m.group(1) for line in text.splitlines() if (m := _GUARD_LINE.match(line))]
                if lines:
                    return "; ".join(normalize_reason(line) for line in lines)
                return normalize_reason(text)
        return None

    @staticmethod
    def count_stopped(steady: CompileCounters, reason: str) -> CompileCounters:
        """``steady`` with the recompile this guard stopped counted: the guard raises
        before Dynamo's start callback fires, so the probe never counts it itself."""
        if steady.recompiles:
            return steady
        return dataclasses.replace(steady, recompiles=1, recompile_reasons=steady.recompile_reasons or [reason])
