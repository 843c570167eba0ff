"""Warmup lockstep over a real store: equal plans run, unequal plans or shapes stop every rank first."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pytest
import torch

from hardening.errors import WarmupError
from hardening.runtime.sidechannel import SideChannel
from hardening.runtime.warmup import run_lockstep, shape_signature

from store_harness import run_ranks, side_channels


def _lockstep_on_two_ranks(
    port: int,
    *,
    num_calls: dict[int, int],
    first_call_id: int = 0,
    make_inputs: Callable[[int, int], Sequence[Any]],
) -> tuple[dict[int, Any], dict[int, list[int]], dict[int, list[int]]]:
    """Run run_lockstep on ranks 0 and 1; returns (result or exception, calls run, inputs made) per rank."""
    ran: dict[int, list[int]] = {0: [], 1: []}
    made: dict[int, list[int]] = {0: [], 1: []}

    def body(side: SideChannel) -> Any:
        rank = side.rank

        def inputs(call_id: int) -> Sequence[Any]:
            made[rank].append(call_id)
            return make_inputs(rank, call_id)

        return run_lockstep(
            side,
            num_calls=num_calls[rank],
            first_call_id=first_call_id,
            make_inputs=inputs,
            run_call=lambda call_id: ran[rank].append(call_id),
        )

    out = run_ranks(side_channels(port, 2), body)
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


def test_shape_signature() -> None:
    assert shape_signature([torch.zeros(2, 3, dtype=torch.bfloat16), 7]) == ["(2, 3):torch.bfloat16", "int"]
