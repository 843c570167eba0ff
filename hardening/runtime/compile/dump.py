"""The depyf dump of a rank: what Dynamo made of the region, written post hoc, as it ends.

This module owns the ``depyf/`` directory of a rank. It holds each FX graph the counting
backend received (``graph_<i>.py``, its readable code), the Dynamo-transformed bytecode of
every compiled frame, decompiled by depyf (``code_<compile id>_<function>.py``, with its
guards in ``.guards.txt``), and ``NOTES.txt``: what was written and everything that could
not be (a decompilation that failed leaves the bytecode's ``dis`` listing instead).

Post hoc, never ``depyf.prepare_debug()``: that hook *replaces* the running bytecode with
depyf's recompiled version (a gate must judge the code users run) and is brittle on the
bytecode torch 2.13 emits around graph breaks (``DecompilationError`` on ``SWAP``), the
very case a failing gate is about. Here the code already ran; decompiling it changes
nothing. The dump is evidence, never a gate: :func:`write_dump` never raises and stops at
its deadline, noting what it left out.
"""

from __future__ import annotations

import dis
import os
import re
import time
from pathlib import Path
from typing import Any

DUMP_DIR = "depyf"
"""Name of the dump directory inside a rank's directory."""

DUMP_ENV = "HARDENING_DEPYF_DIR"
"""Set by a harness that keeps debug artifacts: where this rank's Session writes its dump
as it ends, once it has compiled something (a ``--program`` rank's Session included)."""

NOTES = "NOTES.txt"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def dump_on_end(state: Any, probe: Any, directory: str | Path) -> None:
    """A rank's ``RankState.on_end`` hook: its dump into ``directory``, named in its
    artifacts. Every end dumps, a clean one too: a rank cannot know its case's verdict (a
    fault that went undetected fails a case whose ranks all completed); the harness drops
    what a passing case does not keep."""
    limit = max(0.5, state.on_end_limit_s - 0.5)  # finish before the Terminator stops waiting
    state.artifacts["depyf"] = write_dump(directory, list(probe.graphs), time_limit_s=limit)


def write_dump(directory: str | Path, graphs: list[Any], *, time_limit_s: float = 5.0) -> str:
    """Write the dump of this process's compiled frames and of ``graphs`` (the FX graphs
    the backend received, in order) into ``directory``. Returns the directory, or
    ``unavailable: why`` when not even it could be made; every other failure is a line
    of ``NOTES.txt``. Stops writing after ``time_limit_s`` seconds (a dump must not hold
    up the rank's exit), saying so."""
    deadline = time.monotonic() + time_limit_s
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"unavailable: {exc}"
    written: list[str] = []
    notes: list[str] = []

    def put(name: str, text: str) -> None:
        try:
            (out / name).write_text(text)
            written.append(name)
        except OSError as exc:
            notes.append(f"{name}: not written: {exc}")

    for i, gm in enumerate(list(graphs)):
        if time.monotonic() > deadline:
            notes.append(f"time limit {time_limit_s:g}s reached: graphs {i}..{len(graphs) - 1} left out")
            break
        put(f"graph_{i}.py", _graph_text(i, gm, notes))
    if not graphs:
        notes.append("no FX graph reached the backend before this rank ended")

    frames = _compiled_frames(notes)
    for n, (source, entry_code, compile_id) in enumerate(frames):
        if time.monotonic() > deadline:
            notes.append(f"time limit {time_limit_s:g}s reached: {len(frames) - n} compiled frame(s) left out")
            break
        # A torch whose cache entries carry no compile id names each by its place instead.
        stem = _UNSAFE.sub("_", f"code_{compile_id if compile_id != '?' else f'entry{n}'}_{entry_code.co_name}")
        where = f"{source.co_filename}:{source.co_firstlineno}" if source is not None else "?"
        header = f"# Dynamo's transformed bytecode for {entry_code.co_name} ({where}), compile id {compile_id}\n"
        text, error = _decompile(entry_code)
        if error is None:
            put(f"{stem}.py", header + "# decompiled by depyf: read it, do not run it\n\n" + text)
        else:
            notes.append(f"{stem}: depyf could not decompile it ({error}); its bytecode is in {stem}.dis.txt")
            put(f"{stem}.dis.txt", header + text)
        guards = _guards_text(source, compile_id) if compile_id != "?" else ""
        if guards:
            put(f"{stem}.guards.txt", guards)
    if not frames:
        notes.append("no compiled frame found in Dynamo's code cache")

    index = [f"depyf dump of pid {os.getpid()}: {len(written)} file(s)", *(f"  {w}" for w in written)]
    if notes:
        index += ["", "notes:", *(f"  {n}" for n in notes)]
    try:
        (out / NOTES).write_text("\n".join(index) + "\n")
    except OSError as exc:
        return f"unavailable: {exc}"
    return str(out)


