"""The fork server: pay for ``import torch`` once per suite, not once per rank per case.

On a 2-core box, spawn + ``import torch`` + Dynamo + c10d costs about 5 s per process.
The runner starts one fork server per suite; it imports everything a rank needs
(runs no torch op and starts no thread of its own, so forking stays safe) and then,
per request, forks one rank process. Each rank is still its own process, in its own
session (so the runner can kill its whole tree), with its stdout/stderr in its run
directory.

Protocol: JSON lines. Runner -> server: ``{"op": "spawn", "spec": RankSpec, "env": {...}}``
or ``{"op": "check_target", "target": ..., "out": ..., "log": ...}`` (import the region
target in a child, so that user code never runs unbounded in the runner or here).
Server -> runner: ``ready``, ``spawned`` (pid, rank), ``check_started`` (pid), ``exited``
(pid, status, time of the ``waitpid``). SIGCHLD wakes the loop, so exit times are exact.

No orphans: the server dies with the runner (PR_SET_PDEATHSIG and stdin EOF) and every
rank dies with the server (PR_SET_PDEATHSIG, and its watchdog checks its parent).
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


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe-EOF and ppid checks remain
        pass


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent thread dies."""
    _prctl(PR_SET_PDEATHSIG, sig)


def _adopted() -> list[int]:
    """Live children of this process, its own and the orphans it adopted as subreaper."""
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                found.append(int(entry))
    return found


def _emit(out: Any, event: dict[str, Any]) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


def detach(parent_pid: int, stdout: str, stderr: str, *, new_session: bool = True) -> None:
    """The first steps of every forked child: own session (unless its parent's group must
    reach it), die with the parent, the signals of a fresh interpreter, stdio to files."""
    if new_session:
        os.setsid()
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died between fork and prctl
        os._exit(11)
    # As a fresh interpreter has them. SIGPIPE stays ignored, as Python sets it at
    # startup: a rank writing to a dead peer's socket (gloo) must get EPIPE, an error
    # the terminator attributes to that peer, not be killed by the signal.
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, stdout), (2, stderr)):
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
        os.dup2(log, fd)
        os.close(log)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _check_target(request: dict[str, Any], server_pid: int) -> None:
    """Runs in a forked child: import the target and say whether it is usable; never returns."""
    try:
        detach(server_pid, request["log"], request["log"])
        from hardening.harness.region import describe_import_error, load_factory

        try:
            load_factory(request["target"])
            verdict = {"ok": True}
        except BaseException as exc:  # noqa: BLE001 - SystemExit at import is a broken target too
            import traceback

            traceback.print_exc()
            verdict = {"ok": False, "error": describe_import_error(exc)}
        with open(request["out"], "w") as f:
            json.dump(verdict, f)
    except BaseException:  # noqa: BLE001 - a child must never return into the server loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(0)


def _child(spec_data: dict[str, Any], env: dict[str, str], server_pid: int) -> None:
    """Runs in the forked rank process; never returns."""
    try:
        rank_dir = spec_data["rank_dir"]
        os.makedirs(rank_dir, exist_ok=True)
        detach(server_pid, os.path.join(rank_dir, "stdout.log"), os.path.join(rank_dir, "stderr.log"))
        os.environ.update(env)
        from hardening.harness.worker import RankSpec, run_rank

        spec_data = dict(spec_data, parent_pid=server_pid)
        run_rank(RankSpec.from_json(spec_data))
    except BaseException:  # noqa: BLE001 - a child must never return into the server loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(10)


def preload_torch() -> None:
    """Import what every rank imports before its Session starts, so that no rank pays for
    it in a phase a deadline bounds (torchrun's ranks each call this themselves)."""
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.distributed._functional_collectives  # noqa: F401

    import hardening.harness.worker  # noqa: F401
    import hardening.harness.reference  # noqa: F401

    # What the first compile imports lazily: cold, these imports hold the GIL for
    # seconds inside every rank of every case (and starve its watchdog thread).
    for name in (
        "torch._dynamo.backends.common",
        "torch._functorch.aot_autograd",
        "torch._inductor.compile_fx",
        "torch.fx.experimental.symbolic_shapes",
        "sympy",
    ):
        try:
            __import__(name)
        except Exception:  # an optional piece missing in this torch: the rank imports it itself
            pass


