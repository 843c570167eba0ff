"""The watchdog on real rank processes: heartbeats in a real TCPStore hosted here, real
SIGKILL / SIGSTOP, real exit codes and final records.

The ranks are forked by ``tests/procs/watchdog_ranks.py`` (one process that pays
``import torch`` once); each scenario uses its own store namespace. Every rank process
is bounded (its main thread ends itself after ``max_s``; it dies with the fork server)
and is SIGKILLed in ``finally`` if still there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch.distributed as dist

from hardening.errors import EXIT_PARENT_GONE, CallDeadlineExceeded, ParityError, PeerError, PeerLost
from hardening.runtime.store import report_exit

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(60)]

SERVER = Path(__file__).resolve().parent / "procs" / "watchdog_ranks.py"
HB = 0.05
PEER_LOST = 0.6


class Ranks:
    """Test side of the fork server: spawn, wait for exits, kill what is left."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
        self.log = open(tmp / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=SERVER.parent.parent.parent,
        )
        self.cond = threading.Condition()
        self.spawned: dict[str, int] = {}
        self.exited: dict[int, dict[str, Any]] = {}
        self.pids: set[int] = set()
        self.ready = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        with self.cond:
            ok = self.cond.wait_for(lambda: self.ready or self.proc.poll() is not None, timeout=40)
        assert ok and self.ready, f"fork server did not start: {(tmp / 'server.log').read_text(errors='replace')}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self.cond:
                if event["event"] == "ready":
                    self.ready = True
                elif event["event"] == "spawned":
                    self.spawned[event["tag"]] = event["pid"]
                    self.pids.add(event["pid"])
                elif event["event"] == "exited":
                    self.exited[event["pid"]] = event
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def store(self, prefix: str) -> dist.Store:
        return dist.PrefixStore(prefix, self.master)

    def cfg(self, prefix: str, rank: int, world_size: int = 2, **kw: Any) -> dict[str, Any]:
        cfg = {
            "rank": rank,
            "world_size": world_size,
            "port": self.master.port,
            "prefix": prefix,
            "dir": str(self.tmp / prefix / f"rank{rank}"),
            "heartbeat_s": HB,
            "peer_lost_s": PEER_LOST,
            "first_heartbeat_s": 5.0,
            "call_deadline_s": 0,
            "phase": "steady",
            "action": "idle",
            "max_s": 20,
        }
        cfg.update(kw)
        return cfg

    def spawn(self, cfg: dict[str, Any]) -> int:
        tag = f"{cfg['prefix']}/{cfg['rank']}/{cfg['action']}"
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": "spawn", "tag": tag, "cfg": cfg}) + "\n").encode())
        self.proc.stdin.flush()
        with self.cond:
            assert self.cond.wait_for(lambda: tag in self.spawned, timeout=10), f"no spawn of {tag}"
            return self.spawned[tag]

    def adopt(self, pid: int) -> None:
        with self.cond:
            self.pids.add(pid)

    def wait_exit(self, pid: int, timeout: float) -> dict[str, Any] | None:
        with self.cond:
            self.cond.wait_for(lambda: pid in self.exited, timeout=max(0.0, timeout))
            return self.exited.get(pid)

    def record(self, prefix: str, rank: int) -> dict[str, Any]:
        return json.loads((self.tmp / prefix / f"rank{rank}" / "record.json").read_text())

    def logs(self, prefix: str, rank: int) -> str:
        path = self.tmp / prefix / f"rank{rank}" / "stderr.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def kill_left(self) -> None:
        for pid in list(self.pids):
            if pid not in self.exited:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.kill_left()
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        finally:
            self.reader.join(timeout=5)
            # The server is gone: kill directly any rank it could not (none expected).
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.log.close()
            del self.master


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ranks]:
    r = Ranks(tmp_path_factory.mktemp("watchdog"))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def cleanup(ranks: Ranks) -> Iterator[None]:
    try:
        yield
    finally:
        ranks.kill_left()


