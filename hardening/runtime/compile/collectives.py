"""Rank-divergent collectives, caught before a compiled graph issues them.

The classic TP hang is a collective only some ranks issue (``if rank == 0:
all_reduce(...)``): the ranks that issue it wait for the process-group timeout. Every
graph Dynamo hands the counting backend has its collectives read from the FX graph
(:func:`hardening.runtime.activity.collective_signature`). During warmup, before a graph
with collectives runs, its rank publishes them at their positions in the call's sequence
of compiled collectives, then waits until every peer has reached the graph's first
position (and compares all it has reached), has ended its call with fewer (the
mismatch), or sits in a collective this check cannot see (an eager one: undecided, the
graph runs and the call deadline stays the bound). Waiting for the first position only
is what lets ranks whose graphs split differently (a break on one rank only) go on:
neither needs the other past a collective it has not issued yet. A rank that ends a
warmup call compares the rest of the sequence with every peer's, which also catches a
peer that has collectives past this rank's last one.

Two signatures agree when they are equal, the user's line included when both carry one:
ranks running the same TP code issue each collective from the same line, and an extra
collective of the same shape is then named where it is, not at the end where the
lengths differ. (A program that issues one collective from two branches on different
ranks fails the check: ``compile.check_collectives: false``.) Steady state costs one
attribute read per graph call: the check is off after warmup.

Store keys (under the session's prefix): ``cc/<call>/<rank>/<position>`` a signature,
``cc/<call>/end/<rank>`` how many the rank issued in the call, ``cc/<call>/mismatch``
the first rank's verdict, which every rank raises, word for word.

Not compared: collectives no Dynamo graph holds (eager code, DTensor, which issues its
own as it runs), and collectives on a group smaller than the world (a TP x DP mesh):
every rank is compared with every other, so those are left out and said to be
(:attr:`CollectiveCheck.undecided`) until groups are told apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, NoReturn

from hardening.errors import CompileGateError
from hardening.runtime import activity
from hardening.runtime import store as store_keys

PREFIX = "cc"
_NONE = "none"


def group_size(name: str) -> int | None:
    """How many ranks the process group ``name`` has, or None when this torch cannot say
    (its private resolver moved) or the name is not a group here."""
    if not name:
        return None
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return int(_resolve_process_group(name).size())
    except Exception:  # noqa: BLE001 - feature-detected: the whole world is assumed
        return None


def same(a: str, b: str) -> bool:
    """Two collective signatures agree: equal, the line compared only when both have one
    (one node may run the code from a checkout, another from site-packages)."""
    if a == b:
        return True
    if " at " in a and " at " in b:
        return False
    return activity.without_location(a) == activity.without_location(b)


class CollectiveCheck:
    """One per rank. :meth:`wrap` is applied by the counting backend to every graph;
    :meth:`begin_call`/:meth:`end_call` bracket each warmup call (the check is active
    only between them)."""

    def __init__(
        self, store: Any, *, rank: int, world_size: int, timeout_s: float, poll_s: float = 0.002, blocked_s: float = 1.0
    ) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.blocked_s = blocked_s
        """How long a peer must stay blocked in a collective no graph announced, while this
        rank waits at one of its own, before that is named a divergence (a heartbeat may
        be a beat old: the peer may just have left an eager collective both ranks issued)."""
        self.active = False
        self.call_id: int | None = None
        self.mine: list[str] = []
        """This rank's signatures in the current call, in order."""
        self.verified: dict[int, int] = {}
        """Per peer: how many positions of the current call were compared with its."""
        self.undecided: list[str] = []
        """Why a comparison could not be made (a peer in a collective this check cannot see)."""
        self.checked_s = 0.0
        """Time spent publishing, waiting and comparing, over the whole run (the cost, for bench/)."""

    @property
    def peers(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    # -- the backend's side --------------------------------------------------------------

    def wrap(self, gm: Any, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """``compiled`` checking its collectives against every peer's before it runs, while
        active. A graph without collectives is returned as it is."""
        signatures = []
        for node in activity.graph_collective_nodes(gm):
            group = activity.collective_group(node)
            size = group_size(group)
            if size is not None and size < self.world_size:
                # A subgroup's members are compared with ranks outside it otherwise (a TP x DP
                # mesh): left out, and said, rather than a false alarm on a correct program.
                note = f"collectives on group {group!r} ({size} of {self.world_size} ranks) are not compared (subgroups are not yet)"
                if note not in self.undecided:
                    self.undecided.append(note)
                continue
            signatures.append(activity.collective_signature(node))
        if not signatures or self.world_size < 2:
            return compiled
        return activity.around_each_run(compiled, before=lambda: self.before_graph(signatures) if self.active else None)

    # -- the call's side -------------------------------------------------------------------

    def begin_call(self, call_id: int) -> None:
        self.call_id, self.active = call_id, True
        self.mine, self.verified = [], dict.fromkeys(self.peers, 0)

    def before_graph(self, signatures: list[str]) -> None:
        """Publish this graph's collectives at their positions; compare each peer's up to
        this graph's first one, waiting until the peer gets there."""
        started = time.monotonic()
        base = len(self.mine)
        self.mine += signatures
        try:
            keys = [self._key(self.rank, base + i) for i in range(len(signatures))]
            if hasattr(self.store, "multi_set"):  # torch >= 2.5: one request for the graph
                self.store.multi_set(keys, signatures)
            else:
                for key, sig in zip(keys, signatures):
                    self.store.set(key, sig)
            for peer in self.peers:
                reached = self._wait_for(peer, base)
                if reached is not None:
                    self._compare(peer, reached)
        finally:
            self.checked_s += time.monotonic() - started

    def end_call(self) -> None:
        """This rank issued all its compiled collectives of the call: say how many, then
        compare the rest of the sequence with every peer's."""
        if not self.active:
            return
        self.active = False
        started = time.monotonic()
        try:
            self.store.set(self._key("end", self.rank), str(len(self.mine)))
            for peer in self.peers:
                reached = self._wait_for(peer, len(self.mine), at_end=True)
                if reached is not None:
                    self._compare(peer, reached, ended=True)
        finally:
            self.checked_s += time.monotonic() - started

    # -- comparing ---------------------------------------------------------------------------

    def _compare(self, peer: int, reached: tuple[int, bool], *, ended: bool = False) -> None:
        """Compare the positions the peer has published since the last comparison.
        ``reached``: how many it has published for sure, and whether that is its end."""
        count, peer_ended = reached
        start = self.verified[peer]
        upto = min(count, len(self.mine))
        theirs = self._published(peer, start, upto)
        for offset, (a, b) in enumerate(zip(self.mine[start:upto], theirs)):
            if not same(a, b):
                self._mismatch(peer, start + offset, b)
        self.verified[peer] = upto
        if peer_ended and count < len(self.mine):
            self._mismatch(peer, count, None)  # the peer ended its call without this one
        if ended and count > len(self.mine):
            self._mismatch(peer, len(self.mine), self._published(peer, len(self.mine), len(self.mine) + 1)[0])

    def _mismatch(self, peer: int, position: int, theirs: str | None) -> None:
        """Name the position where the two sequences differ, as every rank will."""
        mine = self.mine[position] if position < len(self.mine) else None
        by_rank = sorted(((self.rank, mine), (peer, theirs)))
        parts = [f"rank {r}: {sig if sig is not None else _NONE}" for r, sig in by_rank]
        self._decide(
            f"collectives differ across ranks in call {self.call_id}, before the graph that issues collective "
            f"{position + 1} runs: " + "; ".join(parts)
        )

    def _decide(self, message: str) -> NoReturn:
        """Raise the call's verdict: the first rank's words (first writer wins), so that
        every rank raises the same."""
        key = self._key("mismatch")
        self.store.compare_set(key, "", message)
        raise CompileGateError(self.store.get(key).decode())

    # -- waiting -----------------------------------------------------------------------------

    def _wait_for(self, peer: int, position: int, *, at_end: bool = False) -> tuple[int, bool] | None:
        """Wait until ``peer`` has published ``position`` or ended its call. Returns how
        many positions it has published for sure and whether it ended; None when that
        cannot be known (noted in :attr:`undecided`): the wait timed out, or, at this
        rank's end, the peer is blocked in a collective this check does not see.

        A peer that stays blocked for :attr:`blocked_s` in a collective no graph announced
        is undecided at this rank's end; before one of this rank's own collectives (not
        ``at_end``) it is the divergence itself (same code issues the same collectives in the same order): named, with
        where the peer is, rather than run into a collective that pairs with the wrong one
        (gloo aborts the process on a size mismatch; NCCL may compute garbage)."""
        tag = f"collective check, call {self.call_id}, collective {position + 1}"  # also what activity.sample shows
        deadline = time.monotonic() + self.timeout_s
        pause = self.poll_s
        end_key, at_key = self._key("end", peer), self._key(peer, position)
        blocked_since: float | None = None
        while True:
            self._raise_if_decided()
            if self._has(end_key):
                return int(self.store.get(end_key)), True
            if self._has(at_key):
                return position + 1, False
            # A peer seen in a collective may just be finishing one both ranks issued (its
            # heartbeat is a beat old, or it waits on the last result): only one it stays in
            # for blocked_s counts.
            doing = self._peer_in_collective(peer)
            if doing is None:
                blocked_since = None
            elif blocked_since is None:
                blocked_since = time.monotonic()
            elif time.monotonic() - blocked_since >= self.blocked_s and not self._has(at_key) and not self._has(end_key):
                if not at_end:
                    self._unannounced(peer, position, doing)
                self.undecided.append(f"{tag}: rank {peer} stayed in a collective no compiled graph announced ({doing})")
                return None
            if time.monotonic() > deadline:
                self.undecided.append(f"{tag}: rank {peer} announced nothing within {self.timeout_s:g}s")
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _peer_in_collective(self, peer: int) -> str | None:
        """What the peer's last heartbeat says it is blocked in, when that is a collective
        in this very call; else None."""
        key = store_keys.key("hb", peer)
        if not self._has(key):
            return None
        try:
            beat = json.loads(self.store.get(key))
        except ValueError:
            return None
        if beat.get("activity") != activity.COLLECTIVE or beat.get("call_id") != self.call_id:
            return None
        return str(beat.get("doing") or "a collective")

    def _unannounced(self, peer: int, position: int, doing: str) -> None:
        """This rank is about to issue ``position``; the peer sits in a collective no
        compiled graph announced."""
        self._decide(
            f"collectives differ across ranks in call {self.call_id}, before the graph that issues collective "
            f"{position + 1} runs: rank {self.rank}: {self.mine[position]}; rank {peer}: none announced, "
            f"blocked {self.blocked_s:g}s in a collective no compiled graph holds: {doing}"
        )

    def _raise_if_decided(self) -> None:
        """A rank that finds the call already decided (another rank saw the collectives
        differ) raises the same words, before its graph runs."""
        key = self._key("mismatch")
        if self._has(key):
            raise CompileGateError(self.store.get(key).decode())

    # -- the store -----------------------------------------------------------------------

    def _key(self, *parts: Any) -> str:
        return "/".join([PREFIX, str(self.call_id), *map(str, parts)])

    def _has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def _published(self, rank: int, start: int, stop: int) -> list[str]:
        """Positions [start, stop) of ``rank``, all known to be in the store (a missing key would block)."""
        keys = [self._key(rank, i) for i in range(start, stop)]
        if not keys:
            return []
        values = self.store.multi_get(keys) if hasattr(self.store, "multi_get") else [self.store.get(k) for k in keys]
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
