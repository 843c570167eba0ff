"""The compile probe: counts what Dynamo really compiles in this process.

Graphs, Dynamo compiles, recompiles, graph breaks and frames Dynamo skipped, as deltas
from :meth:`CompileProbe.install`. Why not the obvious counters (see
``shared/research/anchors_compile.md``):


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
torch is imported lazily.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

from hardening.runtime.activity import graph_collective_signatures
from hardening.runtime.compile.counters import (
    _ADDRESS,
    _CHAINED_BREAK,
    _SKIP_TEXT,
    CompileCounters,
    _break_location,
    _exception_location,
    _frame_compile_id,
    break_text,
    exception_chain,
    normalize_reason,
)

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
    for link in exception_chain(exc):
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
        self.keep_graphs = False
        """Hold every graph the backend hands over in :attr:`graphs` (for a debug dump)."""
        self._reset_state()

    def _reset_state(self) -> None:
        self._installed = False
        self._baselined = False
        self._use_callback = False
        self._callback: Callable[..., None] | None = None
        self._compile_ids: list[str] = []
        self._graph_sigs: list[str] = []
        self._graph_collectives: list[str] = []
        self.graphs: list[Any] = []
        """The FX graph modules the counting backend received, in order, when
        :attr:`keep_graphs` (a debug dump wants them; otherwise none is held)."""
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

    def note(self, text: str) -> None:
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
            self.note(
                "graph_break_reasons unavailable: graph breaks counted from counters['graph_break'],"
                " which misses data-dependent branches"
            )
            self._graph_break_counter_base = self._graph_break_counter_total()
        counters = getattr(utils, "counters", None)
        if counters is not None:
            self._unimpl_base = dict(counters.get("unimplemented", {}))
        else:
            self.note("dynamo counters unavailable: frames skipped after a break are not detected")
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
            self.note("start callback unavailable: compiles counted from compilation metrics")
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
            self.note("compilation metrics unavailable: recompile reasons come from guard_failures only")
            return []
        try:
            return list(get_compilation_metrics())
        except Exception:
            self.note("compilation metrics unreadable: recompile reasons come from guard_failures only")
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
                    self.note("graph_break_reasons was cleared after install() (torch._dynamo.reset()?): re-based")
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

    # ---- graphs (from the counting backend) -------------------------------------------------

    def note_graph(self, gm: Any) -> None:
        """A graph Dynamo produced: its op signature, then the counters it changed."""
        signature = graph_signature(gm)
        collectives = "; ".join(graph_collective_signatures(gm))
        with self._lock:
            self._graph_sigs.append(signature)
            self._graph_collectives.append(collectives)
            if self.keep_graphs:
                self.graphs.append(gm)
        self._sync()

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
                self.note(
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
                graph_collectives=list(self._graph_collectives),
                notes=list(self._notes),
            )