def wait_heartbeats(store: dist.Store, world: list[int], *, seq: int = 4, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [
            json.loads(store.get(f"hb/{r}"))["seq"] if store.check([f"hb/{r}"]) else 0
            for r in world
        ]
        if min(seen) >= seq:
            return
        time.sleep(0.02)
    raise AssertionError(f"heartbeats of ranks {world} did not reach seq {seq} in {timeout}s: {seen}")


def exit_of(ranks: Ranks, pid: int, timeout: float, what: str) -> dict[str, Any]:
    event = ranks.wait_exit(pid, timeout)
    assert event is not None, f"{what} (pid {pid}) still running after {timeout:.1f}s"
    return event


# -- (1) a peer killed by SIGKILL: its heartbeat goes stale ----------------------------------


def test_killed_peer_is_peer_lost(ranks: Ranks, cleanup: None) -> None:
    p = "lost"
    store = ranks.store(p)
    r0 = ranks.spawn(ranks.cfg(p, 0))
    r1 = ranks.spawn(ranks.cfg(p, 1))
    wait_heartbeats(store, [0, 1])
    t0 = time.time()
    os.kill(r1, signal.SIGKILL)
    ev0 = exit_of(ranks, r0, PEER_LOST + 2 * HB + 3, "survivor")
    dt = ev0["t"] - t0
    assert ev0["code"] == PeerLost.exit_code == 27, ranks.logs(p, 0)
    # Not before the heartbeat could have gone stale (slack: the victim's last beat may be late).
    assert PEER_LOST - 0.3 <= dt <= PEER_LOST + 2 * HB + 1.0, dt
    assert exit_of(ranks, r1, 2, "killed rank")["code"] == -signal.SIGKILL
    rec = ranks.record(p, 0)
    assert rec["error_class"] == "PeerLost" and rec["exit_code"] == 27 and rec["ok"] is False
    assert rec["rank"] == 0 and rec["pid"] == r0 and rec["phase"] == "steady"
    assert "rank 1 lost: no heartbeat for" in rec["message"] and "phase steady" in rec["message"]
    # The survivor published the job-wide abort naming itself and the cause.
    abort = json.loads(store.get("abort"))
    assert abort["rank"] == 0 and abort["error"] == "PeerLost" and "rank 1" in abort["message"]


# -- (2) a death the launcher reports: no waiting for the heartbeat to go stale -------------


def test_launcher_reported_death_is_peer_lost_at_once(ranks: Ranks, cleanup: None) -> None:
    p = "exit"
    hb, slow = 0.1, 15.0  # heartbeat staleness alone would take 15 s
    store = ranks.store(p)
    r0 = ranks.spawn(ranks.cfg(p, 0, heartbeat_s=hb, peer_lost_s=slow, first_heartbeat_s=slow))
    r1 = ranks.spawn(ranks.cfg(p, 1, heartbeat_s=hb, peer_lost_s=slow, first_heartbeat_s=slow))
    wait_heartbeats(store, [0, 1], seq=3)
    os.kill(r1, signal.SIGKILL)
    assert exit_of(ranks, r1, 2, "killed rank")["code"] == -signal.SIGKILL
    time.sleep(3 * hb)
    assert ranks.wait_exit(r0, 0) is None  # not yet told: still waiting on the heartbeat
    t0 = time.time()
    report_exit(store, 1, -9, "killed by SIGKILL")
    ev0 = exit_of(ranks, r0, 5, "survivor")
    assert ev0["code"] == 27, ranks.logs(p, 0)
    assert ev0["t"] - t0 <= 2 * hb + 1.0, ev0["t"] - t0
    rec = ranks.record(p, 0)
    assert rec["error_class"] == "PeerLost"
    assert "rank 1 died (killed by SIGKILL, reported by the launcher)" in rec["message"]


# -- (3) the call deadline ------------------------------------------------------------------


def test_call_deadline_names_where_the_main_thread_is(ranks: Ranks, cleanup: None) -> None:
    p = "deadline"
    deadline = 0.5
    store = ranks.store(p)
    r0 = ranks.spawn(ranks.cfg(p, 0, action="deadline", call_deadline_s=deadline, call_id=7, peer_lost_s=5.0))
    # Rank 1 runs a call that is not deadline-bound for just as long: it must not fire.
    r1 = ranks.spawn(ranks.cfg(p, 1, action="soft_call", call_deadline_s=deadline, call_id=7, peer_lost_s=5.0))
    ev0 = exit_of(ranks, r0, 10, "rank past its deadline")
    assert ev0["code"] == CallDeadlineExceeded.exit_code == 28, ranks.logs(p, 0)
    began = float(store.get("began/0"))
    assert deadline <= ev0["t"] - began <= deadline + 2 * HB + 1.0, ev0["t"] - began
    rec = ranks.record(p, 0)
    assert rec["error_class"] == "CallDeadlineExceeded" and rec["last_call_id"] == 7
    msg = rec["message"]
    assert "call 7 has run" in msg and "past the 0.5s call deadline" in msg
    assert "main thread in stuck_in_collective_wait (watchdog_ranks.py:" in msg, msg
    # The peer follows the abort: PeerError naming rank 0 and the cause, not a deadline of its own.
    ev1 = exit_of(ranks, r1, 5, "peer")
    assert ev1["code"] == PeerError.exit_code == 29, ranks.logs(p, 1)
    rec1 = ranks.record(p, 1)
    assert rec1["error_class"] == "PeerError" and rec1["root_cause_rank"] == 0
    assert "rank 0 failed first: CallDeadlineExceeded" in rec1["message"]


# -- (4) abort propagation -------------------------------------------------------------------


def test_abort_propagates_as_peer_error(ranks: Ranks, cleanup: None) -> None:
    p = "abort"
    hb = 0.1
    store = ranks.store(p)
    r0 = ranks.spawn(ranks.cfg(p, 0, action="end_parity", after_s=0.8, heartbeat_s=hb))
    r1 = ranks.spawn(ranks.cfg(p, 1, heartbeat_s=hb))
    ev0 = exit_of(ranks, r0, 10, "failing rank")
    assert ev0["code"] == ParityError.exit_code == 20, ranks.logs(p, 0)
    ev1 = exit_of(ranks, r1, 5, "peer")
    assert ev1["code"] == PeerError.exit_code == 29, ranks.logs(p, 1)
    ending = float(store.get("ending/0"))  # just before rank 0 published the abort
    dt = ev1["t"] - ending
    # It gives its own main thread two beats to report first, then follows within ~3.
    assert 2 * hb <= dt <= 3 * hb + 1.0, dt
    rec0, rec1 = ranks.record(p, 0), ranks.record(p, 1)
    assert rec0["error_class"] == "ParityError" and rec0["exit_code"] == 20
    assert rec1["error_class"] == "PeerError" and rec1["exit_code"] == 29 and rec1["root_cause_rank"] == 0
    assert "rank 0 failed first: ParityError: parity: key 'torch.version' differs" in rec1["message"]
    abort = json.loads(store.get("abort"))
    assert abort == {"rank": 0, "error": "ParityError", "message": rec0["message"], "root_cause_rank": None}


def test_a_lost_peer_is_peer_lost_on_every_survivor_naming_the_lost_rank(ranks: Ranks, cleanup: None) -> None:
    # 3 ranks; rank 2 freezes. Only rank 0 can notice in time (rank 1's own budget is
    # 30 s), so rank 1 learns it from rank 0's abort: it must still end PeerLost naming
    # rank 2, not PeerError naming rank 0, which merely noticed first.
    p = "lost3"
    store = ranks.store(p)
    r0 = ranks.spawn(ranks.cfg(p, 0, 3))
    r1 = ranks.spawn(ranks.cfg(p, 1, 3, peer_lost_s=30.0))
    r2 = ranks.spawn(ranks.cfg(p, 2, 3))
    wait_heartbeats(store, [0, 1, 2])
    os.kill(r2, signal.SIGSTOP)
    try:
        assert exit_of(ranks, r0, PEER_LOST + 2 * HB + 3, "observer")["code"] == PeerLost.exit_code, ranks.logs(p, 0)
        assert exit_of(ranks, r1, 4 * HB + 3, "follower")["code"] == PeerLost.exit_code, ranks.logs(p, 1)
    finally:
        os.kill(r2, signal.SIGKILL)
    rec0, rec1 = ranks.record(p, 0), ranks.record(p, 1)
    assert rec0["error_class"] == rec1["error_class"] == "PeerLost"
    assert rec0["root_cause_rank"] == rec1["root_cause_rank"] == 2
    assert rec0["message"].startswith("rank 2 lost: no heartbeat")
    assert rec1["message"].startswith("rank 2 lost: no heartbeat") and "(noticed first by rank 0)" in rec1["message"]
    assert json.loads(store.get("abort"))["root_cause_rank"] == 2
    assert exit_of(ranks, r2, 5, "frozen rank")["code"] == -signal.SIGKILL


# -- (5) a frozen peer in a slow phase gets the setup budget, in steady state peer_lost -------


def test_frozen_peer_budget_depends_on_its_phase(ranks: Ranks, cleanup: None) -> None:
    first = 2.5
    pa, pb = "frozen-warmup", "frozen-steady"
    sa, sb = ranks.store(pa), ranks.store(pb)
    a0 = ranks.spawn(ranks.cfg(pa, 0, first_heartbeat_s=first))
    a1 = ranks.spawn(ranks.cfg(pa, 1, first_heartbeat_s=first, phase="warmup"))
    b0 = ranks.spawn(ranks.cfg(pb, 0, first_heartbeat_s=first))
    b1 = ranks.spawn(ranks.cfg(pb, 1, first_heartbeat_s=first, phase="steady"))
    wait_heartbeats(sa, [0, 1])
    wait_heartbeats(sb, [0, 1])
    assert sa.get("phase/1") == b"warmup" and sb.get("phase/1") == b"steady"
    t0 = time.time()
    os.kill(a1, signal.SIGSTOP)
    os.kill(b1, signal.SIGSTOP)
    try:
        evb = exit_of(ranks, b0, PEER_LOST + 2 * HB + 3, "observer of the steady peer")
        assert evb["code"] == 27, ranks.logs(pb, 0)
        assert PEER_LOST - 0.3 <= evb["t"] - t0 <= PEER_LOST + 2 * HB + 1.0, evb["t"] - t0
        assert "last seen in phase steady" in ranks.record(pb, 0)["message"]
        # Well past peer_lost, the warmup peer is still given its time.
        assert ranks.wait_exit(a0, t0 + 1.6 - time.time()) is None, ranks.record(pa, 0)
        assert time.time() - t0 >= 1.5
        eva = exit_of(ranks, a0, first + 5, "observer of the warmup peer")
        assert eva["code"] == 27, ranks.logs(pa, 0)
        assert first - 0.3 <= eva["t"] - t0 <= first + 2 * HB + 1.0, eva["t"] - t0
        msg = ranks.record(pa, 0)["message"]
        assert "rank 1 lost" in msg and "(> 2.5s)" in msg and "last seen in phase warmup" in msg
    finally:
        for pid in (a1, b1):
            os.kill(pid, signal.SIGKILL)
    assert exit_of(ranks, a1, 5, "frozen rank")["code"] == -signal.SIGKILL
    assert exit_of(ranks, b1, 5, "frozen rank")["code"] == -signal.SIGKILL


# -- (6) the parent (launcher) dies ---------------------------------------------------------


def _orphan(ranks: Ranks, prefix: str, rank: int, world_size: int) -> tuple[int, int]:
    """(intermediate pid, rank pid): the rank is the intermediate's child, watching it."""
    store = ranks.store(prefix)
    mid = ranks.spawn(ranks.cfg(prefix, rank, world_size, action="intermediate"))
    store.wait([f"grandchild/{rank}"], timedelta(seconds=10))
    pid = int(store.get(f"grandchild/{rank}"))
    ranks.adopt(pid)
    return mid, pid


def test_parent_death_ends_the_rank_with_code_11(ranks: Ranks, cleanup: None) -> None:
    p = "orphan"
    store = ranks.store(p)
    mid, rank = _orphan(ranks, p, 0, 1)
    wait_heartbeats(store, [0])
    assert ranks.wait_exit(rank, 0) is None
    t0 = time.time()
    os.kill(mid, signal.SIGKILL)
    assert exit_of(ranks, mid, 5, "intermediate")["code"] == -signal.SIGKILL
    ev = exit_of(ranks, rank, 2 * HB + 3, "orphaned rank")
    assert ev["code"] == EXIT_PARENT_GONE == 11, ranks.logs(p, 0)
    assert ev["t"] - t0 <= 2 * HB + 1.0, ev["t"] - t0
    rec = ranks.record(p, 0)
    assert rec["exit_code"] == 11 and rec["ok"] is False and rec["error_class"] is None and rec["pid"] == rank
    assert not store.check(["abort"])  # a launcher death is not a rank's fault to publish


def test_peer_of_a_parent_gone_rank_is_told(ranks: Ranks, cleanup: None) -> None:
    p = "orphan-peer"
    store = ranks.store(p)
    mid, rank1 = _orphan(ranks, p, 1, 2)
    r0 = ranks.spawn(ranks.cfg(p, 0))
    wait_heartbeats(store, [0, 1])
    os.kill(mid, signal.SIGKILL)
    ev = exit_of(ranks, rank1, 2 * HB + 3, "orphaned rank")
    assert ev["code"] == 11
    # What the launcher does on every rank exit:
    report_exit(store, 1, 11, "exit code 11")
    ev0 = ranks.wait_exit(r0, PEER_LOST + 2 * HB + 1.5)
    assert ev0 is not None and ev0["code"] == PeerLost.exit_code, (
        f"rank 0 still running {PEER_LOST + 2 * HB + 1.5:.1f}s after rank 1 ended with code 11; "
        f"done/1={store.get('done/1') if store.check(['done/1']) else None!r}"
    )


# -- (7) store load: a constant number of requests per tick, whatever the world size --------


class _CountingStore:
    """A real store that counts the requests made through it."""

    def __init__(self, store: dist.Store) -> None:
        self._store, self.calls = store, []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)

        return call


