"""A small fork server for watchdog tests: imports torch.distributed and the watchdog
once, then forks one real rank process per request, so that a test pays ``import
torch`` once and not per rank.

Protocol, JSON lines. Test -> server: ``{"op": "spawn", "tag": ..., "cfg": {...}}``.
Server -> test: ``ready``, ``spawned`` (tag, pid), ``exited`` (pid, code, t). ``code`` is
``os.waitstatus_to_exitcode`` (negative: killed by that signal); ``t`` is ``time.time()``
right after ``waitpid`` (SIGCHLD wakes the loop). The server is a child subreaper, so an
orphaned grandchild (the parent-death scenario) is reaped and reported here too.

No orphans: the server dies with the test (PR_SET_PDEATHSIG) and on stdin EOF kills
every child; each child dies with the server (PR_SET_PDEATHSIG) except the parent-death
grandchild, whose own watchdog ends it; every rank's main thread is bounded (``max_s``).

A rank (cfg): rank, world_size, port, prefix, dir, heartbeat_s, peer_lost_s,
first_heartbeat_s, call_deadline_s, phase, action (idle | deadline | soft_call |
end_parity | intermediate), max_s.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    _libc.prctl(option, value, 0, 0, 0)


_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
TEST_PID = os.getppid()

from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.distributed as dist  # noqa: E402

from hardening.errors import ParityError  # noqa: E402
from hardening.runtime.records import RankState, Terminator  # noqa: E402
from hardening.runtime.watchdog import Watchdog  # noqa: E402


def _connect(cfg: dict[str, Any]) -> dist.Store:
    store = dist.TCPStore("127.0.0.1", cfg["port"], is_master=False, timeout=timedelta(seconds=10))
    return dist.PrefixStore(cfg["prefix"], store)


def stuck_in_collective_wait(seconds: float) -> None:
    """Where the deadline-bound main thread sits (the record must name it)."""
    time.sleep(seconds)


def _rank(cfg: dict[str, Any], *, parent_pid: int) -> None:
    """One rank: watchdog thread + a main thread doing ``cfg['action']``; never returns."""
    rank_dir = Path(cfg["dir"])
    rank_dir.mkdir(parents=True, exist_ok=True)
    for fd, name in ((1, "stdout.log"), (2, "stderr.log")):
        log = os.open(rank_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, fd)
        os.close(log)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    rank = cfg["rank"]
    store = _connect(cfg)
    state = RankState(rank=rank, world_size=cfg["world_size"], record_path=rank_dir / "record.json")
    state.on_phase = lambda phase: store.set(f"phase/{rank}", phase)
    terminator = Terminator(state, _connect(cfg))
    state.enter(cfg.get("phase", "steady"))
    Watchdog(
        state,
        terminator,
        _connect(cfg),
        heartbeat_s=cfg["heartbeat_s"],
        peer_lost_s=cfg["peer_lost_s"],
        first_heartbeat_s=cfg["first_heartbeat_s"],
        call_deadline_s=cfg.get("call_deadline_s", 0),
        parent_pid=parent_pid,
    ).start()
    action = cfg.get("action", "idle")
    max_s = cfg.get("max_s", 20)
    if action == "deadline":
        store.set(f"began/{rank}", repr(time.time()))
        state.begin_call(cfg.get("call_id", 7), deadline_bound=True)
        stuck_in_collective_wait(max_s)
    elif action == "soft_call":
        state.begin_call(cfg.get("call_id", 7), deadline_bound=False)
        stuck_in_collective_wait(max_s)
    elif action == "end_parity":
        time.sleep(cfg.get("after_s", 0.3))
        store.set(f"ending/{rank}", repr(time.time()))
        terminator.end(ParityError("parity: key 'torch.version' differs: rank 0 has 2.13, rank 1 has 2.12"))
    else:
        time.sleep(max_s)
    os._exit(3)  # bounded: nothing above ended the process


def _child(cfg: dict[str, Any], server_pid: int) -> None:
    try:
        os.setsid()
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        if cfg.get("action") == "intermediate":
            # Dies with the server; forks the real rank, whose parent it is, then waits.
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            me = os.getpid()
            pid = os.fork()
            if pid == 0:
                # No death signal here: this rank must notice its parent's death itself.
                _rank(dict(cfg, action="idle"), parent_pid=me)
            _connect(cfg).set(f"grandchild/{cfg['rank']}", str(pid))
            time.sleep(cfg.get("max_s", 20))
            os._exit(3)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server_pid:
            os._exit(11)
        _rank(cfg, parent_pid=server_pid)
    except BaseException:  # noqa: BLE001 - a child must never return into the server loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(10)


def _emit(out: Any, event: dict[str, Any]) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


def serve() -> None:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pending = b""
    _emit(out, {"event": "ready", "pid": os.getpid()})

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            _emit(out, {"event": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status), "t": time.time()})

    def children() -> list[int]:
        me, found = os.getpid(), []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                            found.append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        return found

    try:
        while True:
            ready, _, _ = select.select([0, wake_r], [], [], 1.0)
            if wake_r in ready:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            reap()
            if os.getppid() != TEST_PID:
                break
            if 0 not in ready:
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                if request.get("op") != "spawn":
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    for fd in (wake_r, wake_w, out.fileno()):
                        os.close(fd)
                    _child(request["cfg"], os.getppid())
                _emit(out, {"event": "spawned", "tag": request["tag"], "pid": pid, "t": time.time()})
    finally:
        for pid in children():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.time() + 5
        while children() and time.time() < deadline:
            reap()
            time.sleep(0.05)


if __name__ == "__main__":
    serve()
