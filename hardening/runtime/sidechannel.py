"""The side channel: checks that must never collide with data-plane collectives.

Two parts, both created right after init on every rank:

- ``exchange``: an all-gather of small JSON values through the c10d store that the
  launcher hosts. It is used for parity, warmup tickets and compile-counter gathers.
  Unlike a gloo collective, a timeout here knows which ranks never wrote their key,
  so "rank 1 never arrived at warmup/2" is the error, not an anonymous gloo timeout.
- ``group``: a gloo process group with the profile's short timeout, for tensor-valued
  side traffic (digests), like the group PyTorch creates for its own compile-time
  collectives.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from hardening.errors import PeerLost
from hardening.runtime.store import SIDE_PREFIX


class SideChannel:
    """Per-rank handle on the store exchange and the gloo side group."""

    def __init__(self, store: dist.Store, *, rank: int, world_size: int, timeout_s: float) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.group: dist.ProcessGroup | None = None

    def create_group(self) -> None:
        """Create the gloo side group (collective: every rank calls it once, after init)."""
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))

    def exchange(self, tag: str, value: Any) -> list[Any]:
        """All-gather ``value`` (JSON-serializable) under a tag unique to this exchange."""
        keys = [f"{SIDE_PREFIX}/{tag}/{r}" for r in range(self.world_size)]
        self.store.set(keys[self.rank], json.dumps(value, sort_keys=True))
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception:  # the store raises a backend-specific timeout error
            missing = [r for r, key in enumerate(keys) if not self.store.check([key])]
            if not missing:  # arrived in the last instant
                return [json.loads(self.store.get(k)) for k in keys]
            raise PeerLost(
                f"rank(s) {', '.join(map(str, missing))} never arrived at side-channel step "
                f"{tag!r} within {self.timeout_s:g}s (dead, wedged, or on another code path)",
                root_cause_rank=missing[0],
            ) from None
        return [json.loads(self.store.get(k)) for k in keys]
