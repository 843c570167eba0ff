"""Warmup lockstep over a real store: equal plans run, unequal plans or shapes stop every rank first."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch
import torch.distributed as dist

from hardening.errors import WarmupError
from hardening.profile import load_profile
from hardening.sidechannel import SideChannel
from hardening.warmup import planned_warmup_calls, run_lockstep, shape_signature


@pytest.fixture
def store_port() -> Iterator[int]:
    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    try:
        yield master.port
    finally:
        del master


def _lockstep_on_two_ranks(
    port: int,
    *,
    num_calls: dict[int, int],
    first_call_id: int = 0,
    make_inputs: Callable[[int, int], Sequence[Any]],
) -> tuple[dict[int, Any], dict[int, list[int]], dict[int, list[int]]]:
    """Run run_lockstep on ranks 0 and 1; returns (result or exception, calls run, inputs made) per rank."""
    out: dict[int, Any] = {}
    ran: dict[int, list[int]] = {0: [], 1: []}
    made: dict[int, list[int]] = {0: [], 1: []}
    sides = {
        r: SideChannel(dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10)),
                       rank=r, world_size=2, timeout_s=5)
        for r in range(2)
    }

    def target(rank: int) -> None:
        def inputs(call_id: int) -> Sequence[Any]:
            made[rank].append(call_id)
            return make_inputs(rank, call_id)

        try:
            out[rank] = run_lockstep(
                sides[rank],
                num_calls=num_calls[rank],
                first_call_id=first_call_id,
                make_inputs=inputs,
                run_call=lambda call_id: ran[rank].append(call_id),
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out[rank] = exc

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a rank thread is stuck"
    return out, ran, made


def _same_inputs(rank: int, call_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 8, 64), torch.zeros(1, 64)


@pytest.mark.timeout(60)
def test_equal_plans_run_every_call_in_order(store_port: int) -> None:
    out, ran, _ = _lockstep_on_two_ranks(store_port, num_calls={0: 3, 1: 3}, first_call_id=5, make_inputs=_same_inputs)
    assert out == {0: 8, 1: 8}
    assert ran == {0: [5, 6, 7], 1: [5, 6, 7]}


@pytest.mark.timeout(60)
def test_fewer_planned_calls_fail_both_ranks_before_any_call(store_port: int) -> None:
    out, ran, _ = _lockstep_on_two_ranks(store_port, num_calls={0: 3, 1: 2}, make_inputs=_same_inputs)
    for rank in (0, 1):
        assert isinstance(out[rank], WarmupError), f"rank {rank}: {out[rank]!r}"
        msg = str(out[rank])
        assert "plans" in msg
        assert "rank 0: plans 3 warmup call(s)" in msg and "rank 1: plans 2 warmup call(s)" in msg
    assert ran == {0: [], 1: []}


@pytest.mark.timeout(60)
def test_different_shapes_fail_both_ranks_naming_the_shapes(store_port: int) -> None:
    def inputs(rank: int, call_id: int) -> tuple[torch.Tensor]:
        return (torch.zeros(2, 3 if rank == 0 else 4),)

    out, ran, _ = _lockstep_on_two_ranks(store_port, num_calls={0: 2, 1: 2}, make_inputs=inputs)
    for rank in (0, 1):
        assert isinstance(out[rank], WarmupError), f"rank {rank}: {out[rank]!r}"
        msg = str(out[rank])
        assert "warmup call 0" in msg
        assert "rank 0: (2, 3):torch.float32" in msg and "rank 1: (2, 4):torch.float32" in msg
    assert ran == {0: [], 1: []}


@pytest.mark.timeout(60)
def test_shapes_diverging_at_a_later_call_stop_there(store_port: int) -> None:
    def inputs(rank: int, call_id: int) -> tuple[torch.Tensor]:
        return (torch.zeros(2, 5 if (rank == 1 and call_id == 1) else 3),)

    out, ran, _ = _lockstep_on_two_ranks(store_port, num_calls={0: 3, 1: 3}, make_inputs=inputs)
    for rank in (0, 1):
        assert isinstance(out[rank], WarmupError)
        assert "warmup call 1" in str(out[rank]) and "(2, 5)" in str(out[rank])
    assert ran == {0: [0], 1: [0]}


def test_shape_signature_and_planned_calls() -> None:
    assert shape_signature([torch.zeros(2, 3, dtype=torch.bfloat16), 7]) == ["(2, 3):torch.bfloat16", "int"]
    profile = load_profile("premerge")
    assert planned_warmup_calls(profile) == profile.warmup_calls == 3
