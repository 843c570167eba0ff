"""What a rank's main thread is doing right now, read from its Python frames.

The watchdog samples this every heartbeat and publishes the kind in the heartbeat, so
that every rank knows whether its peers are making progress:

- ``collective``: blocked in a collective (a ``torch.distributed`` call, a functional
  collective's ``wait_tensor``, or one inside a compiled graph, read from the graph's
  generated code). :class:`Activity` names the op, its group and shape, and the user's
  line that issued it (from the FX node's stack trace: the compiled frame itself only
  shows the ``def`` line).
- ``side``: waiting on the side channel or the store (the runtime's own exchanges).
- ``compiling``: inside Dynamo, AOT or Inductor: slow, but progressing.
- ``running``: anything else.

Reading frames needs no cooperation from the main thread and works while it sits in C
with the GIL released, which is exactly when it is stuck.

A rank that is *not* blocked also matters in a hang: which collective it issued last in
the current call (or that it issued none, the classic rank-conditional collective).
:data:`ISSUED` is that record: every compiled graph that contains collectives notes them
when it finishes (:func:`record_graph`), and the watchdog adds the collectives it sampled,
which covers eager code the record cannot see.
"""

from __future__ import annotations

import linecache
import os
import re
from dataclasses import dataclass
from types import FrameType
from collections.abc import Callable
from typing import Any

COLLECTIVE, SIDE, COMPILING, RUNNING = "collective", "side", "compiling", "running"

_C10D_FUNCTIONS = frozenset(
    {
        "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
        "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "reduce", "gather",
        "scatter", "send", "recv", "wait", "wait_tensor", "monitored_barrier", "broadcast_object_list",
    }
)  # fmt: skip
_OP_IN_LINE = re.compile(r"(?:_c10d_functional|c10d_functional|_dtensor|c10d)\.(\w+)")
_ASSIGNED = re.compile(r"^\s*(\w+)\s*=")
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
_COMPILER_FILES = (
    "torch/_dynamo/convert_frame.py", "torch/_dynamo/symbolic_convert.py", "torch/_dynamo/output_graph.py",
    "torch/_functorch/aot_autograd.py", "torch/_inductor/compile_fx.py", "torch/_inductor/graph.py",
)  # fmt: skip
_HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True, slots=True)
class Activity:
    kind: str
    op: str = ""
    """The collective (``all_reduce``, ``wait_tensor (all_reduce)``), when ``kind`` is collective."""
    detail: str = ""
    """Its group and shape, when known: ``group '0', shape (4, 64)``."""
    where: str = ""
    """The user's line that issued it (``cond.py:18 in forward``), or the innermost user frame."""

    def describe(self) -> str:
        if self.kind == SIDE:
            return f"waiting for its peers at {self.op or 'a side-channel step'}"
        if self.kind != COLLECTIVE:
            return self.kind + (f" at {self.where}" if self.where else "")
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.op}{detail} at {self.where or '?'}"


class IssuedRecord:
    """The collectives this process issued in its current call, newest last.

    One per process (a rank is a process; a compiled graph outlives any object that
    could own it). The main thread writes, the watchdog reads: each write replaces one
    reference, so a reader sees either the old or the new value, never a torn one."""

    def __init__(self) -> None:
        self.call_id: int | None = None
        self.last: Activity | None = None
        self.compiled = False
        """Compiled graphs report here: that they issued none is then a finding."""

    def new_call(self, call_id: int) -> None:
        self.call_id, self.last = call_id, None

    def note(self, act: Activity) -> None:
        self.last = act

    def describe(self) -> str:
        """``last issued all_reduce (...) at f.py:9 in call 3``, or ``""`` when unknown
        (an eager region whose collectives were too quick to be sampled)."""
        if self.call_id is None:
            return ""
        if self.last is not None:
            return f"last issued {self.last.describe()} in call {self.call_id}"
        return f"its compiled graphs issued no collective in call {self.call_id}" if self.compiled else ""


ISSUED = IssuedRecord()


