"""The runner: launch the ranks of each case, watch them, and turn what happened into data.

One runner per suite invocation (per node, on several). It hosts the c10d store (so the
store outlives every rank), starts one fork server (so ``import torch`` is paid once),
and runs cases one after another; with ``world.launcher: torchrun`` each case runs under
torchrun instead (:mod:`hardening.harness.torchrun`), its ranks reported through the same
events, and on several nodes the runners keep in lockstep (:mod:`hardening.harness.nodes`).
Its liveness observer vouches for every rank it launched, from outside the rank
(:mod:`hardening.harness.liveness`). Per case it waits on every rank under three deadlines (setup, detect,
case); at a deadline it dumps every live rank with py-spy, then SIGTERM -> grace ->
SIGKILL of each rank's whole session. A timeout is data (outcome ``hung``), never an
exception. A stop request (Ctrl-C, SIGTERM, SIGHUP: :mod:`hardening.harness.interrupt`) is
polled at each tick and tears the ranks down the same way; the suite result the caller
holds keeps every finished case.

Nothing here runs user code: the region target is imported once, in a child forked by
the fork server, under the setup deadline (:meth:`Runner.check_target`). The store
listens on loopback only and the ranks' gloo is pinned to the loopback interface.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import yaml

from hardening.harness import artifacts, checkers, judge, triage
from hardening.harness.liveness import Observer, proc_state
from hardening.harness.nodes import Nodes, NodesError
from hardening.harness.torchrun import Rendezvous, TorchrunCase
from hardening.harness.torchrun import command as torchrun_command
from hardening.harness.cases import WORKLOAD_ENV, Case
from hardening.errors import CAUSE_BY_EXIT_CODE
from hardening.harness.interrupt import StopRequest
from hardening.runtime import store as store_keys
from hardening.runtime.records import RankRecord
from hardening.harness.profile import Profile, profile_to_dict
from hardening.harness.results import NO_RECORD, TORN_DOWN, CaseResult, Outcome, RankResult, SuiteResult, Verdict

# How the fork server starts: ``python -c`` puts '' (the cwd) first on sys.path, as
# ``-m`` puts the cwd; drop it before the first import, so that a numpy.py or yaml.py
# in the user's directory never runs inside the server or a rank. (-P does the same,
# but only from Python 3.11.)
_SERVER_BOOT = (
    "import json, sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "from hardening.harness.forkserver import serve\n"
    "serve(json.loads(sys.argv[1]))\n"
)


ATTACH_S = 10.0
"""Bound on connecting to a torchrun case's store (its agent may be ending already)."""

SERVER_START_S = 180.0
"""Bound on the fork server's start (``import torch`` on a loaded 2-core box)."""


class HarnessError(RuntimeError):
    """The harness itself could not do its job (fork server died, store unusable)."""


class TargetError(ValueError):
    """The region target cannot be used: its import failed, hung or killed the process."""


@dataclasses.dataclass(kw_only=True, slots=True)
class _Live:
    """Book-keeping of one launched case."""

    case: Case
    prefix: str
    case_dir: Path
    launched: float
    store: Any = None
    """A client of the store this case's ranks use, in their namespace (the runner's own;
    under torchrun the agent's, once the first rank says where it is)."""
    pids: dict[int, int] = dataclasses.field(default_factory=dict)
    groups: dict[int, int] = dataclasses.field(default_factory=dict)
    """Each rank's process group, which the runner signals (under torchrun: its reaper's)."""
    error_files: dict[int, str] = dataclasses.field(default_factory=dict)
    """torchelastic's error file of each rank (torchrun)."""
    torchrun: TorchrunCase | None = None
    seen: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)
    """Every per-rank store key read so far, by kind: what the runner knows once the store
    is gone (torchrun's agent, and its store, exit with the last rank)."""
    final: bool = False
    """The store is no longer read: its keys are as ``seen`` holds them."""
    exits: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)
    hung: set[int] = dataclasses.field(default_factory=set)
    torn_down: dict[int, str] = dataclasses.field(default_factory=dict)
    """Ranks the runner itself ended, and why (their signal is ours, not a finding)."""
    deadline_reason: str = ""
    dumps: dict[int, triage.StackDump] = dataclasses.field(default_factory=dict)
    interrupted: bool = False
    teardown_at: float | None = None
    """When the runner began ending ranks itself: what they record after that is our doing."""


