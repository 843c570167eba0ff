"""Several nodes, one suite: how the runners of a multi-node run keep their cases in lockstep.

Every node runs ``hardening suite NAME --launcher torchrun --nnodes N --node-rank K
--rdzv-endpoint HOST:PORT`` with the same selection. Node 0's runner hosts one c10d store
at the endpoint for the whole run, and everything meets there:

- torchrun's c10d rendezvous of each case (its own rendezvous id; every agent is a client,
  ``is_host=false``);
- the ranks' keys: a store that outlives every rank and every agent, where a per-case
  agent store would die with whichever node's agent happened to host it;
- the runners themselves:

  ================== ======== ==========================================================
  ``nodes/plan``     node 0   the world and the cases, in order (and the run id, with no token)
  ``nodes/join/K``   node K   node K selected the same plan
  ``nodes/refused/K`` node K  node K selected another (what differs)
  ``nodes/beat/K``   node K   its runner's heartbeat, every :data:`BEAT_S`
  ``nodes/case/I/K`` node K   the results of node K's ranks in case I
  ================== ======== ==========================================================

Each node judges case I from every node's ranks, so every node prints the same table;
node 0 writes the reports. A node whose runner stops beating for :data:`GONE_S` is gone:
its ranks are missing from the case and the suite ends on the other nodes (the next
rendezvous could never complete).

Like torchrun's own, the store at the endpoint is not authenticated, and has no way to
list its keys: with ``--rdzv-id TOKEN`` (the same on every node) every key of the run,
the runners', the rendezvous' and the ranks', lives under that token, so nobody who does
not know it can write one (an abort, a result). Without it node 0 makes a run id up and
publishes it in ``nodes/plan``, where anyone who can reach the endpoint can read it.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict
from typing import Any, Callable

from hardening.harness.results import RankResult
from hardening.harness.torchrun import Rendezvous

BEAT_S = 0.2
GONE_S = 2.0
"""A runner that has not beaten this long is gone (its node's ranks with it)."""

NOT_PUBLISHED = "NodeLost"
"""The error class of a rank whose node never published its result."""


class NodesError(RuntimeError):
    """The nodes cannot run this suite together (a different selection, a node that never came)."""


class Nodes:
    """This runner's view of the other nodes' runners."""

    def __init__(self, rdzv: Rendezvous, *, connect: Callable[[str, int, bool], Any]) -> None:
        self.rdzv = rdzv
        host, _, port = rdzv.endpoint.rpartition(":")
        self.host, self.port = host, int(port)
        self._connect = connect
        """``connect(host, port, is_master)``: a store client (or the master, on node 0)."""
        self.store: Any = None
        self.run_id = ""
        self._beats: dict[int, tuple[bytes | None, float]] = {}
        self._stop = threading.Event()

    def _key(self, name: str) -> str:
        """The runners' keys live under the run's token, when the user gave one."""
        return f"nodes/{self.rdzv.run_id}/{name}" if self.rdzv.run_id else f"nodes/{name}"

    # -- lifecycle ---------------------------------------------------------------------

    def open(self, plan: dict[str, Any], *, timeout_s: float, progress: Callable[[str], None]) -> None:
        """Node 0: host the store and publish ``plan``; every other node: join it, check
        the plan is its own. Then wait (``timeout_s``) until every node has joined."""
        deadline = time.time() + timeout_s
        if self.rdzv.node_rank == 0:
            try:
                self.store = self._connect(self.host, self.port, True)
            except Exception as exc:  # the port is taken (another node 0?), or not this host's address
                raise NodesError(f"node 0 cannot listen on {self.rdzv.endpoint}: {exc}") from None
            self.run_id = self.rdzv.run_id or secrets.token_hex(6)
            published = plan if self.rdzv.run_id else {"run_id": self.run_id, **plan}
            self.store.set(self._key("plan"), json.dumps(published, sort_keys=True))
        else:
            self.store = self._join(deadline)
            theirs = json.loads(self._wait_key(self._key("plan"), deadline, "node 0's plan (the same --rdzv-id?)"))
            self.run_id = self.rdzv.run_id or theirs.pop("run_id", "")
            if theirs != json.loads(json.dumps(plan, sort_keys=True)):
                diff = sorted(k for k in set(plan) | set(theirs) if plan.get(k) != theirs.get(k))
                self.store.set(self._key(f"refused/{self.rdzv.node_rank}"), ", ".join(diff))
                raise NodesError(
                    f"node {self.rdzv.node_rank} selected a different run than node 0 ({', '.join(diff)} differ: "
                    f"here {json.dumps({k: plan.get(k) for k in diff})}, node 0 {json.dumps({k: theirs.get(k) for k in diff})}); "
                    "run the same suite, --only, --ranks and profile on every node"
                )
        self.store.set(self._key(f"join/{self.rdzv.node_rank}"), "1")
        threading.Thread(target=self._beat, name="hardening-nodes", daemon=True).start()
        waiting = [k for k in range(self.rdzv.nnodes)]
        said = 0.0
        while waiting:
            waiting = [k for k in waiting if not self.store.check([self._key(f"join/{k}")])]
            if not waiting:
                break
            for k in waiting:
                if self.store.check([self._key(f"refused/{k}")]):
                    raise NodesError(
                        f"node {k} selected a different run ({self.store.get(self._key(f'refused/{k}')).decode()} differ); "
                        "run the same suite, --only, --ranks and profile on every node"
                    )
            if time.time() > deadline:
                raise NodesError(f"node(s) {waiting} did not join at {self.rdzv.endpoint} within {timeout_s:g}s")
            if time.time() - said > 10:
                progress(f"waiting for node(s) {waiting} to join at {self.rdzv.endpoint} ...")
                said = time.time()
            time.sleep(0.1)

    def _join(self, deadline: float) -> Any:
        last: Exception | None = None
        while time.time() < deadline:
            try:
                return self._connect(self.host, self.port, False)
            except Exception as exc:  # node 0 is not up yet
                last = exc
                time.sleep(0.5)
        raise NodesError(f"cannot reach node 0 at {self.rdzv.endpoint}: {last}")

    def _wait_key(self, key: str, deadline: float, what: str) -> bytes:
        while time.time() < deadline:
            if self.store.check([key]):
                return self.store.get(key)
            time.sleep(0.1)
        raise NodesError(f"{what} did not appear at {self.rdzv.endpoint}")

    def close(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        seq = 0
        while not self._stop.wait(BEAT_S):
            seq += 1
            try:
                self.store.set(self._key(f"beat/{self.rdzv.node_rank}"), str(seq))
            except Exception:  # node 0 (the store) is gone: gone() says so to the main thread
                return

    # -- while the suite runs ------------------------------------------------------------

    def gone(self) -> list[int]:
        """Nodes whose runner stopped beating (all of them, once the store itself is gone)."""
        now = time.monotonic()
        others = [k for k in range(self.rdzv.nnodes) if k != self.rdzv.node_rank]
        try:
            values = [self.store.get(self._key(f"beat/{k}")) if self.store.check([self._key(f"beat/{k}")]) else None for k in others]
        except Exception:
            return [0] if self.rdzv.node_rank != 0 else others
        lost = []
        for k, value in zip(others, values):
            last, since = self._beats.get(k, (None, now))
            if value != last:
                self._beats[k] = (value, now)
            elif now - since > GONE_S:
                lost.append(k)
        return lost

    def publish(self, index: int, ranks: list[RankResult]) -> None:
        try:
            self.store.set(self._key(f"case/{index}/{self.rdzv.node_rank}"), json.dumps([asdict(r) for r in ranks], default=str))
        except Exception:  # node 0 is gone; the other nodes judge without us
            pass

    def gather(self, index: int, local: list[RankResult], *, world_size: int, timeout_s: float) -> tuple[list[RankResult], str | None]:
        """Every rank of case ``index``, ours and what every other node published, waiting
        up to ``timeout_s`` (less, for a node that is gone); and why a node's ranks are
        missing, if they are. A rank nobody published is a :data:`NOT_PUBLISHED` end."""
        ranks = {r.rank: r for r in local}
        waiting = [k for k in range(self.rdzv.nnodes) if k != self.rdzv.node_rank]
        deadline = time.time() + timeout_s
        why = f"no result within {timeout_s:g}s"
        while waiting:
            for k in list(waiting):
                key = self._key(f"case/{index}/{k}")
                try:
                    if self.store.check([key]):
                        for data in json.loads(self.store.get(key)):
                            ranks[data["rank"]] = RankResult(**data)
                        waiting.remove(k)
                except Exception:
                    why = "the store at node 0 is gone"
                    deadline = 0.0
            gone = [k for k in waiting if k in self.gone()]
            if gone:
                why = f"its runner stopped (no beat for {GONE_S:g}s)"
                break
            if not waiting or time.time() > deadline:
                break
            time.sleep(0.1)
        missing = [r for r in range(world_size) if r not in ranks]
        for rank in missing:
            ranks[rank] = RankResult(
                rank=rank, error_class=NOT_PUBLISHED, node=waiting[0] if len(waiting) == 1 else -1,
                message=f"rank {rank}'s node published no result for this case: {why}",
            )  # fmt: skip
        problem = f"node(s) {waiting} published no result for rank(s) {missing}: {why}" if missing else None
        return [ranks[r] for r in sorted(ranks)], problem
