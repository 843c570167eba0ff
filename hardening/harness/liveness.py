"""Liveness seen from outside the ranks: the launcher's observer of its own node's rank processes.

A rank's watchdog is a Python thread. While the rank's main thread holds the GIL (a C
call, a cold import, the first compile) the watchdog cannot beat, and under SIGSTOP
nothing in the process runs at all: no in-process heartbeat can tell a frozen rank from a
busy one, so either a busy peer is falsely lost or a frozen one is found late. The
launcher can tell them apart. It is a process of its own on the rank's node, and every
:data:`BEAT_S` its observer thread reads each local rank's ``/proc/<pid>/stat``:

- it vouches for every rank whose process exists and is not stopped (``alive/<r>``:
  ``{seq, state, node, host}``). A peer's watchdog treats a vouched rank as alive
  whatever that rank's own heartbeat says: a peer holding the GIL for 20 s or compiling
  for a minute is never lost (its own call deadline still bounds a live but stuck
  call). A vouch that stops changing for ``timeouts.node_lost`` means that node's
  launcher, and with it the node, is gone (multi-node).
- it reports a process in state ``T`` (SIGSTOP, SIGTSTP) at once, and one in ``t``
  (stopped by a tracer) once that lasted :data:`TRACE_GRACE_S` (py-spy pauses its
  target for milliseconds, gdb for good), as ``exit/<r>`` with ``stopped``: every peer
  ends ``PeerLost`` naming it within one watchdog tick.

Deaths are reported by whoever reaps the process (:func:`hardening.runtime.store.report_exit`).
The observer needs no GIL of any rank and no privilege: only ``/proc`` of its own node.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any

from hardening.runtime import store as store_keys

BEAT_S = 0.1
"""How often the observer reads every local rank's state and vouches for it."""

TRACE_GRACE_S = 1.0
"""A tracing stop (``t``) shorter than this is a stack dump, not a frozen rank."""

STOP_SIGNALS = {"T": "stopped (state T: SIGSTOP or SIGTSTP)", "t": "stopped by a tracer (state t: a debugger)"}


def proc_state(pid: int) -> str | None:
    """The one-letter scheduler state of ``pid`` (R, S, D, T, t, Z, ...) from
    ``/proc/<pid>/stat``, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the state follows the last ')'.
    rest = raw[raw.rfind(b")") + 1 :].split()
    return rest[0].decode() if rest else None


class Observer(threading.Thread):
    """The launcher's observer thread: vouches for and reports the ranks it is given.

    One per launcher, for its whole life; :meth:`watch` hands it each case's store and
    ranks, :meth:`add` each rank's pid as it is known, :meth:`pause` the ranks a stack
    dump is about to stop, :meth:`clear` ends a case."""

    def __init__(self, *, node: int = 0, host: str | None = None, beat_s: float = BEAT_S) -> None:
        super().__init__(name="hardening-liveness", daemon=True)
        self.node = node
        self.host = host or socket.gethostname()
        self.beat_s = beat_s
        self._lock = threading.Lock()
        self._store: Any = None
        self._pids: dict[int, int] = {}
        self._paused: set[int] = set()
        self._reported: dict[int, str] = {}
        self._traced_since: dict[int, float] = {}
        self._seq = 0
        self._closed = threading.Event()

    def watch(self, store: Any) -> None:
        """Observe for one case, writing into ``store`` (a client of this thread's own,
        already namespaced to the case)."""
        with self._lock:
            self._store, self._pids, self._paused, self._reported, self._traced_since = store, {}, set(), {}, {}

    def add(self, rank: int, pid: int) -> None:
        with self._lock:
            self._pids[rank] = pid

    def pause(self, ranks: set[int] | list[int]) -> None:
        """Stop judging ``ranks`` (the launcher is about to stop them itself, for stacks)."""
        with self._lock:
            self._paused.update(ranks)

    def reported(self) -> dict[int, str]:
        """Ranks reported stopped in this case, and how."""
        with self._lock:
            return dict(self._reported)

    def clear(self) -> None:
        with self._lock:
            self._store, self._pids = None, {}

    def close(self) -> None:
        self._closed.set()

    def run(self) -> None:
        while not self._closed.wait(self.beat_s):
            with self._lock:
                store, pids, paused = self._store, dict(self._pids), set(self._paused)
            if store is None or not pids:
                continue
            try:
                self._beat(store, pids, paused)
            except Exception as exc:  # the case's store went away under us: the case is over
                print(f"[hardening] liveness observer: {type(exc).__name__}: {exc}", file=sys.stderr)
                with self._lock:
                    if self._store is store:
                        self._store = None

    def _beat(self, store: Any, pids: dict[int, int], paused: set[int]) -> None:
        self._seq += 1
        now = time.monotonic()
        vouched: dict[str, str] = {}
        for rank, pid in pids.items():
            if rank in self._reported:
                continue
            state = proc_state(pid)
            if state is None or state in ("Z", "X"):
                continue  # ended: whoever reaps it reports how
            if state in STOP_SIGNALS and rank not in paused:
                first = self._traced_since.setdefault(rank, now)
                if state == "T" or now - first >= TRACE_GRACE_S:
                    with self._lock:
                        self._reported[rank] = STOP_SIGNALS[state]
                    store_keys.report_stopped(store, rank, STOP_SIGNALS[state])
                    continue
            else:
                self._traced_since.pop(rank, None)
            vouched[store_keys.key("alive", rank)] = json.dumps(
                {"seq": self._seq, "state": state, "node": self.node, "host": self.host}
            )
        if not vouched:
            return
        if hasattr(store, "multi_set"):
            store.multi_set(list(vouched), list(vouched.values()))
        else:
            for key, value in vouched.items():
                store.set(key, value)