class Runner:
    """Runs cases on ``profile.world.ranks`` processes; use as a context manager."""

    def __init__(
        self,
        profile: Profile,
        *,
        run_dir: Path,
        progress: Callable[[str], None] | None = None,
        stop: StopRequest | None = None,
        checks: list[Callable[[CaseResult], None]] | None = None,
    ) -> None:
        self.profile = profile
        self.checks = list(checks or [])
        """Checkers of each judged case beyond its expectation (a baseline gate), run before
        its artifacts are kept or dropped: one may fail a case, which then keeps them."""
        self.run_dir = run_dir
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stop = stop or StopRequest()
        self.world_size = profile.world.ranks
        w = profile.world
        self.torchrun = w.launcher == "torchrun"
        self.rendezvous = Rendezvous(nnodes=w.nnodes, node_rank=w.node_rank, endpoint=w.rdzv_endpoint, run_id=w.rdzv_id)
        self.local_count = self.world_size // w.nnodes
        """Ranks this runner launches and watches (all of them, but on one of several nodes)."""
        self._token = secrets.token_hex(6)
        self.nodes = None if w.nnodes == 1 else Nodes(self.rendezvous, connect=self._node_store)
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._server: subprocess.Popen[bytes] | None = None
        self._server_gone = False
        self._store: Any = None
        self._observer = Observer(node=profile.world.node_rank)
        self._observer_store: Any = None
        self._case_seq = 0
        self.startup_s = 0.0

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> "Runner":
        started = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.profile_path = self.run_dir / "profile.yaml"
        data = profile_to_dict(self.profile)
        data.pop("name"), data.pop("source")
        self.profile_path.write_text(yaml.safe_dump(data, sort_keys=False))
        # The server imports torch while this process does the same for the store.
        self._start_server()
        self._store = loopback_store(self.profile.timeouts.pg)
        self._observer_store = store_keys.connect("127.0.0.1", self._store.port, timeout_s=self.profile.timeouts.pg)
        self._observer.start()
        self._wait_ready()
        self.startup_s = time.time() - started
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._observer.close()
        if self.nodes is not None:
            self.nodes.close()
        server, self._server = self._server, None
        if server is None:
            return
        try:
            if server.stdin:
                server.stdin.close()  # EOF: the server kills any rank left and exits
            server.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            server.kill()
            server.wait(timeout=10)

    def _start_server(self) -> None:
        log = open(self.run_dir / "forkserver.log", "wb")
        env = dict(os.environ)
        # One host: gloo listens on loopback, whatever the host name resolves to.
        env["GLOO_SOCKET_IFNAME"] = loopback_interface()
        self._server = subprocess.Popen(
            [sys.executable, "-c", _SERVER_BOOT, json.dumps(self.profile.world.preload)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the runner only; it decides how ranks end
        )
        log.close()
        threading.Thread(target=self._read_events, name="hardening-events", daemon=True).start()

    def _read_events(self) -> None:
        assert self._server is not None and self._server.stdout is not None
        for line in self._server.stdout:
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._events.put({"event": "eof"})

    def _wait_ready(self) -> None:
        # The server's own start (import torch) is the harness's cost, not the case's:
        # a short `setup` in a profile must not fail it. Stop requests still cut it short.
        bound = max(self.profile.timeouts.setup, SERVER_START_S)
        deadline = time.time() + bound
        while time.time() < deadline and not self.stop.requested:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            if event["event"] == "ready":
                return
            if event["event"] == "eof":
                self._server_gone = True
                raise HarnessError(f"fork server died at start; see {self.run_dir / 'forkserver.log'}")
        if not self.stop.requested:
            raise HarnessError(f"fork server not ready after {bound:g}s")

    # -- the target, imported once where a deadline applies ----------------------------

    def check_target(self, target: str, *, flag: str) -> None:
        """Import the region target in a child of the fork server, under the setup
        deadline; :class:`TargetError` (a usage error) names what went wrong.

        The import runs user code: it may block, exit or crash. None of that may happen
        in this process, and a block is triaged like a hung rank (stacks, then kill)."""
        if self.stop.requested:
            return
        out = self.run_dir / "target" / "check.json"
        log = self.run_dir / "target" / "import.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        pid = self._request({"op": "check_target", "target": target, "out": str(out), "log": str(log)}, "check_started")
        deadline = time.time() + self.profile.timeouts.setup
        status = None
        while status is None and time.time() < deadline and not self.stop.requested:
            status = self._wait_exit(pid, 0.1)
        if status is None:
            where = ""
            if not self.stop.requested:
                where = self._where(pid, out.parent)
            _kill_session(pid)
            self._wait_exit(pid, 10.0)  # reaped by the server; bounded whatever happens
            if self.stop.requested:
                return
            raise TargetError(
                f"{flag} {target}: importing it did not finish within the {self.profile.timeouts.setup:g}s setup "
                f"deadline{where}; it was killed (its output: {log})"
            )
        code = os.waitstatus_to_exitcode(status)
        verdict = _read_json(out)
        if verdict is not None and verdict.get("ok") and code == 0:
            return
        if verdict is not None and not verdict.get("ok"):
            raise TargetError(f"{flag} {target}: {verdict.get('error')}")
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise TargetError(f"{flag} {target}: importing it ended the process ({how}) before it returned (its output: {log})")

    def _request(self, request: dict[str, Any], tag: str) -> int:
        """Send one request to the fork server; the pid of the child it forked."""
        assert self._server is not None and self._server.stdin is not None
        try:
            self._server.stdin.write((json.dumps(request) + "\n").encode())
            self._server.stdin.flush()
        except OSError as exc:
            self._server_gone = True
            raise HarnessError(f"fork server is gone: {exc}") from None
        end = time.time() + self.profile.timeouts.setup
        while time.time() < end:
            event = self._next_event(0.2)
            if event is not None and event["event"] == tag:
                return int(event["pid"])
        raise HarnessError(f"fork server did not answer a {request['op']} request within {self.profile.timeouts.setup:g}s")

    def _next_event(self, timeout: float) -> dict[str, Any] | None:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if event["event"] == "eof":
            self._server_gone = True
            raise HarnessError(f"fork server died; see {self.run_dir / 'forkserver.log'}")
        return event

    def _wait_exit(self, pid: int, timeout: float) -> int | None:
        """The wait status of ``pid`` once the server reports its exit, else None."""
        end = time.time() + timeout
        while True:
            event = self._next_event(max(0.0, end - time.time()))
            if event is not None and event["event"] == "exited" and event["pid"] == pid:
                return int(event["status"])
            if time.time() >= end:
                return None

    def _where(self, pid: int, out_dir: Path) -> str:
        """``; it is at <frame>`` from one py-spy dump of ``pid``, when triage can."""
        if not self.profile.triage.py_spy or triage.ptrace_problem():
            return ""
        dumps = triage.dump_all({"target": pid}, out_dir=str(out_dir), native=False, timeout=self.profile.triage.timeout)
        dump = dumps.get("target")
        if dump is None or not dump.ok:
            return ""
        return f"; it is at {dump.where or dump.innermost} (stacks: {dump.path})"

    # -- suite -----------------------------------------------------------------------

    def run_suite(self, result: SuiteResult, cases: list[Case]) -> SuiteResult:
        """Run ``cases`` in order, appending each to ``result`` as soon as it ends: the
        caller's object holds every finished case whatever stops the run."""
        result.environment.update(environment(self.profile))
        result.environment["startup_s"] = round(self.startup_s, 2)
        started = time.time()
        ids = [c.id for c in cases]
        by_suite = len(set(ids)) < len(ids)  # `all` has a control per suite: one directory each
        try:
            if self.nodes is not None:
                try:
                    self.nodes.open(self._plan(cases), timeout_s=self.profile.timeouts.setup, progress=self.progress)
                except NodesError as exc:
                    result.harness_error = str(exc)
                    return result
            for index, case in enumerate(cases, 1):
                if self.stop.requested:
                    break
                gone = self.nodes.gone() if self.nodes is not None else []
                if gone:
                    # The next rendezvous can never complete: end the suite now, once.
                    result.harness_error = f"node(s) {gone} are gone (their runner stopped); the suite ends here"
                    break
                self.progress(f"[{index}/{len(cases)}] {case.id:<8} {case.title} ...")
                case_result = self.run_case(case, case_dir=self.run_dir / case.suite / case.id if by_suite else None)
                result.cases.append(case_result)
                t = f"  t_detect {case_result.t_detect:.2f}s" if case_result.t_detect is not None else ""
                self.progress(
                    f"[{index}/{len(cases)}] {case.id:<8} {case_result.outcome.value:<12} "
                    f"{case_result.verdict.value.upper():<7}{t}  ({case_result.wall_s:.1f}s)"
                )
                if self._server_gone:
                    # Every later case would fail the same way: end the suite now, once.
                    result.harness_error = f"the fork server died during {case.id}; see {self.run_dir / 'forkserver.log'}"
                    break
        finally:
            result.wall_s = time.time() - started + self.startup_s
        return result

    # -- one case --------------------------------------------------------------------

    def run_case(self, case: Case, *, case_dir: Path | None = None) -> CaseResult:
        self._case_seq += 1
        live = _Live(
            case=case,
            prefix=f"case{self._case_seq}-{case.id}",
            case_dir=case_dir or self.run_dir / case.id,
            launched=time.time(),
        )
        harness_error = None
        # A case run again in this runner (a benchmark's rounds) reuses its directory: what
        # its ranks wrote last time must not be read as this time's.
        for stale in ("record.json", "launch.json", "exit.json"):
            for path in live.case_dir.glob(f"rank*/{stale}"):
                path.unlink(missing_ok=True)
        try:
            self._launch(live)
            self._watch(live)
        except HarnessError as exc:
            harness_error = str(exc)
            self._teardown(live, reason="harness error")
        finally:
            self._observer.clear()
            if live.torchrun is not None:
                live.final = True
                code = live.torchrun.finish(self.profile.timeouts.grace)
                self._drain_pending(live)
                live.case_dir.joinpath("torchrun.exit").write_text(f"{code}\n")
        ranks = self._collect(live)
        if self.nodes is not None:
            self.nodes.publish(self._case_seq, ranks)
            ranks, missing = self.nodes.gather(
                self._case_seq, ranks, world_size=self.world_size, timeout_s=self.profile.timeouts.case + 30
            )  # fmt: skip
            harness_error = harness_error or missing
        outcome, t_detect = judge.classify(case, ranks, harness_error=harness_error, interrupted=live.interrupted)
        verdict, reason = judge.judge(case.expect, outcome, ranks)
        metrics: dict[str, Any] = {}
        if case.check is not None and verdict is Verdict.PASS:
            verdict, reason, metrics = checkers.run(case.check, ranks, self.profile)
        if harness_error:
            reason = harness_error
        elif outcome is Outcome.HUNG and live.deadline_reason:
            reason = f"{reason} ({live.deadline_reason})"
        result = CaseResult(
            id=case.id,
            title=case.title,
            fault=case.fault,
            expectation=case.expect.describe(),
            outcome=outcome,
            verdict=verdict,
            reason=reason,
            t_detect=t_detect,
            budget_s=case.expect.budget_s if case.expect.crash else None,
            root_cause_rank=(root := judge.root_cause_rank(ranks)),
            root_cause_node=next((r.node for r in ranks if r.rank == root), None) if root is not None else None,
            ranks=ranks,
            wall_s=time.time() - live.launched,
            run_dir=str(live.case_dir),
            metrics=metrics,
        )
        for check in self.checks:
            check(result)
        artifacts.settle(self.profile, live.case_dir, ranks, passed=result.verdict in (Verdict.PASS, Verdict.SKIPPED))
        return result

    def _launch(self, live: _Live) -> None:
        assert self._server is not None and self._server.stdin is not None
        if self._server_gone:
            raise HarnessError("fork server is gone")
        env = {"HARDENING_FAULT": live.case.fault or "", WORKLOAD_ENV: live.case.workload or ""}
        if self.torchrun:
            self._launch_torchrun(live, env)
            return
        import torch.distributed as dist  # loaded with the store

        live.store = dist.PrefixStore(live.prefix, self._store)
        self._observer.watch(dist.PrefixStore(live.prefix, self._observer_store))
        for rank in range(self.world_size):
            spec = {
                "rank": rank,
                "world_size": self.world_size,
                "store_host": "127.0.0.1",
                "store_port": self._store.port,
                "store_prefix": live.prefix,
                "profile_path": str(self.profile_path),
                "rank_dir": str(live.case_dir / f"rank{rank}"),
            }
            # The fault spec is identical on every rank and part of every rank's parity.
            rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(self.world_size))
            line = json.dumps({"op": "spawn", "spec": spec, "env": rank_env}) + "\n"
            try:
                self._server.stdin.write(line.encode())
                self._server.stdin.flush()
            except OSError as exc:
                self._server_gone = True
                raise HarnessError(f"fork server is gone: {exc}") from None

    def _launch_torchrun(self, live: _Live, env: dict[str, str]) -> None:
        """This node's torchrun for the case; its ranks report through the poller's events."""
        full = dict(os.environ, **env)
        if self.rendezvous.loopback:
            full["GLOO_SOCKET_IFNAME"] = loopback_interface()
        run_id = f"{self._token}-{live.prefix}"
        if self.nodes is not None:
            run_id = f"{self.nodes.run_id}-{self._case_seq}"  # the same on every node
            full["HARDENING_STORE"] = self.rendezvous.endpoint  # node 0's store outlives every agent
        live.torchrun = TorchrunCase(
            command=torchrun_command(
                world_size=self.world_size, rdzv=self.rendezvous, rdzv_id=run_id,
                case_dir=live.case_dir, profile_path=self.profile_path, join_s=self.profile.timeouts.setup,
            ),
            env=full, case_dir=live.case_dir, events=self._events, tag=live.prefix,
        )  # fmt: skip
        live.torchrun.start()

    def _node_store(self, host: str, port: int, master: bool) -> Any:
        """The multi-node store at the rendezvous endpoint: node 0 hosts it."""
        if master:
            return loopback_store(self.profile.timeouts.pg, host=host, port=port)
        return store_keys.connect(host, port, timeout_s=self.profile.timeouts.pg)

    def _plan(self, cases: list[Case]) -> dict[str, Any]:
        """What every node must agree on before the first case: the cases, the world, the profile."""
        data = profile_to_dict(self.profile)
        for key in ("name", "source"):
            data.pop(key)
        data["world"].pop("node_rank")
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {
            "cases": [f"{c.suite}/{c.id}:{c.fault or ''}:{c.workload or ''}" for c in cases],
            "ranks": self.world_size, "nnodes": self.rendezvous.nnodes, "profile": digest,
        }  # fmt: skip

    def _attach(self, live: _Live, host: str, port: int, prefix: str) -> None:
        """Connect to the store a torchrun case's ranks use (the agent's), once they say where."""
        timeout = min(self.profile.timeouts.pg, ATTACH_S)
        try:
            live.store = store_keys.connect(host, port, prefix=prefix, timeout_s=timeout)
            self._observer.watch(store_keys.connect(host, port, prefix=prefix, timeout_s=timeout))
        except Exception as exc:
            assert live.torchrun is not None
            if live.torchrun.exit_code() is not None:  # the case is over already: the records say how
                live.final = True
                return
            raise HarnessError(f"cannot reach torchrun's agent store at {host}:{port}: {exc}") from None
        for rank, pid in live.pids.items():
            self._observer.add(rank, pid)

    def _drain_pending(self, live: _Live) -> None:
        try:
            self._drain(live, 0.0)
        except HarnessError:
            pass

    def _drain(self, live: _Live, timeout: float) -> None:
        try:
            event = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            kind = event["event"]
            if event.get("case", live.prefix) != live.prefix:
                kind = "stale"  # an earlier torchrun case's poller, late: not this case's rank
            if kind == "spawned":
                rank = event["rank"]
                live.pids[rank] = event["pid"]
                live.groups[rank] = event.get("pgid", event["pid"])
                if event.get("error_file"):
                    live.error_files[rank] = event["error_file"]
                if event.get("store") and live.store is None:
                    self._attach(live, *event["store"])
                self._observer.add(rank, event["pid"])
            elif kind == "exited":
                for rank, pid in live.pids.items():
                    if pid == event["pid"]:
                        live.exits[rank] = (event["status"], event["t"])
                        self._report_death(live, rank, event["status"])
            elif kind == "eof":
                self._server_gone = True
                raise HarnessError(f"fork server died; see {self.run_dir / 'forkserver.log'}")
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _report_death(self, live: _Live, rank: int, status: int) -> None:
        """Tell the surviving ranks at once; their heartbeat check is the slow path."""
        if len(live.exits) >= self.local_count:
            self._observer.clear()  # nothing of this node left to watch (an agent's store may be going)
        if live.teardown_at is not None or (self.rendezvous.nnodes == 1 and len(live.exits) >= self.world_size):
            return  # the runner ends them itself, or nobody is left to tell
        code = os.waitstatus_to_exitcode(status)
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        try:
            store_keys.report_exit(live.store, rank, code, how)
        except Exception:  # no store (yet, or any more): the ranks' own checks remain
            pass

    def _keys(self, live: _Live, kind: str) -> dict[int, str]:
        """Each rank's ``kind`` key, as read now (or last, once the store is no longer read)."""
        found = live.seen.setdefault(kind, {})
        if live.store is None or live.final:
            return dict(found)
        try:
            for rank in range(self.world_size):
                key = store_keys.key(kind, rank)
                if live.store.check([key]):
                    found[rank] = live.store.get(key).decode()
        except Exception:  # an agent's store goes with its agent: what was read stands
            live.final = True
        return dict(found)

    def _aborted(self, live: _Live) -> bool:
        try:
            return live.store is not None and not live.final and live.store.check([store_keys.ABORT])
        except Exception:
            return False

    def _last_heartbeat(self, live: _Live, rank: int) -> dict[str, Any]:
        try:
            return json.loads(self._keys(live, "hb").get(rank) or "{}")
        except ValueError:
            return {}

    def _watch(self, live: _Live) -> None:
        t = self.profile.timeouts
        while len(live.exits) < self.local_count:
            self._drain(live, 0.1)
            if live.torchrun is not None and len(live.pids) < self.local_count and live.torchrun.exit_code() is not None:
                raise HarnessError(
                    f"torchrun exited (code {live.torchrun.exit_code()}) with {len(live.pids)} of {self.local_count} "
                    f"rank(s) started: {live.torchrun.tail() or 'no output'} (log: {live.torchrun.log})"
                )
            if self.stop.requested:
                live.interrupted = True
                self._teardown(live, reason=f"interrupted ({self.stop.signal_name})")
                return
            now = time.time()
            deadline, why = live.launched + t.case, f"case deadline {t.case:g}s"
            ready = self._keys(live, "ready")
            if len(ready) < self.world_size:
                setup_deadline = live.launched + t.setup
                if setup_deadline < deadline:
                    missing = sorted(set(range(self.world_size)) - set(ready))
                    deadline, why = setup_deadline, f"setup deadline {t.setup:g}s, rank(s) {missing} not past parity and build"
            failed = [t_exit for status, t_exit in live.exits.values() if status != 0]
            if failed and min(failed) + t.detect < deadline:
                # Once one rank has failed, a peer still running after `detect` is stranded.
                deadline, why = min(failed) + t.detect, f"detect deadline {t.detect:g}s after the first rank failed"
            if live.torchrun is not None:  # its store goes with the agent: keep what the report needs
                self._keys(live, "phase"), self._keys(live, "hb"), self._keys(live, "skipped")
            fired = [_fire_time(v) for v in self._keys(live, "fired").values()]
            if fired and min(fired) + t.detect < deadline:
                deadline, why = min(fired) + t.detect, f"detect deadline {t.detect:g}s after the fault fired"
            frozen = self._all_live_stopped(live)
            if frozen and now < deadline:
                deadline, why = now, f"rank(s) {frozen} stopped (SIGSTOP/SIGTSTP) while the others ended"
            if now >= deadline and len(live.exits) < self.local_count:
                live.deadline_reason = why
                live.hung = {r for r in self._local_ranks(live) if r not in live.exits}
                self._dump_stacks(live)
                self._teardown(live, reason=why)
                return

    def _local_ranks(self, live: _Live) -> list[int]:
        """The ranks this runner launched: all of them on one node; on one of several,
        those torchrun placed here (it assigns each node's ranks at rendezvous)."""
        return list(range(self.world_size)) if self.rendezvous.nnodes == 1 else sorted(live.pids)

    def _all_live_stopped(self, live: _Live) -> list[int]:
        """Ranks frozen by a stop signal, when they are all that is left: nothing will change
        (on one of several nodes, the others' ranks may be all that ended: the abort says so)."""
        if not live.exits and not (self.nodes is not None and self._aborted(live)):
            return []
        remaining = [r for r in live.pids if r not in live.exits]
        if not remaining or len(live.pids) < self.local_count:
            return []
        return remaining if all(proc_state(live.pids[r]) == "T" for r in remaining) else []

    def _dump_stacks(self, live: _Live) -> None:
        if not self.profile.triage.py_spy:
            return
        targets = {f"rank{r}": live.pids[r] for r in sorted(live.hung) if r in live.pids}
        problem = triage.ptrace_problem()
        if problem:
            self.progress(f"    no stacks: {problem}")
            return
        self.progress(f"    {live.case.id}: {live.deadline_reason or 'deadline'}; dumping {len(targets)} live rank(s) with py-spy")
        self._observer.pause(live.hung)  # py-spy stops each target while it reads it
        dumps = triage.dump_all(
            targets, out_dir=str(live.case_dir), native=self.profile.triage.native, timeout=self.profile.triage.timeout
        )
        for label, dump in dumps.items():
            live.dumps[int(label[len("rank"):])] = dump
        said = {label: self._last_heartbeat(live, int(label[len("rank"):])).get("doing", "") for label in dumps}
        summary = triage.side_by_side(dumps, {k: v for k, v in said.items() if v})
        (live.case_dir / "stacks_summary.txt").write_text(summary + "\n")

    def _teardown(self, live: _Live, *, reason: str) -> None:
        """SIGTERM -> grace -> SIGKILL of every live rank's session; bounded, never raises.
        (Stop signals meanwhile only set a flag: nothing can cut this short.)

        A rank whose spawn the fork server reports only during the teardown (a stop that
        lands just as a case launches) is signalled as it appears and counted as torn down
        too: it must neither outlive the case nor read as "killed by SIGKILL"."""
        if live.teardown_at is None:
            live.teardown_at = time.time()
        for sig, wait_s in ((signal.SIGTERM, self.profile.timeouts.grace), (signal.SIGKILL, 10.0)):
            signalled: set[int] = set()
            end = time.time() + wait_s
            while True:
                for r, pid in list(live.pids.items()):
                    if r in live.exits or r in signalled:
                        continue
                    live.torn_down.setdefault(r, reason)
                    signalled.add(r)
                    try:
                        os.killpg(live.groups.get(r, pid), sig)
                    except ProcessLookupError:
                        # Just forked: not yet the leader of its own group (setsid comes first
                        # thing in the child, but not before this). The process itself, then.
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            pass
                if self._server_gone:
                    return  # nobody reports exits any more (and PDEATHSIG already ended the ranks)
                # The fork server spawns every rank asked for: wait for those not reported yet.
                unspawned = live.torchrun is None and len(live.pids) < self.local_count
                if time.time() >= end or not (unspawned or any(r not in live.exits for r in live.pids)):
                    break
                try:
                    self._drain(live, 0.05)
                except HarnessError:
                    return

    def _collect(self, live: _Live) -> list[RankResult]:
        ranks = []
        fired_keys = self._keys(live, "fired")
        skipped_keys = self._keys(live, "skipped")
        for rank in self._local_ranks(live):
            rank_dir = live.case_dir / f"rank{rank}"
            record = RankRecord.read(rank_dir / "record.json")
            has_record = record is not None
            if record is not None and rank in live.torn_down and live.teardown_at is not None:
                # A rank that ended while the runner tore the case down (our SIGTERM, or
                # a peer it saw die to it: PeerLost) reports our doing, not a finding.
                if record.exited_at >= live.teardown_at:
                    record = None
            rr = RankResult(
                rank=rank, pid=live.pids.get(rank), log_dir=str(rank_dir), has_record=has_record,
                node=self.rendezvous.node_rank,
            )  # fmt: skip
            if rank in live.exits and rank not in live.hung:
                status, t_exit = live.exits[rank]
                code = os.waitstatus_to_exitcode(status)
                rr.exit_code, rr.exited_at = code, t_exit
                if code < 0:
                    rr.signal = signal.Signals(-code).name
            if record is not None:
                rr.error_class, rr.message, rr.root_cause_rank = record.error_class, record.message, record.root_cause_rank
                rr.phase, rr.last_call_id, rr.started_at = record.phase, record.last_call_id, record.started_at
                rr.counters, rr.artifacts, rr.pipeline = record.counters, record.artifacts, record.pipeline
                rr.fired_at, rr.touched, rr.skipped = record.fired_at, record.fault_touched, record.fault_skipped
            elif rank in live.torn_down and rank not in live.hung:
                rr.signal = None  # the runner's own signal says nothing about the rank
                rr.error_class = TORN_DOWN
                rr.message = f"ended by the runner: {live.torn_down[rank]}"
                rr.phase = self._keys(live, "phase").get(rank, "")
            elif rr.exit_code == 0:
                # Exit 0 is not a completion: only the runtime's own clean end writes a record.
                rr.error_class = NO_RECORD
                rr.phase = self._keys(live, "phase").get(rank, "")
                rr.message = (
                    f"exited 0 without its final record, in phase {rr.phase or '?'}: something ended the process "
                    "(os._exit in user code?) before the runtime finished"
                )
            elif rr.exit_code not in (None, 0):
                rr.error_class = CAUSE_BY_EXIT_CODE.get(rr.exit_code) if rr.exit_code > 0 else rr.signal
                rr.message = _tail(rank_dir / "stderr.log")
            if rr.fired_at is None and rank in fired_keys:  # a rank killed or frozen by its own fault
                rr.fired_at = _fire_time(fired_keys[rank])
                rr.touched = rr.touched or json.loads(fired_keys[rank]).get("touched")
            if rr.skipped is None and rank in skipped_keys:
                rr.skipped = skipped_keys[rank]
            error_file = live.error_files.get(rank)
            if error_file and os.path.isfile(error_file):  # torchelastic's own account of the end
                rr.artifacts = dict(rr.artifacts, torchelastic_error=error_file)
            dump = live.dumps.get(rank)
            if dump is not None and dump.ok:
                rr.stacks_path, rr.where = dump.path, dump.where or dump.innermost
            elif dump is not None:
                rr.where = f"no stacks: {dump.text.splitlines()[0] if dump.text else 'py-spy failed'}"
            if rank in live.hung:
                rr.phase = rr.phase or self._keys(live, "phase").get(rank, "")
                doing = self._last_heartbeat(live, rank).get("doing")
                if doing:  # the runtime's own view: the collective and the user's line
                    rr.where = f"{doing} (py-spy: {rr.where})" if rr.where else doing
                if proc_state(live.pids.get(rank, -1)) == "T" or "stopped" in rr.where:
                    rr.where = f"[stopped] {rr.where}"
            ranks.append(rr)
        return ranks