def graph_collectives(gm: Any) -> list[Activity]:
    """The collectives an FX graph issues, in order, each with its user line."""
    found = []
    for node in getattr(getattr(gm, "graph", None), "nodes", ()):
        if node.op != "call_function":
            continue
        op = _OP_IN_LINE.search(str(node.target))
        if op is None or op.group(1) in ("wait_tensor", "wait"):
            continue
        where = _user_line(node.meta.get("stack_trace") or "")
        found.append(Activity(COLLECTIVE, op=op.group(1), detail=_node_detail(node), where=where))
    return found


def collective_signature(node: Any) -> str:
    """One line for a collective node of an FX graph, the same on every rank that issues
    the same collective: ``all_reduce(sum) of float32 (8, 64) on group '0' at tp.py:31``.
    Everything before `` at `` is what ranks must agree on; the line only says where."""
    op = _OP_IN_LINE.search(str(node.target))
    name = op.group(1) if op is not None else _op_name(node.target)
    rest = node.args[1:] if node.args else ()
    # Functional collectives take the group's name last; a reduce op (all_reduce,
    # reduce_scatter_tensor) is the string before it; ints are a src or a group size.
    strings = [a for a in rest if isinstance(a, str)]
    params = strings[:-1] + [str(a) for a in rest if isinstance(a, int) and not isinstance(a, bool)]
    group = collective_group(node)
    value = node.meta.get("example_value", node.meta.get("val"))
    shape = getattr(value, "shape", None)
    dtype = str(getattr(value, "dtype", "?")).removeprefix("torch.")
    dims = "?" if shape is None else "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    text = f"{name}({', '.join(params)}) of {dtype} {dims}" + (f" on group {group!r}" if group else "")
    where = _user_line(node.meta.get("stack_trace") or "")
    return text + (f" at {where}" if where else "")


def collective_group(node: Any) -> str:
    """The name of the process group a functional-collective node runs on ("" if none)."""
    strings = [a for a in (node.args[1:] if node.args else ()) if isinstance(a, str)]
    return strings[-1] if strings else ""


def graph_collective_nodes(gm: Any) -> list[Any]:
    """The collective nodes of an FX graph (waits excluded), in order."""
    return [
        node
        for node in getattr(getattr(gm, "graph", None), "nodes", ())
        if node.op == "call_function"
        and (op := _OP_IN_LINE.search(str(node.target))) is not None
        and op.group(1) not in ("wait_tensor", "wait")
    ]


def graph_collective_signatures(gm: Any) -> list[str]:
    """:func:`collective_signature` of every collective an FX graph issues, in order."""
    return [collective_signature(node) for node in graph_collective_nodes(gm)]


def without_location(signature: str) -> str:
    """The part of a collective signature ranks must agree on (its line may differ)."""
    return signature.rsplit(" at ", 1)[0]


def record_graph(gm: Any, compiled: Any, record: IssuedRecord = ISSUED) -> Any:
    """``compiled`` (a backend's output for ``gm``) noting its collectives in ``record``
    each time it returns. Graphs without collectives are returned as they are: the
    record costs nothing where there is nothing to record, and a rank whose graphs
    issued nothing is said to have issued nothing."""
    record.compiled = True
    issued = graph_collectives(gm)
    if not issued:
        return compiled
    last = issued[-1]
    return around_each_run(compiled, after=lambda: record.note(last))


