"""The out-of-band watchdog: heartbeat, abort poll, peer liveness and call deadlines.

A daemon thread per rank heartbeats into the launcher-hosted c10d store (the store
outlives any rank), and ends the process when:

- another rank wrote the job-wide ``abort`` key (fast death propagation) -> PeerError,
- a peer died or froze (reported by its launcher, which watches its process from
  outside: :mod:`hardening.harness.liveness`), its node went silent (no word from its
  launcher for ``node_lost``), or -- only for a peer no launcher vouches for (a plain
  torchrun) -- its heartbeat stopped changing for ``peer_lost`` seconds (``setup``
  while it imports or compiles) -> PeerLost. A peer its launcher vouches for is never
  lost on its own heartbeat: holding the GIL in a C call or compiling for a minute
  stops a Python thread's beat, not the process,
- the main thread's current call ran past its deadline (``call_deadline``; a warmup call,
  which may compile, gets ``compile``) -> CallDeadlineExceeded,
- the main thread has been blocked in a collective for ``call_deadline`` while every peer
  is waiting too (on the side channel, in a collective, or gone) -> CallDeadlineExceeded
  naming the op and the user's line: a conditional collective, even in the first call,
  does not wait for the compile bound (a peer that is still compiling holds it off),
- the launcher died (the parent changed) -> exit code 11,
- SIGTERM arrived (torchrun's agent stopping the ranks after one failed, an operator):
  noticed here whatever the main thread is doing, through the signal's wakeup fd
  (:class:`TermSignal`); after two beats (the main thread may still end on its own
  cause) -> ``Terminated``, or the peer failure that explains it.

Every end goes through :meth:`hardening.runtime.records.Terminator.end`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from hardening.errors import EXIT_PARENT_GONE, CallDeadlineExceeded, PeerLost, Terminated
from hardening.runtime import activity
from hardening.runtime import store as store_keys
from hardening.runtime.records import RankState, Terminator, follow_abort, main_thread_where, store_gone

SLOW_PHASES = frozenset({"init", "parity", "build", "warmup"})


class TermSignal:
    """SIGTERM, seen by the watchdog thread even while the main thread is blocked in C.

    A Python signal handler runs only when the main thread next runs bytecode, which a
    rank blocked in a collective may never do; the C-level handler writes the signal
    number into the wakeup fd at once, from whichever thread the signal hit. Installed
    only where it displaces nothing: SIGTERM at its default and no wakeup fd set
    (asyncio, or the program's own handler, keep theirs)."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None
        self.received = False

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers can only be set from the main thread
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        theirs = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        if theirs != -1:
            signal.set_wakeup_fd(theirs)  # someone else listens: leave SIGTERM to them
            os.close(r), os.close(w)
            return False
        signal.signal(signal.SIGTERM, lambda *_: None)  # the watchdog acts; the main thread goes on
        self._fds = (r, w)
        return True

    def poll(self) -> bool:
        """True once SIGTERM has arrived (it stays true)."""
        if self._fds is not None and not self.received:
            try:
                self.received = bytes([signal.SIGTERM]) in os.read(self._fds[0], 512)
            except BlockingIOError:
                pass
        return self.received

    def uninstall(self) -> None:
        """Give SIGTERM back to the default (this rank is done with the runtime)."""
        if self._fds is None or threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(self._fds[0]), os.close(self._fds[1])
        self._fds = None


class Watchdog(threading.Thread):
    """Heartbeat, abort poll, peer liveness and call deadline for one rank."""

    def __init__(
        self,
        state: RankState,
        terminator: Terminator,
        store: Any,
        *,
        heartbeat_s: float,
        peer_lost_s: float,
        first_heartbeat_s: float,
        call_deadline_s: float,
        node_lost_s: float = 0.6,
        parent_pid: int | None = None,
        term: TermSignal | None = None,
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
        self.node_lost_s = node_lost_s
        self.term = term
        self._term_seen: float | None = None
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
        self._seen: set[str] = set()  # store keys that exist (heartbeat and vouch keys are never deleted)
        self._vouch: dict[int, tuple[bytes, float]] = {}  # rank -> its launcher's last word, since when
        self._node: Any = None  # this rank's node, as its own launcher's vouch says
        self._blocked: tuple[Any, float] | None = None  # (call_id, op), since when
        self._peer_activity: dict[int, tuple[str, str]] = {}  # rank -> (kind, doing)
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Stop watching: this rank is done (its peers read ``done``), the process may go on."""
        self._stopped.set()

    def run(self) -> None:
        """One tick every ``heartbeat`` seconds until the rank ends. A store that stops
        answering (its host, node 0 or the launcher, is gone) ends the rank ``PeerLost``
        after ``node_lost`` (two beats at least)."""
        start = self.clock()
        for r in self._peer_value:
            self._peer_changed[r] = start  # from the thread's start, not the object's
        failing: float | None = None  # since when the store has not answered
        while not self.terminator.ending and not self._stopped.is_set():
            try:
                self._tick()
                failing = None
            except Exception as exc:  # the store died with whoever hosted it: the job is over
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    self.terminator.end(None, exit_code=EXIT_PARENT_GONE, publish_abort=False)
                now = self.clock()
                if failing is None:
                    failing = now
                    print(f"[hardening] rank {self.state.rank} watchdog: {type(exc).__name__}: {exc}", file=sys.stderr)
                elif now - failing > max(self.node_lost_s, 2 * self.heartbeat_s):
                    self.terminator.end(PeerLost(store_gone(exc, for_s=now - failing)), publish_abort=False)
            time.sleep(self.heartbeat_s)

    def _tick(self) -> None:
        """Beat, then in order: the launcher gone (exit 11), SIGTERM, the job-wide abort,
        this rank's call deadline, a call blocked while every peer waits, a lost peer."""
        s = self.state
        now = self.clock()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.terminator.end(None, exit_code=EXIT_PARENT_GONE, publish_abort=False)
        if self.term is not None and self.term.poll():
            self._term_seen = self._term_seen or now
            if now - self._term_seen >= 2 * self.heartbeat_s:
                self.terminator.end(
                    Terminated(f"rank {s.rank} received SIGTERM in phase {s.phase}, call {s.call_id} (from its launcher or an operator)")
                )
        self._seq += 1
        act = activity.sample(sys._current_frames().get(threading.main_thread().ident or -1))
        if act.kind == activity.COLLECTIVE:
            activity.ISSUED.note(act)  # covers eager collectives, which no compiled graph records
        beat = {"seq": self._seq, "phase": s.phase, "call_id": s.call_id, "activity": act.kind}
        doing = self._doing(act)
        if act.kind in (activity.COLLECTIVE, activity.SIDE):
            beat["doing"] = doing  # what the runner's hang report shows: py-spy only sees the def line
        self.store.set(store_keys.key("hb", s.rank), json.dumps(beat))
        # Abort, clean ends and launcher-reported deaths each bump one counter: unchanged,
        # there is nothing new to read (a constant number of store requests per tick
        # instead of several per peer).
        events = self.store.add(store_keys.EVENTS, 0)
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
                self.terminator.end(PeerLost(store_keys.describe_lost(r, death), root_cause_rank=r))
        if not watched:
            return
        beat_keys = [store_keys.key("hb", r) for r in watched]
        vouch_keys = [store_keys.key("alive", r) for r in [self.state.rank, *watched]]
        self._discover(beat_keys, each=True)
        self._discover(vouch_keys, each=False)  # a launcher vouches for all its ranks or for none
        values = self._get(beat_keys + vouch_keys)
        beats, vouches = values[: len(beat_keys)], values[len(beat_keys) :]
        self._node = json.loads(vouches[0]).get("node") if vouches[0] is not None else None
        for r, value, vouch in zip(watched, beats, vouches[1:]):
            changed = self._note_beat(r, value, now)
            if vouch is None:
                if not changed:
                    self._check_peer(r, value, now)  # nobody outside the peer watches it
            elif self._vouch.get(r, (None,))[0] != vouch:
                self._vouch[r] = (vouch, now)
        lost = self._silent_node(now)
        if lost is not None:
            self.terminator.end(lost)

    def _silent_node(self, now: float) -> PeerLost | None:
        """The ranks of another node whose launcher vouches for none of its ranks any more
        (each vouch older than ``node_lost``), as the PeerLost that names them. A launcher
        that stops vouching for one rank (it reported it stopped) while it still vouches
        for the others is not silent; this rank's own node going silent ends it otherwise
        (its launcher is its parent)."""
        nodes: dict[Any, list[tuple[int, dict[str, Any], float]]] = {}
        for r, (vouch, since) in sorted(self._vouch.items()):
            if r in self._done or r in self._dead:
                continue
            info = json.loads(vouch)
            nodes.setdefault(info.get("node"), []).append((r, info, now - since))
        for node, ranks in nodes.items():
            if node == self._node or not all(age > self.node_lost_s for _, _, age in ranks):
                continue
            names = [r for r, _, _ in ranks]
            _, info, age = ranks[0]
            return PeerLost(
                f"rank{'s' if len(names) > 1 else ''} {', '.join(map(str, names))} lost: node {node} "
                f"({info.get('host')}) went silent, no word from its launcher for {min(a for _, _, a in ranks):.1f}s",
                root_cause_rank=names[0],
            )
        return None

    @property
    def remote_vouched(self) -> bool:
        """Whether a launcher on another node vouches for some peer (multi-node)."""
        return any(json.loads(v).get("node") != self._node for v, _ in list(self._vouch.values()))

    def silent_node(self, store: Any) -> PeerLost | None:
        """The peers of another node whose launcher has been silent past ``node_lost``, as
        the PeerLost that names them, or None: asked by the terminator (through its own
        ``store`` client: this thread stops once the rank is ending) when the main thread's
        own error (a gloo socket closed by a dead node's rank) may be that."""
        now = self.clock()
        for r, (vouch, _) in list(self._vouch.items()):
            current = store.get(store_keys.key("alive", r))
            if current != vouch:
                self._vouch[r] = (current, now)
        return self._silent_node(now)

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
        if self._abort_info is None and self.store.check([store_keys.ABORT]):
            info = json.loads(self.store.get(store_keys.ABORT))
            if info.get("rank") != self.state.rank:
                self._abort_info, self._abort_seen = info, now
        for r in self._peer_value:
            if r in self._done or r in self._dead:
                continue
            if self.store.check([store_keys.key("done", r)]):
                self._done.add(r)
            elif self.store.check([store_keys.key("exit", r)]):
                death = json.loads(self.store.get(store_keys.key("exit", r)))
                if death.get("exit_code") != 0:
                    self._dead[r] = death

    def _discover(self, keys: list[str], *, each: bool) -> None:
        """Note which of ``keys`` exist now (heartbeat and vouch keys are never deleted):
        one request for all of them, and with ``each`` one per key while some are missing."""
        unseen = [k for k in keys if k not in self._seen]
        if not unseen:
            return
        if self.store.check(unseen):
            self._seen.update(unseen)
        elif each:
            self._seen.update(k for k in unseen if self.store.check([k]))

    def _get(self, keys: list[str]) -> list[bytes | None]:
        """Each key's value, None while it does not exist: one request (``multi_get``,
        torch >= 2.5) for every key seen."""
        present = [k for k in keys if k in self._seen]
        if present and hasattr(self.store, "multi_get"):
            values = dict(zip(present, self.store.multi_get(present)))
        else:
            values = {k: self.store.get(k) for k in present}
        return [values.get(k) for k in keys]

    def _note_beat(self, r: int, value: bytes | None, now: float) -> bool:
        """A peer's own heartbeat: when it last changed, and what it said it was doing.
        True when it changed since the last tick."""
        if value == self._peer_value[r]:
            return False
        self._peer_value[r] = value
        self._peer_changed[r] = now
        if value is not None:
            beat = json.loads(value)
            self._peer_activity[r] = (beat.get("activity", "?"), beat.get("doing", ""))
        return True

    def _check_peer(self, r: int, value: bytes | None, now: float) -> None:
        """The fallback for a peer no launcher vouches for: its own heartbeat's age."""
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
        phase_key = store_keys.key("phase", r)
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