def _graph_text(i: int, gm: Any, notes: list[str]) -> str:
    try:
        body = gm.print_readable(print_output=False)
    except Exception as exc:  # noqa: BLE001 - a graph that cannot print itself still has code
        notes.append(f"graph_{i}: print_readable failed ({type(exc).__name__}: {exc}); wrote gm.code")
        try:
            body = str(gm.code)
        except Exception as exc2:  # noqa: BLE001
            body = f"# no code: {type(exc2).__name__}: {exc2}"
    return f"# FX graph {i} as the counting backend received it\n{body}\n"


def _decompile(code: Any) -> tuple[str, str | None]:
    """``(source, None)``, or ``(dis listing, why)`` when depyf cannot decompile ``code``."""
    try:
        import depyf

        return depyf.decompile(code), None
    except Exception as exc:  # noqa: BLE001 - DecompilationError, IndexError, ImportError...: all evidence
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        try:
            listing = dis.Bytecode(code).dis()
        except Exception as exc2:  # noqa: BLE001
            listing = f"# no listing either: {type(exc2).__name__}: {exc2}\n"
        return listing, why


def _cache_entries(code: Any) -> list[Any]:
    from torch._dynamo import eval_frame

    get = getattr(eval_frame, "_debug_get_cache_entry_list", None)
    return list(get(code)) if get is not None else []


def _compiled_frames(notes: list[str]) -> list[tuple[Any, Any, str]]:
    """``(original code, transformed code, compile id)`` of every cache entry Dynamo holds
    in this process, found through private APIs that are feature-detected: a torch
    without them leaves a note, never an error."""
    try:
        from torch._dynamo import convert_frame, eval_frame
    except Exception as exc:  # noqa: BLE001
        notes.append(f"torch._dynamo unavailable ({type(exc).__name__}): no transformed bytecode")
        return []
    inputs = getattr(convert_frame, "input_codes", None)
    outputs = getattr(convert_frame, "output_codes", None)
    found: list[tuple[Any, Any, str]] = []
    if inputs is not None and hasattr(eval_frame, "_debug_get_cache_entry_list"):
        for ref in list(getattr(inputs, "seen", [])):
            code = ref()
            if code is None or (outputs is not None and code in outputs):
                continue
            try:
                entries = _cache_entries(code)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"cache entries of {code.co_name} unreadable: {type(exc).__name__}: {exc}")
                continue
            # Most recently used first in the cache: oldest first reads in compile order.
            for entry in reversed(entries):
                entry_code = getattr(entry, "code", None)
                if entry_code is not None:
                    found.append((code, entry_code, str(getattr(entry, "compile_id", "?"))))
        return found
    if outputs is not None:
        notes.append("cache entries unavailable on this torch: transformed code listed without guards")
        for i, ref in enumerate(list(getattr(outputs, "seen", []))):
            code = ref()
            if code is not None:
                found.append((None, code, f"out{i}"))
        return found
    notes.append("this torch exposes no compiled-code registry: no transformed bytecode")
    return found


def _guards_text(source: Any, compile_id: str) -> str:
    """The guard tree of the cache entry ``compile_id`` of ``source`` (why a call
    recompiles), or ``""``."""
    if source is None:
        return ""
    try:
        for entry in _cache_entries(source):
            if str(getattr(entry, "compile_id", "?")) == compile_id:
                manager = getattr(entry, "guard_manager", None)
                return f"# guards of compile id {compile_id}\n{manager}\n" if manager is not None else ""
    except Exception:  # noqa: BLE001 - guards are a bonus
        return ""
    return ""
