"""Test harness: store clients per rank, one body per rank run in threads, and the
loader of the 2-process gloo pair (tests/procs/pairlib.py).

Used with the ``store_port`` fixture from ``tests/conftest.py``. A plain module rather than conftest
helpers, since pytest does not mean conftest.py to be imported by tests.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.distributed as dist

from hardening.runtime.sidechannel import SideChannel


def side_channel(port: int, rank: int, world_size: int, timeout_s: float = 5) -> SideChannel:
    """A SideChannel for ``rank`` on its own client connection to the store master at ``port``."""
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    return SideChannel(client, rank=rank, world_size=world_size, timeout_s=timeout_s)


def side_channels(port: int, world_size: int, timeout_s: float = 5) -> list[SideChannel]:
    """One side channel per rank ``0 .. world_size - 1``, in rank order."""
    return [side_channel(port, r, world_size, timeout_s) for r in range(world_size)]


def run_ranks(
    sides: Sequence[SideChannel],
    body: Callable[[SideChannel], Any],
    *,
    join_timeout_s: float = 20,
) -> dict[int, Any]:
    """Run ``body(side)`` for each side in its own thread; the result or exception per ``side.rank``.

    Fails the test if any rank thread is still running after ``join_timeout_s``.
    """
    out: dict[int, Any] = {}

    def target(side: SideChannel) -> None:
        try:
            out[side.rank] = body(side)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out[side.rank] = exc

    threads = [threading.Thread(target=target, args=(s,), daemon=True) for s in sides]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=join_timeout_s)
    assert not any(t.is_alive() for t in threads), "a rank thread is stuck"
    return out


PROCS = Path(__file__).resolve().parent / "procs"


def pairlib() -> Any:
    """tests/procs/pairlib.py (the 2-process gloo pair shared by the envelope and drift
    tests), loaded by path once per session."""
    name = "hardening_tests_pairlib"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PROCS / "pairlib.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
