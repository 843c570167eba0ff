"""Rank-divergent collectives, caught before a compiled graph issues them.

The classic TP hang is a collective only some ranks issue (``if rank == 0:
all_reduce(...)``): the ranks that issue it wait for the process-group timeout. Every
graph Dynamo hands the counting backend has its collectives read from the FX graph
(:func:`hardening.runtime.activity.collective_signature`); during warmup, before a graph
with collectives runs, the rank publishes them at their positions in the call's sequence
of compiled collectives and waits for each peer to publish the same positions, to end
its call with fewer (it has none there: the mismatch), or to be blocked in a collective
this check cannot see (an eager one: undecidable, the graph runs and the call deadline
stays the bound). A rank that ends a warmup call checks the whole sequence against every
peer's, which also catches a peer that has collectives past this rank's last one.

Positions, not graphs, are compared: ranks whose graphs legitimately differ (a break on
one rank only) must still agree on what they communicate, and do. Signatures include the
user's line that issued the collective: ranks running the same TP code issue each one
from the same line, and an extra collective of the same shape is then named where it is,
not at the last position, where the sequences' lengths first differ.
Steady state costs one attribute read per graph call: the check is off after warmup,
where the recompile guard stops any new graph.

Store keys (under the case prefix): ``cc/<call>/<rank>/<position>`` a signature,
``cc/<call>/end/<rank>`` how many the rank issued in the call, ``cc/<call>/mismatch``
the first rank's verdict, which every rank raises, word for word.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from hardening.errors import CompileGateError
from hardening.runtime import activity
from hardening.runtime import store as store_keys

PREFIX = "cc"
_NONE = "none"


class CollectiveCheck:
    """One per rank. :meth:`wrap` is applied by the counting backend to every graph;
    :meth:`begin_call`/:meth:`end_call` bracket each warmup call (the check is active
    only between them)."""

    def __init__(self, store: Any, *, rank: int, world_size: int, timeout_s: float, poll_s: float = 0.002) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.active = False
        self.call_id: int | None = None
        self.position = 0
        self.undecided: list[str] = []
        """Why a comparison could not be made (a peer in a collective this check cannot see)."""
        self.checked_s = 0.0
        """Time spent publishing and waiting, over the whole run (the cost, for bench/)."""

    @property
    def peers(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    # -- the backend's side --------------------------------------------------------------

    def wrap(self, gm: Any, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """``compiled`` checking its collectives against every peer's before it runs, while
        active. A graph without collectives is returned as it is."""
        signatures = activity.graph_collective_signatures(gm)
        if not signatures or self.world_size < 2:
            return compiled
        check = self

        if getattr(compiled, "_boxed_call", False):  # inductor's convention: one list, consumed

            def run_boxed(args: Any) -> Any:
                if check.active:
                    check.before_graph(signatures)
                return compiled(args)

            run_boxed._boxed_call = True  # type: ignore[attr-defined]
            return run_boxed

        def run(*args: Any) -> Any:
            if check.active:
                check.before_graph(signatures)
            return compiled(*args)

        return run

    # -- the call's side -------------------------------------------------------------------

    def begin_call(self, call_id: int) -> None:
        self.call_id, self.position, self.active = call_id, 0, True

    def end_call(self) -> None:
        """This rank issued all its compiled collectives of the call: say how many, then
        compare the whole sequence with every peer's."""
        if not self.active:
            return
        self.active = False
        started = time.monotonic()
        try:
            self.store.set(self._key("end", self.rank), str(self.position))
            mine = self._published(self.rank, 0, self.position)
            for peer in self.peers:
                got = self._wait_for(peer, self.position, upto_end=True)
                if got is None:
                    continue
                if got != mine:
                    self._mismatch(peer, mine, got)
        finally:
            self.checked_s += time.monotonic() - started

    def before_graph(self, signatures: list[str]) -> None:
        """Publish this graph's collectives at their positions; wait for the peers' there."""
        started = time.monotonic()
        base = self.position
        self.position += len(signatures)
        try:
            keys = [self._key(self.rank, base + i) for i in range(len(signatures))]
            if hasattr(self.store, "multi_set"):  # torch >= 2.5: one request for the graph
                self.store.multi_set(keys, signatures)
            else:
                for key, sig in zip(keys, signatures):
                    self.store.set(key, sig)
            mine = self._published(self.rank, 0, self.position)
            for peer in self.peers:
                theirs = self._wait_for(peer, self.position)
                if theirs is not None and _differs(mine, theirs):
                    self._mismatch(peer, mine, theirs)
        finally:
            self.checked_s += time.monotonic() - started

    # -- waiting -----------------------------------------------------------------------------

    def _wait_for(self, peer: int, upto: int, *, upto_end: bool = False) -> list[str] | None:
        """The peer's signatures at positions [0, ``upto``), shorter if it ended its call
        with fewer; with ``upto_end``, the peer's whole sequence (waiting for its end, or
        for a position past ``upto``: it has more). None when it cannot be known: the peer
        is blocked in a collective this check does not see, or the wait timed out."""
        deadline = time.monotonic() + self.timeout_s
        pause = self.poll_s
        end_key = self._key("end", peer)
        while True:
            self._raise_if_decided()
            if self._has(end_key):
                return self._published(peer, 0, int(self.store.get(end_key)))
            if upto_end:
                if self._has(self._key(peer, upto)):  # the peer issues more than this rank did
                    return self._published(peer, 0, upto + 1)
            elif upto == 0 or self._has(self._key(peer, upto - 1)):
                return self._published(peer, 0, upto)
            if self._peer_in_collective(peer) and not self._has(self._key(peer, max(upto - 1, 0))):
                self.undecided.append(
                    f"call {self.call_id}: rank {peer} was in a collective no compiled graph announced (eager?)"
                )
                return None
            if time.monotonic() > deadline:
                self.undecided.append(f"call {self.call_id}: rank {peer} announced nothing within {self.timeout_s:g}s")
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _peer_in_collective(self, peer: int) -> bool:
        key = store_keys.key("hb", peer)
        if not self._has(key):
            return False
        try:
            return json.loads(self.store.get(key)).get("activity") == activity.COLLECTIVE
        except ValueError:
            return False

    def _raise_if_decided(self) -> None:
        key = self._key("mismatch")
        if self._has(key):
            raise CompileGateError(self.store.get(key).decode())

    def _mismatch(self, peer: int, mine: list[str], theirs: list[str]) -> None:
        """Name the first position where the two sequences differ, as every rank will."""
        i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        low, high = sorted((self.rank, peer))
        seq = {self.rank: mine, peer: theirs}
        parts = [f"rank {r}: {seq[r][i] if i < len(seq[r]) else _NONE}" for r in (low, high)]
        message = (
            f"collectives differ across ranks in call {self.call_id}, before the graph that issues collective {i + 1} runs: "
            + "; ".join(parts)
        )
        key = self._key("mismatch")
        # First writer wins, so that every rank raises the same words.
        self.store.compare_set(key, "", message)
        raise CompileGateError(self.store.get(key).decode())

    # -- the store -----------------------------------------------------------------------

    def _key(self, *parts: Any) -> str:
        return "/".join([PREFIX, str(self.call_id), *map(str, parts)])

    def _has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def _published(self, rank: int, start: int, stop: int) -> list[str]:
        keys = [self._key(rank, i) for i in range(start, stop)]
        if not keys:
            return []
        values = self.store.multi_get(keys) if hasattr(self.store, "multi_get") else [self.store.get(k) for k in keys]
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _differs(mine: list[str], theirs: list[str]) -> bool:
    """A peer that published fewer positions than this rank ended its call there."""
    return len(theirs) < len(mine) or any(a != b for a, b in zip(mine, theirs))