def around_each_run(
    compiled: Any, *, before: Callable[[], Any] | None = None, after: Callable[[], Any] | None = None
) -> Any:
    """``compiled`` (a backend's output) calling ``before()`` and ``after()`` around each
    run. Arguments pass through as they come and ``_boxed_call`` is copied: AOT's
    convention (one list, consumed) and the plain one both reach ``compiled`` untouched,
    whichever its caller uses (torch 2.13 calls some boxed AOT outputs with ``*args``)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
        out = compiled(*args, **kwargs)
        if after is not None:
            after()
        return out

    if hasattr(compiled, "_boxed_call"):
        run._boxed_call = compiled._boxed_call  # type: ignore[attr-defined]
    return run


def sample(frame: FrameType | None) -> Activity:
    """The activity of the thread whose innermost frame is ``frame``.

    Only the innermost stretch of library frames decides ``collective`` and ``side``:
    the first frame of user or runtime code ends it. A leader making inputs in user code
    called from the warmup loop is ``running``, not waiting on the side channel."""
    frames = []
    while frame is not None and len(frames) < 64:
        frames.append(frame)
        frame = frame.f_back
    for f in frames:
        name, filename = f.f_code.co_name, f.f_code.co_filename
        if _generated(filename):
            op = _OP_IN_LINE.search(linecache.getline(filename, f.f_lineno))
            if op is not None:
                return _from_graph(f, op.group(1), linecache.getline(filename, f.f_lineno), frames)
            continue
        if _is_torch_distributed(filename) and name in _C10D_FUNCTIONS:
            return Activity(COLLECTIVE, op=name, detail=_tensor_detail(f.f_locals), where=_user_frame(frames))
        if _is_library(filename):
            continue
        if filename.startswith(_HERE) and os.path.basename(filename) in ("sidechannel.py", "collectives.py"):
            tag = f.f_locals.get("tag")
            return Activity(SIDE, op=f"side-channel step {tag!r}" if isinstance(tag, str) else "", where=_user_frame(frames))
        break
    if any(f.f_code.co_filename.replace(os.sep, "/").endswith(_COMPILER_FILES) for f in frames):
        return Activity(COMPILING)
    return Activity(RUNNING, where=_user_frame(frames))


def _is_library(filename: str) -> bool:
    path = filename.replace(os.sep, "/")
    return filename.startswith("<") or "/site-packages/" in path or "/lib/python" in path


def _generated(filename: str) -> bool:
    """FX graph code (``<eval_with_key>.N``) or an Inductor output module."""
    return filename.startswith("<eval_with_key>") or "torchinductor" in filename


def _from_graph(frame: FrameType, op: str, line: str, frames: list[FrameType]) -> Activity:
    gm = frame.f_locals.get("self")
    node = _node(gm, line)
    issued_by = op
    detail = ""
    if node is not None:
        source = node.args[0] if op == "wait_tensor" and node.args and hasattr(node.args[0], "target") else node
        issued_by = _op_name(source.target) if source is not node else op
        detail = _node_detail(source)
        where = _user_line(node.meta.get("stack_trace") or "") or _user_frame(frames)
    else:
        where = _user_frame(frames)
    label = f"{op} ({issued_by})" if issued_by != op else op
    return Activity(COLLECTIVE, op=label, detail=detail, where=where)


def _node(gm: Any, line: str) -> Any:
    """The FX node a generated line computes: the line assigns to the node's name."""
    m = _ASSIGNED.match(line)
    graph = getattr(gm, "graph", None)
    if m is None or graph is None:
        return None
    return next((n for n in graph.nodes if n.name == m.group(1)), None)


def _op_name(target: Any) -> str:
    text = str(getattr(target, "__name__", target))
    return text.rsplit(".", 1)[-1].split(".default")[0]


def _node_detail(node: Any) -> str:
    parts = []
    group = next((a for a in node.args[1:] if isinstance(a, str) and a.isdigit()), None) if node.args else None
    if group is not None:
        parts.append(f"group {group!r}")
    value = node.meta.get("example_value", node.meta.get("val"))
    shape = getattr(value, "shape", None)
    if shape is not None:
        parts.append(f"shape {tuple(int(s) if str(s).isdigit() else str(s) for s in shape)}")
    return ", ".join(parts)


def _tensor_detail(local_vars: dict[str, Any]) -> str:
    for key in ("tensor", "input", "self", "output"):
        value = local_vars.get(key)
        shape = getattr(value, "shape", None)
        if shape is not None:
            return f"shape {tuple(shape)}"
    return ""


def _is_torch_distributed(filename: str) -> bool:
    return "torch/distributed/" in filename.replace(os.sep, "/")


def _is_user(filename: str) -> bool:
    return not (_is_library(filename) or filename.startswith(_HERE))


def _user_line(stack_trace: str) -> str:
    """The innermost user frame of an FX node's recorded stack trace."""
    found = [(f, int(n)) for f, n in _FILE_LINE.findall(stack_trace) if _is_user(f)]
    if not found:
        return ""
    path, lineno = found[-1]
    return f"{os.path.basename(path)}:{lineno}"


def _user_frame(frames: list[FrameType]) -> str:
    for f in frames:
        if _is_user(f.f_code.co_filename):
            return f"{f.f_code.co_name} ({os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"
    return ""