@pytest.mark.parametrize("vouched", [False, True], ids=["heartbeats-only", "launcher-vouches"])
def test_steady_ticks_cost_a_constant_number_of_store_requests_at_any_world_size(tmp_path: Path, vouched: bool) -> None:
    from hardening.runtime.records import RankState, Terminator
    from hardening.runtime.watchdog import Watchdog

    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    for world in (2, 8):
        store = dist.PrefixStore(f"w{world}", master)
        for r in range(1, world):
            store.set(f"hb/{r}", json.dumps({"seq": 1, "phase": "steady", "call_id": 0}))
        for r in range(world) if vouched else ():
            store.set(f"alive/{r}", json.dumps({"seq": 1, "state": "S", "node": 0, "host": "h"}))
        counting = _CountingStore(store)
        state = RankState(rank=0, world_size=world, record_path=tmp_path / f"record{world}.json")
        wd = Watchdog(state, Terminator(state, store), counting, heartbeat_s=0.2, peer_lost_s=3,
                      first_heartbeat_s=60, call_deadline_s=0, clock=lambda: 100.0)  # fmt: skip
        wd._tick()  # first tick: reads the events and each peer's first heartbeat key by key
        counting.calls.clear()
        for _ in range(5):
            wd._tick()
        # Per tick: own heartbeat, the events counter, one multi-get of every peer's heartbeat
        # and launcher vouch (without a launcher that vouches: one check whether one does now).
        expected = ["set", "add", "multi_get"] if vouched else ["set", "add", "check", "multi_get"]
        assert counting.calls == expected * 5, (world, counting.calls)
        # A new event (a peer's clean end) is read once, then the ticks are cheap again.
        store.set("done/1", "1")
        store.add("events", 1)
        counting.calls.clear()
        wd._tick()
        assert "check" in counting.calls and wd._done == {1}
        counting.calls.clear()
        wd._tick()
        steady = ["multi_get"] if vouched else ["check", "multi_get"]
        assert counting.calls == ["set", "add"] + (steady if world > 2 else []), counting.calls