def preload_modules(modules: list[str], *, forking: bool = True) -> None:
    """The profile's ``world.preload``: in the server each is imported once, so that every
    rank forked after starts with it (a torchrun rank imports them before its Session
    starts). Said on stderr (the server's log): each import before it starts (an import
    that kills the interpreter leaves its name), a failure (the region imports it then),
    and, where ranks are forked after, a thread or a CUDA context the imports created."""
    import threading

    before = set(threading.enumerate())
    for name in modules:
        print(f"world.preload: importing {name} ...", file=sys.stderr, flush=True)
        started = time.time()
        try:
            __import__(name)
        except BaseException as exc:  # noqa: BLE001 - an optimization: never fatal here
            print(f"world.preload: cannot import {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(f"world.preload: imported {name} in {time.time() - started:.2f}s", file=sys.stderr)
    if not forking:
        return
    started_threads = [t.name for t in threading.enumerate() if t not in before]
    if started_threads:
        print(
            f"world.preload: the imports started thread(s) {started_threads}: forking ranks after that is unsafe; "
            "drop the module that starts them from world.preload",
            file=sys.stderr,
        )
    import torch

    if torch.cuda.is_initialized():
        print(
            "world.preload: the imports initialized CUDA in the fork server: a forked rank cannot use CUDA after that; "
            "drop the module that does it from world.preload",
            file=sys.stderr,
        )


def serve(modules: list[str] | None = None) -> None:
    set_parent_death_signal()
    # A child that daemonizes (setsid + its parent exits: user code at import, or a rank's
    # helper) is re-parented here instead of to init, so it is still ours to end.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    runner_pid = os.getppid()
    started = time.time()
    preload_torch()  # the cost the server exists to amortize

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from imports must not corrupt the protocol stream
    preload_modules(modules or [])
    inp = 0  # raw fd: a buffered reader would hide queued requests from select()
    pending = b""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides how ranks end
    children: set[int] = set()
    _emit(out, {"event": "ready", "pid": os.getpid(), "import_s": round(time.time() - started, 3)})

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            _emit(out, {"event": "exited", "pid": pid, "status": status, "t": time.time()})

    try:
        while True:
            ready, _, _ = select.select([inp, wake_r], [], [], 1.0)
            if wake_r in ready:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            reap()
            if os.getppid() != runner_pid:
                break
            if inp not in ready:
                continue
            chunk = os.read(inp, 65536)
            if not chunk:
                break  # the runner closed the pipe or died
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                op = request.get("op")
                if op not in ("spawn", "check_target"):
                    continue
                pid = os.fork()
                if pid == 0:
                    # The child must not hold the protocol pipe or the wakeup pipe open: the
                    # runner relies on EOF when the server dies.
                    signal.set_wakeup_fd(-1)
                    for fd in (wake_r, wake_w, out.fileno()):
                        os.close(fd)
                    if op == "check_target":
                        _check_target(request, os.getppid())
                    _child(request["spec"], request.get("env", {}), os.getppid())
                children.add(pid)
                if op == "check_target":
                    _emit(out, {"event": "check_started", "pid": pid, "t": time.time()})
                else:
                    _emit(out, {"event": "spawned", "pid": pid, "rank": request["spec"]["rank"], "t": time.time()})
    finally:
        for pid in list(children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline:
            left = _adopted()  # ranks, and whatever they or user code left behind
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            reap()
            while True:  # adopted orphans are not in `children`: reap them too
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
            time.sleep(0.05)


if __name__ == "__main__":
    serve()
