"""The runner: launch the ranks of each case, watch them, and turn what happened into data.

One runner per suite invocation. It hosts the c10d store (so the store outlives every
rank), starts one fork server (so ``import torch`` is paid once), and runs cases one
after another. Per case it waits on every rank under three deadlines (setup, detect,
case); at a deadline it dumps every live rank with py-spy, then SIGTERM -> grace ->
SIGKILL of each rank's whole session. A timeout is data (outcome ``hung``), never an
exception. Ctrl-C or SIGTERM tears the ranks down the same way and the suite result is
marked interrupted, so the partial report is still written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import queue
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

from hardening import results, triage
from hardening.cases import Case
from hardening.errors import CAUSE_BY_EXIT_CODE
from hardening.profile import Profile, profile_to_dict
from hardening.results import TORN_DOWN, CaseResult, Outcome, RankResult, SuiteResult


class HarnessError(RuntimeError):
    """The harness itself could not do its job (fork server died, store unusable)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class _Live:
    """Book-keeping of one launched case."""

    case: Case
    prefix: str
    case_dir: Path
    launched: float
    pids: dict[int, int] = dataclasses.field(default_factory=dict)
    exits: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)
    hung: set[int] = dataclasses.field(default_factory=set)
    torn_down: dict[int, str] = dataclasses.field(default_factory=dict)
    """Ranks the runner itself ended, and why (their signal is ours, not a finding)."""
    deadline_reason: str = ""
    dumps: dict[int, triage.StackDump] = dataclasses.field(default_factory=dict)