# -- (8) launcher vouches: a busy peer is never lost on its heartbeat, a silent node is ------


class _Ended(Exception):
    pass


def _vouch_watchdog(tmp_path: Path, store: dist.Store, now: list[float], world: int = 3) -> Any:
    from hardening.runtime.records import RankState, Terminator
    from hardening.runtime.watchdog import Watchdog

    class Ends(Terminator):
        def end(self, exc: BaseException | None, **_: Any) -> Any:  # type: ignore[override]
            raise _Ended(exc)

    state = RankState(rank=0, world_size=world, record_path=tmp_path / "record.json")
    return Watchdog(state, Ends(state, store), store, heartbeat_s=0.2, peer_lost_s=3, first_heartbeat_s=60,
                    call_deadline_s=0, node_lost_s=0.6, clock=lambda: now[0])  # fmt: skip


def _vouch(store: dist.Store, rank: int, node: int, seq: int) -> None:
    store.set(f"alive/{rank}", json.dumps({"seq": seq, "state": "S", "node": node, "host": f"host{node}"}))


def test_a_vouched_peer_is_never_lost_on_its_heartbeat_but_a_silent_node_is(tmp_path: Path) -> None:
    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    store = dist.PrefixStore("vouch", master)
    for r in (1, 2, 3):
        store.set(f"hb/{r}", json.dumps({"seq": 1, "phase": "steady", "call_id": 3}))
    now = [100.0]
    wd = _vouch_watchdog(tmp_path, store, now, world=4)
    nodes = {0: 0, 1: 0, 2: 1, 3: 1}  # this rank and rank 1 on node 0; ranks 2 and 3 on node 1
    # Their own heartbeats never change; their launchers vouch on.
    for seq in range(1, 40):
        for r, node in nodes.items():
            _vouch(store, r, node, seq)
        wd._tick()
        now[0] += 0.2  # 7.8 s in all: past peer_lost (3 s) for every heartbeat
    # Node 1's launcher stops vouching for rank 2 only (as after reporting it stopped):
    # node 1 is not silent while it still vouches for rank 3.
    for seq in range(40, 60):
        for r in (0, 1, 3):
            _vouch(store, r, nodes[r], seq)
        wd._tick()
        now[0] += 0.2
    # Then node 1's launcher stops altogether.
    silent_since = now[0] - 0.2  # the tick that saw its last vouch
    with pytest.raises(_Ended) as ended:
        for seq in range(60, 80):
            _vouch(store, 0, 0, seq), _vouch(store, 1, 0, seq)
            wd._tick()
            now[0] += 0.2
    lost = ended.value.args[0]
    assert isinstance(lost, PeerLost) and lost.root_cause_rank == 2
    assert str(lost).startswith("ranks 2, 3 lost: node 1 (host1) went silent, no word from its launcher for")
    assert 0.6 <= now[0] - silent_since <= 0.6 + 0.2 + 1e-6  # at the first tick past node_lost


