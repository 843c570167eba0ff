"""The side channel: a store all-gather that knows which rank never arrived."""

from __future__ import annotations

import time
from typing import Any

import pytest

from hardening.errors import PeerLost
from hardening.runtime.sidechannel import SideChannel

from store_harness import run_ranks, side_channel, side_channels


@pytest.mark.timeout(60)
def test_exchange_returns_values_in_rank_order(store_port: int) -> None:
    sides = side_channels(store_port, 2, 5)
    out = run_ranks(sides, lambda s: s.exchange("step/a", {"rank": s.rank, "v": [s.rank * 10]}))
    expected = [{"rank": 0, "v": [0]}, {"rank": 1, "v": [10]}]
    assert out == {0: expected, 1: expected}
    # A second exchange under another tag sees only its own values.
    out = run_ranks(sides, lambda s: s.exchange("step/b", f"r{s.rank}"))
    assert out == {0: ["r0", "r1"], 1: ["r0", "r1"]}


@pytest.mark.timeout(60)
def test_exchange_with_three_ranks_in_reverse_arrival(store_port: int) -> None:
    sides = side_channels(store_port, 3, 5)

    def body(side: SideChannel) -> list[Any]:
        time.sleep(0.1 * (2 - side.rank))  # rank 2 arrives first
        return side.exchange("order", side.rank)

    out = run_ranks(sides, body)
    assert out == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}


@pytest.mark.timeout(60)
def test_rank_that_never_arrives_is_peer_lost(store_port: int) -> None:
    side = side_channel(store_port, 0, 2, 1)
    started = time.monotonic()
    with pytest.raises(PeerLost) as info:
        side.exchange("warmup/2", {"planned": 2})
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 5.0
    msg = str(info.value)
    assert "rank(s) 1 never arrived" in msg
    assert "'warmup/2'" in msg and "1s" in msg


@pytest.mark.timeout(60)
def test_peer_lost_names_only_the_missing_ranks(store_port: int) -> None:
    sides = side_channels(store_port, 4, 1)
    # Ranks 0 and 2 arrive; 1 and 3 never do.
    out = run_ranks([sides[0], sides[2]], lambda s: s.exchange("parity/hash", "h"))
    for rank in (0, 2):
        assert isinstance(out[rank], PeerLost), out[rank]
        assert "rank(s) 1, 3 never arrived" in str(out[rank])
