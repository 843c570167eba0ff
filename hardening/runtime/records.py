"""How a rank ends: its state, the one way out, and the final record it leaves.

:class:`RankState` is what the main thread is doing (phase, call, fault, counters), shared
with the watchdog. :class:`Terminator` is the only way a rank ends: write the
:class:`RankRecord`, publish the job-wide abort (first writer wins), flush, ``os._exit``
with the cause's exit code. ``os._exit`` because a stuck collective or a poisoned CUDA
context must not block teardown. The launcher reads the record back with
:meth:`RankRecord.read`; nothing else parses it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

from hardening.errors import EXIT_OK, HardeningError, PeerError, PeerLost, Terminated, exit_code_for
from hardening.runtime import activity
from hardening.runtime import store as store_keys


@dataclass(kw_only=True, slots=True)
class RankRecord:
    """The final record of one rank (``record.json``), written once, at its end."""

    rank: int
    pid: int
    ok: bool
    """Ended cleanly: no error and exit code 0."""
    exit_code: int
    error_class: str | None = None
    """The named cause (``PeerError``, ``DriftError``...), or the class of a plain error."""
    message: str = ""
    traceback: str = ""
    root_cause_rank: int | None = None
    """The rank the cause points at (a lost or failing peer), when it is another."""
    fired_at: float | None = None
    """When this rank's injected fault acted (time.time), if it did."""
    fault_touched: str | None = None
    fault_skipped: str | None = None
    started_at: float = 0.0
    exited_at: float = 0.0
    phase: str = ""
    """The phase the rank was in when it ended."""
    last_call_id: int | None = None
    """The call the rank was in (or last finished) when it ended."""
    counters: dict[str, Any] = field(default_factory=dict)
    """The compile counters: totals, warmup and steady state, graph signatures and collectives."""
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    """Debug artifacts the rank left: its ``torch_trace`` directory, its depyf dump."""
    pipeline: dict[str, Any] = field(default_factory=dict)
    """A pipeline rank's queues, epochs, timeline and (for the control) the delivery
    history and the overlap metrics; empty outside a pipeline."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> None:
        """Atomically: a reader never sees half a record."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> RankRecord | None:
        """The record at ``path``, or None when there is none (or it is unreadable)."""
        try:
            data = json.loads(path.read_text())
            return cls.from_json(data) if isinstance(data, dict) else None
        except (OSError, ValueError, TypeError):
            return None


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
    pipeline: dict[str, Any] = field(default_factory=dict)
    """The final record's ``pipeline`` section (filled as a pipeline closes)."""

    on_phase: Callable[[str], None] | None = None
    """Publishes a phase change at once, from the main thread (a heartbeat may never come:
    a rank frozen right after entering a phase must not be judged by the old one)."""

    on_end: Callable[[bool], None] | None = None
    """Writes this rank's debug artifacts (into ``artifacts``) as it ends; the argument
    says whether the end is clean. The :class:`Terminator` calls it only once the record
    is written and the abort published, so no peer waits on it and it cannot change
    anyone's cause; in a thread of its own, for at most ``on_end_limit_s``."""

    on_end_limit_s: float = 5.0
    """How long :attr:`on_end` may hold up this rank's exit."""

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
        self, state: RankState, store: Any | None, *, attribution_window_s: float = 0.5
    ) -> None:
        self.state = state
        self.attribution_window_s = attribution_window_s
        self.store = store
        """A client of its own (the main thread's may be blocked mid-wait); None: record
        and exit only, with nobody to tell and no peer to attribute an error to."""
        self.watchdog: Any = None
        """This rank's watchdog, asked whether a node it watches went silent (multi-node)."""
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
        if exc is not None and (not isinstance(exc, HardeningError) or isinstance(exc, Terminated)):
            exc, root_cause_rank = self._attribute(exc, root_cause_rank)
        if root_cause_rank is None:
            root_cause_rank = getattr(exc, "root_cause_rank", None)
        code = exit_code if exit_code is not None else (exit_code_for(exc) if exc else EXIT_OK)
        s = self.state
        record = RankRecord(
            rank=s.rank,
            pid=os.getpid(),
            ok=exc is None and code == EXIT_OK,
            error_class=type(exc).__name__ if exc is not None else None,
            message=str(exc) if exc is not None else "",
            traceback=_bounded("".join(traceback.format_exception(exc))) if exc is not None else "",
            root_cause_rank=root_cause_rank,
            fired_at=s.fired_at,
            fault_touched=s.fault_touched,
            fault_skipped=s.fault_skipped,
            started_at=s.started_at,
            exited_at=time.time(),
            phase=s.phase,
            last_call_id=s.call_id,
            counters=s.counters,
            timings=s.timings,
            artifacts=s.artifacts,
            pipeline=s.pipeline,
            exit_code=code,
        )
        try:
            record.write(s.record_path)
        except OSError as err:  # the record is best effort; the exit code still carries the cause
            print(f"[hardening] rank {s.rank}: could not write final record: {err}", file=sys.stderr)
        if exc is not None:
            print(f"[hardening] rank {s.rank} ends: {type(exc).__name__}: {exc}", file=sys.stderr)
            write_elastic_error(record)
            if publish_abort and self.store is not None:
                self._publish_abort(exc)
        elif code == EXIT_OK and self.store is not None:
            # Only a clean end tells peers to stop watching this rank; any other exit
            # (a vanished launcher) must still look like a death to them.
            try:
                self.store.set(store_keys.key("done", s.rank), "1")
                self.store.add(store_keys.EVENTS, 1)
            except Exception:
                pass
        if s.on_end is not None:
            self._run_on_end(record)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _run_on_end(self, record: RankRecord) -> None:
        """The state's ``on_end`` hook, bounded; then the record again, with what it added.
        Never raises: an artifact that fails or overruns is a line in the record."""
        s, hook = self.state, self.state.on_end
        assert hook is not None

        def run() -> None:
            try:
                hook(record.ok)
            except BaseException as err:  # noqa: BLE001 - best effort, reported in the record
                s.artifacts["on_end"] = f"unavailable: {type(err).__name__}: {err}"

        worker = threading.Thread(target=run, name="hardening-on-end", daemon=True)
        worker.start()
        worker.join(s.on_end_limit_s)
        if worker.is_alive():  # os._exit ends it mid-write: what it wrote so far stays
            s.artifacts["on_end"] = f"unfinished: still writing after {s.on_end_limit_s:g}s"
        record.artifacts = dict(s.artifacts)
        try:
            record.write(s.record_path)
        except OSError:
            pass  # the first write stands

    def _attribute(self, exc: BaseException, root_cause_rank: int | None) -> tuple[BaseException, int | None]:
        """A plain error right after a peer aborted or died is that peer's doing (gloo
        reports it as "Connection closed/reset by peer"): name the peer, not the symptom."""
        if self.store is None:
            return exc, root_cause_rank
        window = self.attribution_window_s
        nodes = self.watchdog if self.watchdog is not None and self.watchdog.remote_vouched else None
        if nodes is not None:  # a dead node is named only once its launcher's silence is long enough
            window = max(window, nodes.node_lost_s + 2 * nodes.heartbeat_s)
        deadline = time.monotonic() + window
        first_line = (str(exc).splitlines() or [""])[0][:300]
        while True:
            try:
                for r in range(self.state.world_size):
                    # A peer killed by a signal cannot publish an abort; its launcher reports it.
                    key = store_keys.key("exit", r)
                    if r != self.state.rank and self.store.check([key]):
                        death = json.loads(self.store.get(key))
                        if death.get("exit_code") != 0 and not self.store.check([store_keys.ABORT]):
                            lost = PeerLost(
                                f"{store_keys.describe_lost(r, death)}\n"
                                f"(here it surfaced as {type(exc).__name__}: {first_line})",
                                root_cause_rank=r,
                            )
                            lost.__cause__ = exc
                            return lost, r
                if self.store.check([store_keys.ABORT]):
                    info = json.loads(self.store.get(store_keys.ABORT))
                    if info.get("rank") != self.state.rank:
                        peer = follow_abort(info, surfaced=f"{type(exc).__name__}: {first_line}")
                        peer.__cause__ = exc
                        return peer, peer.root_cause_rank
            except Exception as gone:  # the store died with whoever hosted it: that is the cause
                lost = PeerLost(f"{store_gone(gone)}\n(here it surfaced as {type(exc).__name__}: {first_line})")
                lost.__cause__ = exc
                return lost, None
            # A whole node gone says nothing in the store: only its launcher's silence does
            # (asked after the reports above, which name a stopped or dead rank exactly).
            try:
                lost = nodes.silent_node(self.store) if nodes is not None else None
            except Exception:  # the store went with node 0: the next round says so
                lost = None
            if lost is not None:
                lost = PeerLost(f"{lost}\n(here it surfaced as {type(exc).__name__}: {first_line})", root_cause_rank=lost.root_cause_rank)
                lost.__cause__ = exc
                return lost, lost.root_cause_rank
            if time.monotonic() >= deadline:
                return exc, root_cause_rank
            time.sleep(0.02)

    def publish(self, exc: BaseException) -> None:
        """Name ``exc`` as the job-wide abort now (the first writer wins), before this rank
        does what may delay its end (a terminal-action broadcast)."""
        if self.store is not None:
            self._publish_abort(exc)

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
            self.store.compare_set(store_keys.ABORT, "", reason)
            self.store.add(store_keys.EVENTS, 1)
        except Exception:  # the store may be gone with the launcher; exiting matters more
            pass


