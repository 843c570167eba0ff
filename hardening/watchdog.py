"""How a rank ends: the out-of-band watchdog, the job-wide abort and the final record.

A daemon thread per rank heartbeats into the launcher-hosted c10d store (the store
outlives any rank), and ends the process when:

- another rank wrote the job-wide ``abort`` key (fast death propagation) -> PeerError,
- a peer died (reported by the launcher that hosts the store) or its heartbeat stopped
  changing for ``peer_lost`` seconds (``setup`` while it imports or compiles) -> PeerLost,
- the main thread's current call ran past its deadline (``call_deadline``; a warmup call,
  which may compile, gets ``compile``) -> CallDeadlineExceeded,
- the main thread has been blocked in a collective for ``call_deadline`` while every peer
  is waiting too (on the side channel, in a collective, or gone) -> CallDeadlineExceeded
  naming the op and the user's line: a conditional collective, even in the first call,
  does not wait for the compile bound (a peer that is still compiling holds it off),
- the launcher died (the parent changed) -> exit code 11.

Every end goes through :meth:`Terminator.end`: write the final record, publish the
abort (first writer wins), flush, ``os._exit`` with the cause's exit code. ``os._exit``
because a stuck collective or a poisoned CUDA context must not block teardown.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch.distributed as dist

from hardening import activity
from hardening.errors import (
    EXIT_OK,
    EXIT_PARENT_GONE,
    CallDeadlineExceeded,
    HardeningError,
    PeerError,
    PeerLost,
    exit_code_for,
)

ABORT_KEY = "abort"
EVENTS_KEY = "events"
"""Bumped after every write of the abort key, a ``done/<r>`` or an ``exit/<r>`` key."""
SLOW_PHASES = frozenset({"init", "parity", "build", "warmup"})


@dataclass(kw_only=True, slots=True)
class RankState:
    """What this rank is doing, shared by the main thread and the watchdog."""

    rank: int
    world_size: int
    record_path: Path
    started_at: float = field(default_factory=time.time)
    phase: str = "init"
    call_id: int | None = None
    call_started: float | None = None  # monotonic; set only while a deadline-bound call runs
    call_limit_s: float | None = None
    """This call's own deadline (a warmup call that may compile), else the watchdog's."""
    fired_at: float | None = None
    fault_touched: str | None = None
    """What the fault changed on this rank (a tensor or parameter name), when it fired."""
    fault_skipped: str | None = None
    """Why the fault could not apply to this region on this rank, when it could not."""
    counters: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds from process start at which each phase began."""
    artifacts: dict[str, str] = field(default_factory=dict)
    """Debug artifacts this rank wrote (name -> path, or ``unavailable: why``)."""

    on_phase: Callable[[str], None] | None = None
    """Publishes a phase change at once, from the main thread (a heartbeat may never come:
    a rank frozen right after entering a phase must not be judged by the old one)."""

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.timings[phase] = round(time.time() - self.started_at, 3)
        if self.on_phase is not None:
            self.on_phase(phase)

    def begin_call(self, call_id: int, *, deadline_bound: bool, deadline_s: float | None = None) -> None:
        self.call_id = call_id
        activity.ISSUED.new_call(call_id)
        self.call_limit_s = deadline_s
        self.call_started = time.monotonic() if deadline_bound else None

    def end_call(self) -> None:
        self.call_started = None