class Runner:
    """Runs cases on ``profile.world.ranks`` processes; use as a context manager."""

    def __init__(self, profile: Profile, *, run_dir: Path, progress: Callable[[str], None] | None = None) -> None:
        self.profile = profile
        self.run_dir = run_dir
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.world_size = profile.world.ranks
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._server: subprocess.Popen[bytes] | None = None
        self._store: Any = None
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
        import torch.distributed as dist

        self._store = dist.TCPStore(
            "127.0.0.1",
            0,
            None,
            True,
            timeout=timedelta(seconds=self.profile.timeouts.pg),
            wait_for_workers=False,
        )
        self._wait_ready()
        self.startup_s = time.time() - started
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
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
        # User targets given as module paths resolve from the directory the user ran in.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
        self._server = subprocess.Popen(
            [sys.executable, "-m", "hardening.forkserver"],
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
        deadline = time.time() + self.profile.timeouts.setup
        while time.time() < deadline:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            if event["event"] == "ready":
                return
            if event["event"] == "eof":
                raise HarnessError(f"fork server died at start; see {self.run_dir / 'forkserver.log'}")
        raise HarnessError(f"fork server not ready after {self.profile.timeouts.setup:g}s")

    # -- suite -----------------------------------------------------------------------

    def run_suite(self, suite: str, cases: list[Case], *, profile_name: str) -> SuiteResult:
        result = SuiteResult(
            suite=suite,
            profile=profile_name,
            num_ranks=self.world_size,
            started_at=time.time(),
            run_dir=str(self.run_dir),
            environment=environment(self.profile),
        )
        result.environment["startup_s"] = round(self.startup_s, 2)
        started = time.time()
        for index, case in enumerate(cases, 1):
            self.progress(f"[{index}/{len(cases)}] {case.id:<8} {case.title} ...")
            case_result = self.run_case(case)
            result.cases.append(case_result)
            t = f"  t_detect {case_result.t_detect:.2f}s" if case_result.t_detect is not None else ""
            self.progress(
                f"[{index}/{len(cases)}] {case.id:<8} {case_result.outcome.value:<12} "
                f"{case_result.verdict.value.upper():<7}{t}  ({case_result.wall_s:.1f}s)"
            )
            if case_result.outcome is Outcome.INTERRUPTED:
                result.interrupted = True
                break
        result.wall_s = time.time() - started + self.startup_s
        return result

    # -- one case --------------------------------------------------------------------

    def run_case(self, case: Case) -> CaseResult:
        self._case_seq += 1
        live = _Live(
            case=case,
            prefix=f"case{self._case_seq}-{case.id}",
            case_dir=self.run_dir / case.id,
            launched=time.time(),
        )
        harness_error = None
        interrupted = False
        try:
            self._launch(live)
            self._watch(live)
        except KeyboardInterrupt:
            interrupted = True
            self._teardown(live, reason="interrupted")
        except HarnessError as exc:
            harness_error = str(exc)
            self._teardown(live, reason="harness error")
        ranks = self._collect(live)
        outcome, t_detect = results.classify(case, ranks, harness_error=harness_error, interrupted=interrupted)
        verdict, reason = results.judge(case.expect, outcome, ranks)
        if harness_error:
            reason = harness_error
        elif outcome is Outcome.HUNG and live.deadline_reason:
            reason = f"{reason} ({live.deadline_reason})"
        return CaseResult(
            id=case.id,
            title=case.title,
            fault=case.fault,
            expectation=case.expect.describe(),
            outcome=outcome,
            verdict=verdict,
            reason=reason,
            t_detect=t_detect,
            budget_s=case.expect.budget_s if case.expect.crash else None,
            root_cause_rank=results.root_cause_rank(ranks),
            ranks=ranks,
            wall_s=time.time() - live.launched,
            run_dir=str(live.case_dir),
        )

    def _launch(self, live: _Live) -> None:
        assert self._server is not None and self._server.stdin is not None
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
            env = {"HARDENING_FAULT": live.case.fault or "", "RANK": str(rank), "WORLD_SIZE": str(self.world_size)}
            line = json.dumps({"op": "spawn", "spec": spec, "env": env}) + "\n"
            try:
                self._server.stdin.write(line.encode())
                self._server.stdin.flush()
            except OSError as exc:
                raise HarnessError(f"fork server is gone: {exc}") from None

    def _drain(self, live: _Live, timeout: float) -> None:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind = event["event"]
            if kind == "spawned":
                live.pids[event["rank"]] = event["pid"]
            elif kind == "exited":
                for rank, pid in live.pids.items():
                    if pid == event["pid"]:
                        live.exits[rank] = (event["status"], event["t"])
                        self._report_death(live, rank, event["status"])
            elif kind == "eof":
                raise HarnessError(f"fork server died; see {self.run_dir / 'forkserver.log'}")
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _report_death(self, live: _Live, rank: int, status: int) -> None:
        """Tell the surviving ranks at once; their heartbeat check is the slow path."""
        import torch.distributed as dist  # loaded with the store, in the background

        from hardening.watchdog import report_exit

        code = os.waitstatus_to_exitcode(status)
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        try:
            report_exit(dist.PrefixStore(live.prefix, self._store), rank, code, how)
        except Exception:  # the store is in this process; failing here means we are shutting down
            pass

    def _keys(self, live: _Live, kind: str) -> dict[int, str]:
        found = {}
        for rank in range(self.world_size):
            key = f"{live.prefix}/{kind}/{rank}"
            if self._store.check([key]):
                found[rank] = self._store.get(key).decode()
        return found

    def _watch(self, live: _Live) -> None:
        t = self.profile.timeouts
        while len(live.exits) < self.world_size:
            self._drain(live, 0.1)
            now = time.time()
            deadline, why = live.launched + t.case, f"case deadline {t.case:g}s"
            ready = self._keys(live, "ready")
            if len(ready) < self.world_size:
                setup_deadline = live.launched + t.setup
                if setup_deadline < deadline:
                    missing = sorted(set(range(self.world_size)) - set(ready))
                    deadline, why = setup_deadline, f"setup deadline {t.setup:g}s, rank(s) {missing} not past parity"
            failed = [t_exit for status, t_exit in live.exits.values() if status != 0]
            if failed and min(failed) + t.detect < deadline:
                # Once one rank has failed, a peer still running after `detect` is stranded.
                deadline, why = min(failed) + t.detect, f"detect deadline {t.detect:g}s after the first rank failed"
            fired = [float(v) for v in self._keys(live, "fired").values()]
            if fired and min(fired) + t.detect < deadline:
                deadline, why = min(fired) + t.detect, f"detect deadline {t.detect:g}s after the fault fired"
            frozen = self._all_live_stopped(live)
            if frozen and now < deadline:
                deadline, why = now, f"rank(s) {frozen} stopped (SIGSTOP/SIGTSTP) while the others ended"
            if now >= deadline and len(live.exits) < self.world_size:
                live.deadline_reason = why
                live.hung = {r for r in range(self.world_size) if r not in live.exits}
                self._dump_stacks(live)
                self._teardown(live, reason=why)
                return

    def _all_live_stopped(self, live: _Live) -> list[int]:
        """Ranks frozen by a stop signal, when they are all that is left: nothing will change."""
        if not live.exits:
            return []
        remaining = [r for r in live.pids if r not in live.exits]
        if not remaining or len(live.pids) < self.world_size:
            return []
        return remaining if all(triage.proc_state(live.pids[r]) == "T" for r in remaining) else []

    def _dump_stacks(self, live: _Live) -> None:
        if not self.profile.triage.py_spy:
            return
        targets = {f"rank{r}": live.pids[r] for r in sorted(live.hung) if r in live.pids}
        problem = triage.ptrace_problem()
        if problem:
            self.progress(f"    no stacks: {problem}")
            return
        self.progress(f"    {live.case.id}: {live.deadline_reason or 'deadline'}; dumping {len(targets)} live rank(s) with py-spy")
        dumps = triage.dump_all(
            targets, out_dir=str(live.case_dir), native=self.profile.triage.native, timeout=self.profile.triage.timeout
        )
        for label, dump in dumps.items():
            live.dumps[int(label[len("rank"):])] = dump
        (live.case_dir / "stacks_summary.txt").write_text(triage.side_by_side(dumps) + "\n")

    def _teardown(self, live: _Live, *, reason: str) -> None:
        """SIGTERM -> grace -> SIGKILL of every live rank's session; bounded, never raises."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        try:
            for r in live.pids:
                if r not in live.exits:
                    live.torn_down.setdefault(r, reason)
            for sig, wait_s in ((signal.SIGTERM, self.profile.timeouts.grace), (signal.SIGKILL, 10.0)):
                alive = [pid for r, pid in live.pids.items() if r not in live.exits]
                if not alive:
                    break
                for pid in alive:
                    try:
                        os.killpg(pid, sig)
                    except ProcessLookupError:
                        pass
                end = time.time() + wait_s
                while time.time() < end and any(r not in live.exits for r in live.pids):
                    try:
                        self._drain(live, 0.05)
                    except HarnessError:
                        return
        finally:
            signal.signal(signal.SIGINT, previous)

    def _collect(self, live: _Live) -> list[RankResult]:
        ranks = []
        fired_keys = self._keys(live, "fired") if self._store is not None else {}
        for rank in range(self.world_size):
            rank_dir = live.case_dir / f"rank{rank}"
            record = _read_record(rank_dir / "record.json")
            rr = RankResult(rank=rank, pid=live.pids.get(rank), log_dir=str(rank_dir), has_record=record is not None)
            if rank in live.exits and rank not in live.hung:
                status, t_exit = live.exits[rank]
                code = os.waitstatus_to_exitcode(status)
                rr.exit_code, rr.exited_at = code, t_exit
                if code < 0:
                    rr.signal = signal.Signals(-code).name
            if record is not None:
                rr.error_class = record.get("error_class")
                rr.message = record.get("message") or ""
                rr.root_cause_rank = record.get("root_cause_rank")
                rr.phase = record.get("phase") or ""
                rr.last_call_id = record.get("last_call_id")
                rr.counters = record.get("counters") or {}
                rr.artifacts = record.get("artifacts") or {}
                rr.started_at = record.get("started_at")
                rr.fired_at = record.get("fired_at")
            elif rank in live.torn_down and rank not in live.hung:
                rr.signal = None  # the runner's own signal says nothing about the rank
                rr.error_class = TORN_DOWN
                rr.message = f"ended by the runner: {live.torn_down[rank]}"
                rr.phase = _last_phase(self._store, live.prefix, rank)
            elif rr.exit_code not in (None, 0):
                rr.error_class = CAUSE_BY_EXIT_CODE.get(rr.exit_code) if rr.exit_code > 0 else rr.signal
                rr.message = _tail(rank_dir / "stderr.log")
            if rr.fired_at is None and rank in fired_keys:
                rr.fired_at = float(fired_keys[rank])
            dump = live.dumps.get(rank)
            if dump is not None and dump.ok:
                rr.stacks_path, rr.where = dump.path, dump.where or dump.innermost
            elif dump is not None:
                rr.where = f"no stacks: {dump.text.splitlines()[0] if dump.text else 'py-spy failed'}"
            if rank in live.hung:
                rr.phase = rr.phase or _last_phase(self._store, live.prefix, rank)
                if triage.proc_state(live.pids.get(rank, -1)) == "T" or "stopped" in rr.where:
                    rr.where = f"[stopped] {rr.where}"
            ranks.append(rr)
        return ranks


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _last_phase(store: Any, prefix: str, rank: int) -> str:
    key = f"{prefix}/phase/{rank}"
    try:
        return store.get(key).decode() if store.check([key]) else ""
    except Exception:
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
    }