def store_gone(exc: BaseException, *, for_s: float | None = None) -> str:
    """Why a rank ends when the store stops answering: whoever hosted it is gone."""
    since = f" {for_s:.1f}s ago" if for_s is not None else ""
    first = (str(exc).splitlines() or [""])[0][:200]
    return (
        f"the store stopped answering{since} ({type(exc).__name__}: {first}): "
        "whoever hosts it is gone (its launcher; on several nodes, node 0's runner)"
    )


def write_elastic_error(record: RankRecord) -> None:
    """Under torchrun, the rank's cause in torchelastic's error file (the format of its
    ``@record``), so that the agent's "Root Cause" names it too; best effort."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or record.ok:
        return
    data = {
        "message": {
            "message": f"{record.error_class}: {record.message}",
            "extraInfo": {"py_callstack": record.traceback, "timestamp": str(int(record.exited_at))},
        }
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def follow_abort(info: dict[str, Any], *, surfaced: str | None = None, here: str | None = None) -> HardeningError:
    """What a rank ends with when another rank published the job-wide abort ``info``.

    A peer's own failure is a PeerError naming that peer. A lost peer is a PeerLost naming
    the *lost* rank on every survivor, whichever of them noticed first: the root cause is
    the rank that died or froze, not the one that saw it."""
    tail = (f"\n(here it surfaced as {surfaced})" if surfaced else "") + (f"\n(this rank was {here})" if here else "")
    lost = info.get("root_cause_rank")
    if info.get("error") == "PeerLost" and lost is not None:
        return PeerLost(f"{info['message']} (noticed first by rank {info['rank']}){tail}", root_cause_rank=lost)
    if info.get("error") == "PeerError" and lost is not None and lost != info["rank"]:
        # The first to publish was itself following a peer (a mesh rank ended by its
        # leader's ERROR frame): the cause is that peer's.
        return PeerError(f"{info['message']} (reported first by rank {info['rank']}){tail}", root_cause_rank=lost)
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


_CURRENT: Terminator | None = None
_MAX_TRACEBACK_CHARS = 20_000


def _bounded(text: str) -> str:
    """A traceback's head and tail: a runaway recursion must not become a 100 kB record."""
    if len(text) <= _MAX_TRACEBACK_CHARS:
        return text
    half = _MAX_TRACEBACK_CHARS // 2
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters left out) ...\n{text[-half:]}"