def test_this_ranks_own_node_going_silent_is_not_a_peer_lost(tmp_path: Path) -> None:
    # One host: the launcher's end is this rank's end too (parent death), not a peer's loss.
    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    store = dist.PrefixStore("own", master)
    for r in (0, 1, 2):
        _vouch(store, r, 0, 1)
    now = [100.0]
    wd = _vouch_watchdog(tmp_path, store, now)
    for _ in range(30):
        wd._tick()
        now[0] += 0.2


# -- (9) SIGTERM: taken over only where it displaces nothing ---------------------------------


def test_sigterm_is_taken_over_only_where_nothing_else_listens() -> None:
    import signal

    from hardening.runtime.watchdog import TermSignal

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        term = TermSignal()
        assert term.install() and not term.poll()
        os.kill(os.getpid(), signal.SIGTERM)  # the do-nothing handler runs; the process goes on
        assert _wait_for(term.poll, 2)
        term.uninstall()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.set_wakeup_fd(-1) == -1

        def own(*_: Any) -> None:
            pass

        signal.signal(signal.SIGTERM, own)  # the program's own handler stays
        assert not TermSignal().install() and signal.getsignal(signal.SIGTERM) is own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)  # an event loop's wakeup fd stays
        try:
            assert not TermSignal().install() and signal.set_wakeup_fd(w) == w
        finally:
            signal.set_wakeup_fd(-1)
            os.close(r), os.close(w)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_for(predicate: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False
