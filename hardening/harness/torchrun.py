"""The torchrun launcher: each case under the real ``torch.distributed.run``.

``world.launcher: torchrun`` (``--launcher torchrun``) runs every case the way users run
their jobs: ``torch.distributed.run`` with c10d rendezvous, ``--max-restarts 0`` (a
restart would hide the fault under test), and the agent's store
(``TORCHELASTIC_USE_AGENT_STORE``) for every key the ranks and the runner exchange; each
rank's end also goes into torchelastic's error file. Per case:

1. the runner starts torchrun in a session of its own that dies with the runner
   (PDEATHSIG), and torchrun starts :mod:`hardening.harness.torchrun_rank` per rank,
   which forks the rank and reports on it;
2. a poller thread turns each rank's ``launch.json`` and ``exit.json`` into the fork
   server's ``spawned`` and ``exited`` events, so the runner watches, triages and tears
   down a torchrun case exactly as one of its own;
3. once the ranks have ended, the agent gets :data:`AGENT_EXIT_S` to exit by itself, then
   its session is ended (SIGTERM, grace, SIGKILL).

Multi-node (``--nnodes N --node-rank K --rdzv-endpoint HOST:PORT``): every node's runner
starts its own torchrun per case with the same rendezvous id; see
:mod:`hardening.harness.nodes` for how the runners keep in lockstep.

torchrun's agent store listens on every interface (torchrun's choice): the keys of a case
live under its random run id.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardening.harness.liveness import proc_state

AGENT_EXIT_S = 10.0
"""How long the agent may take to exit once its ranks have ended (its own reaping and
exit barrier) before the runner ends it."""

UNREAPED_S = 0.5
"""A rank gone this long with no ``exit.json`` died with its reaper (SIGKILL of the group)."""

# How torchrun starts: it must die with the runner (no orphaned agent), and '' (the cwd)
# must not shadow a module, as for the fork server.
_AGENT_BOOT = (
    "import os, sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "from hardening.harness.forkserver import set_parent_death_signal\n"
    "set_parent_death_signal()\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(11)\n"
    "from torch.distributed.run import main\n"
    "main(sys.argv[2:])\n"
)
_RANK_BOOT = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "from hardening.harness.torchrun_rank import main\n"
    "main(sys.argv[1], sys.argv[2])\n"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Rendezvous:
    """Where this node's torchrun meets the others."""

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str = ""
    """``HOST:PORT`` of the c10d rendezvous (multi-node); empty: ``--standalone``."""
    run_id: str = ""
    """The run's token (``--rdzv-id``), the same on every node; empty: node 0 makes one up."""

    @property
    def loopback(self) -> bool:
        return not self.endpoint or self.endpoint.rsplit(":", 1)[0] in ("127.0.0.1", "localhost")


def command(*, world_size: int, rdzv: Rendezvous, rdzv_id: str, case_dir: Path, profile_path: Path, join_s: float) -> list[str]:
    """The torchrun command line of one case on this node."""
    args = [sys.executable, "-c", _AGENT_BOOT, str(os.getpid())]
    args += ["--nnodes", str(rdzv.nnodes), "--nproc-per-node", str(world_size // rdzv.nnodes)]
    args += ["--max-restarts", "0", "--monitor-interval", "0.1", "--log-dir", str(case_dir / "torchrun")]
    if rdzv.nnodes == 1:
        args += ["--standalone"]  # c10d rendezvous on a free loopback port: no port to race for
    else:
        # Node 0's runner hosts the store at the endpoint for the whole run: every agent is
        # its client (torchrun's c10d rendezvous assigns node ranks itself: --node-rank is ignored).
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv.endpoint, "--rdzv-id", rdzv_id]
        args += ["--rdzv-conf", f"join_timeout={max(1, int(join_s))},is_host=false"]
    if rdzv.loopback:
        args += ["--local-addr", "127.0.0.1"]  # MASTER_ADDR: loopback, not whatever the host name resolves to
    return args + ["--no-python", sys.executable, "-c", _RANK_BOOT, str(case_dir), str(profile_path)]


@dataclass(kw_only=True)
class TorchrunCase:
    """One case's torchrun on this node, and the poller that reports its ranks."""

    command: list[str]
    env: dict[str, str]
    case_dir: Path
    events: "queue.Queue[dict[str, Any]]"
    tag: str
    """Put on every event: the runner's queue outlives the case, and a late event of an
    earlier case must not be taken for one of this case's ranks."""
    proc: subprocess.Popen[bytes] | None = None
    launched: dict[int, dict[str, Any]] = field(default_factory=dict)
    _ended: set[int] = field(default_factory=set)
    _gone: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _poller: threading.Thread | None = None

    @property
    def log(self) -> Path:
        return self.case_dir / "torchrun.log"

    def start(self) -> None:
        self.case_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,  # Ctrl-C reaches the runner only; it decides how ranks end
            )  # fmt: skip
        self._poller = threading.Thread(target=self._poll, name="hardening-torchrun", daemon=True)
        self._poller.start()

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self._scan()

    def _scan(self) -> None:
        for path in self.case_dir.glob("rank*/launch.json"):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # written atomically: only a stray file reads badly
            rank = int(info["rank"])
            if rank not in self.launched:
                self.launched[rank] = info
                self.events.put({"event": "spawned", "case": self.tag, **info})
        now = time.time()
        for rank, info in self.launched.items():
            if rank in self._ended:
                continue
            done = self.case_dir / f"rank{rank}" / "exit.json"
            if done.is_file():
                try:
                    ended = json.loads(done.read_text())
                except (OSError, ValueError):
                    continue
                self._ended.add(rank)
                self.events.put({"event": "exited", "case": self.tag, "pid": info["pid"], "status": ended["status"], "t": ended["t"]})
            elif proc_state(info["pid"]) in (None, "Z", "X"):
                # Its reaper cannot have written exit.json: the whole group was killed.
                since = self._gone.setdefault(rank, now)
                if now - since >= UNREAPED_S:
                    self._ended.add(rank)
                    self.events.put({"event": "exited", "case": self.tag, "pid": info["pid"], "status": signal.SIGKILL, "t": since})

    def finish(self, grace_s: float) -> int | None:
        """The agent's exit code once it is gone: it gets :data:`AGENT_EXIT_S`, then its
        session gets SIGTERM, ``grace_s`` and SIGKILL. Bounded; never raises."""
        proc = self.proc
        if proc is None:
            return None
        try:
            proc.wait(timeout=AGENT_EXIT_S)
        except subprocess.TimeoutExpired:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except OSError:
                    pass
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=2.0)
        self._scan()  # what the ranks wrote last (an exit the poller had not seen yet)
        return proc.poll()

    def kill_now(self) -> None:
        """End the agent's session at once (the runner is being torn down)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self._stop.set()
