"""The store protocol: every key ranks and their launcher exchange, in one table.

The c10d store is hosted by the launcher (the harness's runner, or torchrun's agent) and
outlives every rank, which is what lets a rank's death, abort or hang be known to the
others without a collective. Per-rank keys are ``<kind>/<rank>``; a launcher that runs
several jobs on one store gives each its own ``PrefixStore``.

=========== ======================= =====================================================
key         written by              meaning
=========== ======================= =====================================================
``abort``   the first failing rank  JSON ``{rank, error, message, root_cause_rank}``; first writer wins
``events``  anyone, by ``add``      bumped after each ``abort``/``done``/``exit`` write: one poll instead of many
``hb/r``    rank r's watchdog       heartbeat JSON ``{seq, phase, call_id, activity, doing}``
``phase/r`` rank r's main thread    its phase, at once on entering it (a heartbeat may never come)
``ready/r`` rank r                  past build: the launcher's setup deadline no longer applies
``done/r``  rank r's clean end      stop watching rank r
``exit/r``  the launcher            ``{exit_code, how}`` of a rank process that ended, or
                                    ``{exit_code: null, how, stopped: true}`` of one frozen
``alive/r`` rank r's launcher       ``{seq, state, node, host}``: its process exists and runs,
                                    seen from outside it (:mod:`hardening.harness.liveness`)
``fired/r`` rank r's fault          ``{t, touched}``: when the injected fault acted
``skipped/r`` rank r's fault        why the fault could not apply to this region
``x/tag/r`` the side channel        rank r's payload for exchange ``tag``
``pg/``     torch                   the process group's own keys
=========== ======================= =====================================================
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

ABORT = "abort"
EVENTS = "events"
PG_PREFIX = "pg"
SIDE_PREFIX = "x"
PER_RANK = ("hb", "phase", "ready", "done", "exit", "alive", "fired", "skipped")


def key(kind: str, rank: int) -> str:
    """``<kind>/<rank>`` for one of :data:`PER_RANK`."""
    assert kind in PER_RANK, kind
    return f"{kind}/{rank}"


def connect(host: str, port: int, *, prefix: str = "", timeout_s: float) -> Any:
    """A client of the launcher's store (each thread that may act while another is blocked
    in a wait needs its own: a c10d client serializes its requests)."""
    import torch.distributed as dist

    client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(prefix, client) if prefix else client


def torchrun_prefix(env: Any) -> str:
    """The namespace of a torchrun job's keys in the agent's store: the store outlives a
    restart, so each attempt gets keys of its own."""
    return f"hardening/{env.get('TORCHELASTIC_RUN_ID', 'run')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def report_exit(store: Any, rank: int, exit_code: int, how: str) -> None:
    """What a launcher that hosts the store does when a rank process ends: the other
    ranks' watchdogs read it on their next tick (``PeerLost`` at once, unless 0)."""
    store.set(key("exit", rank), json.dumps({"exit_code": exit_code, "how": how}))
    store.add(EVENTS, 1)


def report_stopped(store: Any, rank: int, how: str) -> None:
    """What a launcher does when a rank's process is frozen (SIGSTOP): nothing in that
    process runs, its own watchdog included, so only someone outside it can say so."""
    store.set(key("exit", rank), json.dumps({"exit_code": None, "how": how, "stopped": True}))
    store.add(EVENTS, 1)


def describe_lost(rank: int, report: dict[str, Any]) -> str:
    """The PeerLost message for a launcher's ``exit/r`` report."""
    if report.get("stopped"):
        return f"rank {rank} lost: its launcher sees its process {report.get('how')}"
    return f"rank {rank} died ({report.get('how')}, reported by the launcher)"
