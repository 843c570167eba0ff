"""The process torchrun starts for each rank: a small reaper, and the rank as its child.

torchrun's agent reaps its own workers, so nobody else can learn how a rank ended (the
signal that killed it, the time) in the moment it happens. So the worker torchrun starts
is this reaper; the rank is its child, in the same process group, so every signal the
agent sends to the group reaches the rank, which handles it. The reaper imports nothing
heavy; it writes ``launch.json`` (the rank's pid, its node and the agent's store) into
the rank's directory as soon as the rank is forked, waits for it, writes ``exit.json``
(the wait status and the time) and then ends the way the rank ended, so that the agent
sees the same exit code or signal. The runner's poller turns the two files into the
same ``spawned`` / ``exited`` events the fork server sends
(:mod:`hardening.harness.torchrun`).

Restarts would hide the fault under test: a rank started with ``--max-restarts`` other
than 0, or as a restart, refuses to run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from hardening.harness.forkserver import detach, preload_modules, preload_torch, set_parent_death_signal
from hardening.runtime.store import torchrun_prefix

EXIT_RESTARTS = 4
"""A rank launched with restarts allowed, or as a restart: a usage error, like the CLI's."""


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(case_dir: str, profile_path: str) -> NoReturn:
    env = os.environ
    set_parent_death_signal()  # the agent's death ends this reaper, whose death ends the rank
    rank = int(env["RANK"])
    rank_dir = Path(case_dir) / f"rank{rank}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    restarts = (env.get("TORCHELASTIC_MAX_RESTARTS", "0"), env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts != ("0", "0"):
        print(
            f"[hardening] rank {rank}: launched with --max-restarts {restarts[0]} (restart {restarts[1]}): a restart "
            "would hide the fault under test; run torchrun with --max-restarts 0",
            file=sys.stderr,
        )
        os._exit(EXIT_RESTARTS)
    # The group's signals are the rank's to handle; this process only reports how it ended.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Multi-node: the runner's store at the endpoint (it outlives every agent); else the agent's.
    host, _, port = env.get("HARDENING_STORE", f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}").rpartition(":")
    store = (host, int(port), torchrun_prefix(env))
    reaper = os.getpid()
    pid = os.fork()
    if pid == 0:
        _rank(rank, rank_dir, profile_path, reaper, store)
    _write(
        rank_dir / "launch.json",
        {
            "rank": rank, "pid": pid, "pgid": os.getpgid(0), "node": int(env.get("GROUP_RANK", "0")),
            "store": list(store),
            "error_file": env.get("TORCHELASTIC_ERROR_FILE"), "t": time.time(),
        },
    )  # fmt: skip
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    _write(rank_dir / "exit.json", {"status": status, "t": time.time()})
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):  # end as the rank did: the agent reads the same signal
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _rank(rank: int, rank_dir: Path, profile_path: str, reaper: int, store: tuple[str, int, str]) -> NoReturn:
    """The rank itself, in the reaper's process group; never returns."""
    try:
        detach(reaper, str(rank_dir / "stdout.log"), str(rank_dir / "stderr.log"), new_session=False)
        preload_torch()  # what the fork server imports once: here every rank imports it, before its Session starts
        from hardening.harness.profile import load_profile

        preload_modules(load_profile(profile_path).world.preload, forking=False)
        from hardening.harness.worker import RankSpec, run_rank

        env = os.environ
        run_rank(
            RankSpec(
                rank=rank, world_size=int(env["WORLD_SIZE"]), store_host=store[0], store_port=store[1],
                store_prefix=store[2], profile_path=profile_path, rank_dir=str(rank_dir), parent_pid=reaper,
            )
        )  # fmt: skip
    except BaseException:  # noqa: BLE001 - the child must never return into the reaper
        import traceback

        traceback.print_exc()
    finally:
        os._exit(10)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
