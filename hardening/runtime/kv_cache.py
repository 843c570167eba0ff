"""KV-cache lifecycle: reset / advance / recompute as a lockstep state machine.

The envelope carries the operation and the ``cache_epoch``; every rank checks that the
transition follows from its own state before the data plane runs. A rank that skipped a
reset or advanced twice raises :class:`LifecycleError` instead of attending over the
wrong history (a head-sharded cache is never broadcast, so nothing else would notice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from hardening.errors import LifecycleError


@dataclass(kw_only=True, slots=True)
class CacheState:
    epoch: int = 0
    """Increments on every reset."""
    length: int = 0
    """Tokens written since the last reset (the cache keeps the newest ``capacity``)."""


class KVCacheLifecycle:
    """This rank's view of its cache; ``reset_fn`` clears the region's cache buffers."""

    def __init__(self, *, reset_fn: Callable[[], None] | None = None, checked: bool = True) -> None:
        self.state = CacheState()
        self.reset_fn = reset_fn or (lambda: None)
        self.checked = checked
        """False: transitions are applied unchecked (the unhardened baseline the benchmarks compare with)."""

    def validate(self, *, op: str, epoch: int, call_id: int) -> None:
        """Raise LifecycleError unless ``op`` at ``epoch`` follows from the local state."""
        s = self.state
        if op == "reset":
            if epoch != s.epoch + 1:
                raise LifecycleError(
                    f"call {call_id}: reset to epoch {epoch}, but this rank's cache is at epoch {s.epoch} "
                    f"(expected {s.epoch + 1}): a reset was skipped or repeated"
                )
        elif op in ("advance", "recompute"):
            if epoch != s.epoch:
                raise LifecycleError(
                    f"call {call_id}: {op} at epoch {epoch}, but this rank's cache is at epoch {s.epoch} "
                    f"holding {s.length} token(s) of another history: a reset was "
                    + ("skipped" if epoch > s.epoch else "applied that the leader did not send")
                )
            if op == "recompute" and s.length == 0:
                raise LifecycleError(f"call {call_id}: recompute on an empty cache (epoch {s.epoch})")
        else:
            raise LifecycleError(f"call {call_id}: unknown cache op {op!r}")


def apply_transition(lifecycle: KVCacheLifecycle, *, op: str, epoch: int, tokens: int, call_id: int) -> None:
    """Validate (unless the cache is unchecked), then apply. Called through
    :func:`hardening.runtime.seams.cache_transition`, where K-01 acts."""
    if lifecycle.checked:
        lifecycle.validate(op=op, epoch=epoch, call_id=call_id)
    s = lifecycle.state
    if op == "reset":
        lifecycle.reset_fn()
        s.epoch, s.length = epoch, 0
    s.length += tokens


class CacheSchedule:
    """The leader's plan: a new epoch (reset) every ``reset_every`` calls, else advance;
    the call before each reset recomputes over the cache with an explicit override."""

    def __init__(self, *, reset_every: int) -> None:
        self.reset_every = reset_every
        self.epoch = 0

    def plan(self, call_id: int) -> tuple[str, int, dict[str, Any]]:
        """(cache_op, cache_epoch, extra meta) of call ``call_id``."""
        every = self.reset_every
        if call_id == 0 or (every and call_id % every == 0):
            self.epoch += 1
            return "reset", self.epoch, {}
        if every and call_id % every == every - 1:
            return "recompute", self.epoch, {"recompute_override": {"window": "full"}}
        return "advance", self.epoch, {}
