"""The side channel: a store all-gather that knows which rank never arrived."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Iterator

import pytest
import torch.distributed as dist

from hardening.errors import PeerLost
from hardening.sidechannel import SideChannel


@pytest.fixture
def store_port() -> Iterator[int]:
    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    try:
        yield master.port
    finally:
        del master


def _side(port: int, rank: int, world_size: int, timeout_s: float) -> SideChannel:
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    return SideChannel(client, rank=rank, world_size=world_size, timeout_s=timeout_s)


def _run_ranks(sides: list[SideChannel], body) -> dict[int, Any]:
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
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a rank thread is stuck"
    return out


@pytest.mark.timeout(60)
def test_exchange_returns_values_in_rank_order(store_port: int) -> None:
    sides = [_side(store_port, r, 2, 5) for r in range(2)]
    out = _run_ranks(sides, lambda s: s.exchange("step/a", {"rank": s.rank, "v": [s.rank * 10]}))
    expected = [{"rank": 0, "v": [0]}, {"rank": 1, "v": [10]}]
    assert out == {0: expected, 1: expected}
    # A second exchange under another tag sees only its own values.
    out = _run_ranks(sides, lambda s: s.exchange("step/b", f"r{s.rank}"))
    assert out == {0: ["r0", "r1"], 1: ["r0", "r1"]}


@pytest.mark.timeout(60)
def test_exchange_with_three_ranks_in_reverse_arrival(store_port: int) -> None:
    sides = [_side(store_port, r, 3, 5) for r in range(3)]

    def body(side: SideChannel) -> list[Any]:
        time.sleep(0.1 * (2 - side.rank))  # rank 2 arrives first
        return side.exchange("order", side.rank)

    out = _run_ranks(sides, body)
    assert out == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}


@pytest.mark.timeout(60)
def test_rank_that_never_arrives_is_peer_lost(store_port: int) -> None:
    side = _side(store_port, 0, 2, 1)
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
    sides = [_side(store_port, r, 4, 1) for r in range(4)]
    # Ranks 0 and 2 arrive; 1 and 3 never do.
    out = _run_ranks([sides[0], sides[2]], lambda s: s.exchange("parity/hash", "h"))
    for rank in (0, 2):
        assert isinstance(out[rank], PeerLost), out[rank]
        assert "rank(s) 1, 3 never arrived" in str(out[rank])