def install(terminator: Terminator) -> None:
    """Make ``terminator`` the one :func:`record` ends this process through."""
    global _CURRENT
    _CURRENT = terminator


def record(fn: Callable[..., Any]) -> Callable[..., NoReturn]:
    """Decorate a rank's ``main``: however it ends (a return, a named cause, any other
    exception, Ctrl-C), the rank writes its final record and exits with the cause's exit
    code. Before a Session exists the record is still written (``HARDENING_RECORD``,
    else ``.hardening/records/rank<RANK>.json``), with no peers to tell."""

    @functools.wraps(fn)
    def main(*args: Any, **kwargs: Any) -> NoReturn:
        try:
            fn(*args, **kwargs)
        except SystemExit as exc:
            if exc.code not in (None, 0):  # sys.exit(0) is a clean end; any other code is not
                _terminator().end(exc)
        except BaseException as exc:  # noqa: BLE001 - every end is recorded, KeyboardInterrupt included
            _terminator().end(exc)
        _terminator().end(None)

    return main


def _terminator() -> Terminator:
    if _CURRENT is not None:
        return _CURRENT
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    path = Path(os.environ.get("HARDENING_RECORD") or Path(".hardening") / "records" / f"rank{rank}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Terminator(RankState(rank=rank, world_size=world, record_path=path), None)
