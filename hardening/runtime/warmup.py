"""Warmup lockstep: every rank compiles on the same calls with the same shapes.

Before each warmup call the ranks exchange a ticket on the side channel (the planned
count, the step and, when the caller hands ``make_inputs``, the input shapes), and go
on only if every ticket is equal. A rank that plans fewer calls is caught at the first
ticket, before any compile, and one that feeds other shapes before that call's data
plane runs a mismatched collective: a :class:`WarmupError` on every rank instead of a
hang. (A Session's control plane hands no ``make_inputs``: its leader's envelope fixes
every call's shapes, and every receiver checks them against its own call contract.)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from hardening.errors import WarmupError

from hardening.runtime.sidechannel import SideChannel


def shape_signature(inputs: Sequence[Any]) -> list[str]:
    return [f"{tuple(t.shape)}:{t.dtype}" if hasattr(t, "shape") else type(t).__name__ for t in inputs]


def run_lockstep(
    side: SideChannel,
    *,
    num_calls: int,
    first_call_id: int,
    run_call: Callable[[int], Any],
    make_inputs: Callable[[int], Sequence[Any]] | None = None,
) -> int:
    """Run ``num_calls`` warmup calls in lockstep; returns the next call id.

    Every ticket carries the planned count, so a rank planning fewer calls is caught
    at the first ticket, before any compile; shapes are compared call by call.
    """
    call_id = first_call_id
    for k in range(num_calls + 1):
        if k < num_calls:
            shapes = shape_signature(make_inputs(call_id)) if make_inputs is not None else []
            ticket: dict[str, Any] = {"planned": num_calls, "step": k, "shapes": shapes}
        else:
            ticket = {"planned": num_calls, "step": k, "shapes": "end"}
        tickets = side.exchange(f"warmup/{k}", ticket)
        if any(t != tickets[0] for t in tickets):
            raise WarmupError(_describe(tickets))
        if k == num_calls:
            return call_id
        run_call(call_id)
        call_id += 1
    raise AssertionError("unreachable: the last ticket is the end ticket")


def _describe(tickets: list[dict[str, Any]]) -> str:
    planned = [t["planned"] for t in tickets]
    if len(set(planned)) > 1:
        head = "ranks plan different numbers of warmup calls:"
        lines = [f"  rank {r}: plans {n} warmup call(s)" for r, n in enumerate(planned)]
    else:
        head = f"ranks feed different inputs at warmup call {tickets[0]['step']}:"
        lines = [f"  rank {r}: {t['shapes'] if t['shapes'] == 'end' else ', '.join(t['shapes'])}" for r, t in enumerate(tickets)]
    return "\n".join([head, *lines])