class Terminator:
    """The one way out of a rank: record, abort, flush, ``os._exit``."""

    def __init__(
        self, state: RankState, store: dist.Store | None, *, attribution_window_s: float = 0.5, runtime: bool = True
    ) -> None:
        self.state = state
        self.attribution_window_s = attribution_window_s
        self.runtime = runtime
        """False (stock mode): record and exit only; no abort, no attribution."""
        self.store = store  # a client of its own: the main thread's may be blocked mid-wait
        self._lock = threading.Lock()

    @property
    def ending(self) -> bool:
        return self._lock.locked()

    def end(
        self,
        exc: BaseException | None,
        *,
        root_cause_rank: int | None = None,
        exit_code: int | None = None,
        publish_abort: bool = True,
    ) -> NoReturn:
        if not self._lock.acquire(blocking=False):
            while True:  # another thread is already ending this process
                time.sleep(3600)
        if exc is not None and not isinstance(exc, HardeningError) and self.runtime:
            exc, root_cause_rank = self._attribute(exc, root_cause_rank)
        if root_cause_rank is None:
            root_cause_rank = getattr(exc, "root_cause_rank", None)
        code = exit_code if exit_code is not None else (exit_code_for(exc) if exc else EXIT_OK)
        s = self.state
        record = {
            "rank": s.rank,
            "pid": os.getpid(),
            "ok": exc is None and code == EXIT_OK,
            "error_class": type(exc).__name__ if exc is not None else None,
            "message": str(exc) if exc is not None else "",
            "traceback": "".join(traceback.format_exception(exc)) if exc is not None else "",
            "root_cause_rank": root_cause_rank,
            "fired_at": s.fired_at,
            "fault_touched": s.fault_touched,
            "fault_skipped": s.fault_skipped,
            "started_at": s.started_at,
            "exited_at": time.time(),
            "phase": s.phase,
            "last_call_id": s.call_id,
            "counters": s.counters,
            "timings": s.timings,
            "artifacts": s.artifacts,
            "exit_code": code,
        }
        try:
            tmp = s.record_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2, default=str))
            os.replace(tmp, s.record_path)
        except OSError as err:  # the record is best effort; the exit code still carries the cause
            print(f"[hardening] rank {s.rank}: could not write final record: {err}", file=sys.stderr)
        if exc is not None:
            print(f"[hardening] rank {s.rank} ends: {type(exc).__name__}: {exc}", file=sys.stderr)
            if publish_abort and self.runtime and self.store is not None:
                self._publish_abort(exc)
        elif code == EXIT_OK and self.store is not None:
            # Only a clean end tells peers to stop watching this rank; any other exit
            # (a vanished launcher) must still look like a death to them.
            try:
                self.store.set(f"done/{s.rank}", "1")
                self.store.add(EVENTS_KEY, 1)
            except Exception:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _attribute(self, exc: BaseException, root_cause_rank: int | None) -> tuple[BaseException, int | None]:
        """A plain error right after a peer aborted or died is that peer's doing (gloo
        reports it as "Connection closed/reset by peer"): name the peer, not the symptom."""
        if self.store is None:
            return exc, root_cause_rank
        deadline = time.monotonic() + self.attribution_window_s
        first_line = (str(exc).splitlines() or [""])[0][:300]
        while True:
            try:
                for r in range(self.state.world_size):
                    # A peer killed by a signal cannot publish an abort; its launcher reports it.
                    key = f"exit/{r}"
                    if r != self.state.rank and self.store.check([key]):
                        death = json.loads(self.store.get(key))
                        if death.get("exit_code") != 0 and not self.store.check([ABORT_KEY]):
                            lost = PeerLost(
                                f"rank {r} died ({death.get('how')}, reported by the launcher)\n"
                                f"(here it surfaced as {type(exc).__name__}: {first_line})",
                                root_cause_rank=r,
                            )
                            lost.__cause__ = exc
                            return lost, r
                if self.store.check([ABORT_KEY]):
                    info = json.loads(self.store.get(ABORT_KEY))
                    if info.get("rank") != self.state.rank:
                        peer = follow_abort(info, surfaced=f"{type(exc).__name__}: {first_line}")
                        peer.__cause__ = exc
                        return peer, peer.root_cause_rank
            except Exception:  # no store, no attribution: report the error as it is
                return exc, root_cause_rank
            if time.monotonic() >= deadline:
                return exc, root_cause_rank
            time.sleep(0.02)

    def _publish_abort(self, exc: BaseException) -> None:
        reason = json.dumps(
            {
                "rank": self.state.rank,
                "error": type(exc).__name__,
                "message": str(exc)[:2000],
                "root_cause_rank": getattr(exc, "root_cause_rank", None),
            }
        )
        try:
            self.store.compare_set(ABORT_KEY, "", reason)
            self.store.add(EVENTS_KEY, 1)
        except Exception:  # the store may be gone with the launcher; exiting matters more
            pass


def report_exit(store: dist.Store, rank: int, exit_code: int, how: str) -> None:
    """What a launcher that hosts the store does when a rank process ends: the other
    ranks' watchdogs read it on their next tick (``PeerLost`` at once, unless 0)."""
    store.set(f"exit/{rank}", json.dumps({"exit_code": exit_code, "how": how}))
    store.add(EVENTS_KEY, 1)


def follow_abort(info: dict[str, Any], *, surfaced: str | None = None, here: str | None = None) -> HardeningError:
    """What a rank ends with when another rank published the job-wide abort ``info``.

    A peer's own failure is a PeerError naming that peer. A lost peer is a PeerLost naming
    the *lost* rank on every survivor, whichever of them noticed first: the root cause is
    the rank that died or froze, not the one that saw it."""
    tail = (f"\n(here it surfaced as {surfaced})" if surfaced else "") + (f"\n(this rank was {here})" if here else "")
    lost = info.get("root_cause_rank")
    if info.get("error") == "PeerLost" and lost is not None:
        return PeerLost(f"{info['message']} (noticed first by rank {info['rank']}){tail}", root_cause_rank=lost)
    return PeerError(f"rank {info['rank']} failed first: {info['error']}: {info['message']}{tail}", root_cause_rank=info["rank"])


