"""Helpers for tests that run the ``hardening`` command as a user would: the console
script, and finding every process a run started by a marker in its environment."""

from __future__ import annotations

import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable


def hardening_command() -> list[str]:
    """The console script a user runs (a ``python -m`` runner would put the cwd on sys.path)."""
    script = Path(sys.executable).with_name("hardening")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hardening"]


def free_port() -> str:
    """A loopback port nothing listens on right now (for torchrun's ``--master-port``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def new_marker() -> str:
    """A value to put in ``CORPUS_MARKER`` of a run's environment; everything it starts inherits it."""
    return f"HARDENING_TEST_{uuid.uuid4().hex}"


def marked_processes(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment carries ``marker``."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as s:
                if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry))
        except OSError:
            continue
    return found


def run_each(items: Iterable[Any], run: Callable[[Any, Path], Any], root: Path, *, workers: int) -> dict[str, Any]:
    """``run(item, root)`` for every item, ``workers`` at a time; results by ``item.id``."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {item.id: pool.submit(run, item, root) for item in items}
        return {key: f.result() for key, f in futures.items()}


def left_behind(marker: str, grace_s: float = 5.0) -> list[int]:
    """Marked processes still alive after ``grace_s``; they are killed so that a failing
    test does not leak into the next one."""
    end = time.time() + grace_s
    left = marked_processes(marker)
    while left and time.time() < end:
        time.sleep(0.1)
        left = marked_processes(marker)
    for pid in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return left