def loopback_store(timeout_s: float, *, host: str = "127.0.0.1", port: int = 0) -> Any:
    """A c10d store master that listens on ``host`` only (loopback unless multi-node asks
    for the rendezvous endpoint).

    ``TCPStore(host, 0, is_master=True)`` binds every interface whatever ``host`` says,
    and the store is unauthenticated: anyone on the network could write the abort key.
    So the socket is bound here and handed over (``master_listen_fd``, torch >= 2.2)."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise HarnessError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.listen(512)
    port = sock.getsockname()[1]
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(
            host, port, None, True, timeout=timeout, wait_for_workers=False, master_listen_fd=sock.detach()
        )
    except TypeError as exc:  # a torch without master_listen_fd: refuse rather than listen on every interface
        raise HarnessError(f"this torch's TCPStore cannot listen on loopback only (no master_listen_fd): {exc}") from None
    return store


def loopback_interface() -> str:
    """Name of the loopback network interface (``lo`` on Linux), for GLOO_SOCKET_IFNAME."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return "lo"
    return "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), "lo")


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _fire_time(value: str) -> float:
    """The fire time in a ``fired/<r>`` store value (``{"t": ..., "touched": ...}``)."""
    return float(json.loads(value)["t"])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def environment(profile: Profile) -> dict[str, Any]:
    import torch

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "backend": profile.world.backend,
        "device": profile.world.device,
        "compile_backend": profile.compile.backend,
        "fullgraph": profile.compile.fullgraph,
        "launcher": profile.world.launcher,
        "nnodes": profile.world.nnodes,
        "node_rank": profile.world.node_rank,
    }