def main_thread_where(depth: int = 3) -> str:
    """Innermost frames of the main thread, user code first: where a stuck call is stuck.

    Works while the main thread sits in C with the GIL released (a collective wait):
    its Python frames are still there to read.
    """
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return "?"
    frames = traceback.extract_stack(frame)[::-1]
    own = [f for f in frames if "site-packages" not in f.filename and "/lib/python" not in f.filename]
    chosen = (own or frames)[:depth]
    return " <- ".join(f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})" for f in chosen)


class Watchdog(threading.Thread):
    """Heartbeat, abort poll, peer liveness and call deadline for one rank."""

    def __init__(
        self,
        state: RankState,
        terminator: Terminator,
        store: dist.Store,
        *,
        heartbeat_s: float,
        peer_lost_s: float,
        first_heartbeat_s: float,
        call_deadline_s: float,
        parent_pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="hardening-watchdog", daemon=True)
        self.state = state
        self.terminator = terminator
        self.store = store  # a client of its own, used only by this thread
        self.heartbeat_s = heartbeat_s
        self.peer_lost_s = peer_lost_s
        self.first_heartbeat_s = first_heartbeat_s
        self.call_deadline_s = call_deadline_s
        self.parent_pid = parent_pid
        self.clock = clock
        self._seq = 0
        peers = [r for r in range(state.world_size) if r != state.rank]
        self._peer_value: dict[int, bytes | None] = dict.fromkeys(peers)
        self._peer_changed: dict[int, float] = dict.fromkeys(peers, clock())
        self._events_seen: int | None = None
        self._abort_info: dict[str, Any] | None = None
        self._abort_seen = 0.0
        self._done: set[int] = set()
        self._dead: dict[int, dict[str, Any]] = {}
        self._all_seen = False
        self._blocked: tuple[Any, float] | None = None  # (call_id, op), since when
        self._peer_activity: dict[int, tuple[str, str]] = {}  # rank -> (kind, doing)

    def run(self) -> None:
        start = self.clock()
        for r in self._peer_value:
            self._peer_changed[r] = start  # from the thread's start, not the object's
        while not self.terminator.ending:
            try:
                self._tick()
            except Exception as exc:  # the store died with the launcher: the job is over
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    self.terminator.end(None, exit_code=EXIT_PARENT_GONE, publish_abort=False)
                print(f"[hardening] rank {self.state.rank} watchdog: {type(exc).__name__}: {exc}", file=sys.stderr)
            time.sleep(self.heartbeat_s)

    def _tick(self) -> None:
        s = self.state
        now = self.clock()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.terminator.end(None, exit_code=EXIT_PARENT_GONE, publish_abort=False)
        self._seq += 1
        act = activity.sample(sys._current_frames().get(threading.main_thread().ident or -1))
        if act.kind == activity.COLLECTIVE:
            activity.ISSUED.note(act)  # covers eager collectives, which no compiled graph records
        beat = {"seq": self._seq, "phase": s.phase, "call_id": s.call_id, "activity": act.kind}
        doing = self._doing(act)
        if act.kind in (activity.COLLECTIVE, activity.SIDE):
            beat["doing"] = doing  # what the runner's hang report shows: py-spy only sees the def line
        self.store.set(f"hb/{s.rank}", json.dumps(beat))
        # Abort, clean ends and launcher-reported deaths each bump one counter: unchanged,
        # there is nothing new to read (a constant number of store requests per tick
        # instead of several per peer).
        events = self.store.add(EVENTS_KEY, 0)
        if events != self._events_seen:
            self._read_events(now)
            self._events_seen = events
        if self._abort_info is not None:
            # Give this rank's own main thread two beats to raise a collective error
            # (parity, warmup) itself, so that it reports its own cause, not PeerError.
            if now - self._abort_seen >= 2 * self.heartbeat_s:
                self.terminator.end(follow_abort(self._abort_info, here=doing), publish_abort=False)
        limit = s.call_limit_s if s.call_limit_s is not None else self.call_deadline_s
        if s.call_started is not None and limit > 0:
            running = now - s.call_started
            if running > limit:
                self.terminator.end(
                    CallDeadlineExceeded(
                        f"call {s.call_id} has run {running:.1f}s, past the {limit:g}s call deadline; "
                        f"main thread in {act.describe() if act.kind == activity.COLLECTIVE else main_thread_where()}"
                        + (f"; {issued}" if act.kind != activity.COLLECTIVE and (issued := activity.ISSUED.describe()) else "")
                    )
                )
        self._check_blocked(act, now)
        if self._abort_info is not None:
            return  # a peer already named the cause; this rank follows it, not a death it caused
        watched = [r for r in self._peer_value if r not in self._done]
        for r in watched:
            # Fast path: a launcher that hosts the store reports each rank's death at once.
            death = self._dead.get(r)
            if death is not None:
                self.terminator.end(PeerLost(f"rank {r} died ({death.get('how')}, reported by the launcher)", root_cause_rank=r))
        for r, value in zip(watched, self._heartbeats(watched)):
            self._check_peer(r, value, now)

    @staticmethod
    def _doing(act: "activity.Activity") -> str:
        """This rank's activity, and the collective it issued last in this call when that
        is not the one it is in: a peer's hang report needs both."""
        issued = activity.ISSUED.describe()
        if act.kind == activity.COLLECTIVE or not issued:
            return act.describe()
        return f"{act.describe()}; {issued}"

    def _peer_text(self, r: int) -> str:
        kind, doing = self._peer_activity.get(r, ("?", ""))
        return f"{kind} ({doing})" if doing else kind

    def _check_blocked(self, act: "activity.Activity", now: float) -> None:
        """A call blocked in a collective while no peer makes progress is a hang, whatever
        the call's own (compile) bound: end it at ``call_deadline``, naming the op."""
        s = self.state
        if act.kind != activity.COLLECTIVE or s.call_started is None or self.call_deadline_s <= 0:
            self._blocked = None
            return
        key = (s.call_id, act.op)
        if self._blocked is None or self._blocked[0] != key:
            self._blocked = (key, now)
            return
        blocked = now - self._blocked[1]
        if blocked <= self.call_deadline_s:
            return
        peers = {r: self._peer_activity.get(r, ("?", ""))[0] for r in self._peer_value}
        fresh = max(1.0, 3 * self.heartbeat_s)
        progressing = [
            r for r, kind in peers.items()
            if r not in self._done and r not in self._dead
            and (kind not in (activity.SIDE, activity.COLLECTIVE) or now - self._peer_changed[r] > fresh)
        ]  # fmt: skip
        if progressing:
            return  # a peer still compiling (or silent) may yet join: the call's own bound applies
        waiting = "; ".join(f"rank {r} {'done' if r in self._done else self._peer_text(r)}" for r in sorted(peers))
        self.terminator.end(
            CallDeadlineExceeded(
                f"call {s.call_id} blocked {blocked:.1f}s in {act.describe()} while no peer makes progress "
                f"({waiting}): past the {self.call_deadline_s:g}s call deadline"
            )
        )

    def _read_events(self, now: float) -> None:
        if self._abort_info is None and self.store.check([ABORT_KEY]):
            info = json.loads(self.store.get(ABORT_KEY))
            if info.get("rank") != self.state.rank:
                self._abort_info, self._abort_seen = info, now
        for r in self._peer_value:
            if r in self._done or r in self._dead:
                continue
            if self.store.check([f"done/{r}"]):
                self._done.add(r)
            elif self.store.check([f"exit/{r}"]):
                death = json.loads(self.store.get(f"exit/{r}"))
                if death.get("exit_code") != 0:
                    self._dead[r] = death

    def _heartbeats(self, ranks: list[int]) -> list[bytes | None]:
        """Each rank's last heartbeat value (None before its first): one request once every
        watched rank has sent one and the store has ``multi_get`` (torch >= 2.5)."""
        keys = [f"hb/{r}" for r in ranks]
        if self._all_seen and keys and hasattr(self.store, "multi_get"):
            return list(self.store.multi_get(keys))
        values = [self.store.get(k) if self.store.check([k]) else None for k in keys]
        self._all_seen = all(v is not None for v in values)  # heartbeat keys are never deleted
        return values

    def _check_peer(self, r: int, value: bytes | None, now: float) -> None:
        if value != self._peer_value[r]:
            self._peer_value[r] = value
            self._peer_changed[r] = now
            if value is not None:
                beat = json.loads(value)
                self._peer_activity[r] = (beat.get("activity", "?"), beat.get("doing", ""))
            return
        age = now - self._peer_changed[r]
        if value is None:
            if age > self.first_heartbeat_s:
                self.terminator.end(
                    PeerLost(f"rank {r} never sent a heartbeat within {self.first_heartbeat_s:g}s", root_cause_rank=r)
                )
            return
        if age <= min(self.peer_lost_s, self.first_heartbeat_s):
            return  # not late under any phase's budget: no need to ask which phase
        last = json.loads(value)
        phase_key = f"phase/{r}"
        phase = self.store.get(phase_key).decode() if self.store.check([phase_key]) else last.get("phase")
        # Imports and the first compile can hold the GIL for seconds (cold lazy imports,
        # dlopen): a peer in those phases is slow, not lost, so it gets the setup budget.
        limit = self.first_heartbeat_s if phase in SLOW_PHASES else self.peer_lost_s
        if age > limit:
            self.terminator.end(
                PeerLost(
                    f"rank {r} lost: no heartbeat for {age:.1f}s (> {limit:g}s); "
                    f"last seen in phase {phase}, call {last.get('call_id')}",
                    root_cause_rank=r,
                )
            )
