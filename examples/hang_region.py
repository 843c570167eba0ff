"""A user region whose leader stalls while making the inputs of its first steady call.

Rank 0 (the leader, which makes every call's inputs and sends them in the envelope)
waits forever for a message that never comes; rank 1 is left waiting for the envelope.
With the default profile the watchdog turns this into a crash at the call deadline on
both ranks, each naming where it is stuck. With ``examples/no_watchdog.yaml``
nothing in the ranks reacts, and the runner's deadline shows the hang as it is:
outcome ``hung``, py-spy stacks of both ranks, nothing left running.
"""

import time

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from hardening.region import Region, RegionContext


class TPLinear(nn.Module):
    def __init__(self, ctx: RegionContext) -> None:
        super().__init__()
        hidden, world, rank = ctx.dims["hidden"], ctx.world_size, ctx.rank
        gen = torch.Generator().manual_seed(ctx.seed)
        w = torch.randn(hidden, hidden, generator=gen) / hidden**0.5
        shard = slice(rank * hidden // world, (rank + 1) * hidden // world)
        self.w = nn.Parameter(w[:, shard].contiguous(), requires_grad=False)
        self.group = ctx.group
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(F.linear(x[..., self.shard], self.w), "sum", self.group)


def wait_for_a_message_that_never_comes() -> None:
    while True:
        time.sleep(0.5)


def build(ctx: RegionContext) -> Region:
    module = TPLinear(ctx)
    first_steady_call = ctx.profile.warmup_calls

    def make_inputs(call_id: int):
        if call_id == first_steady_call:  # only the leader makes inputs
            wait_for_a_message_that_never_comes()
        gen = torch.Generator().manual_seed(ctx.seed * 7919 + call_id)
        return (torch.randn(ctx.dims["tokens"], ctx.dims["hidden"], generator=gen),)

    return Region(module=module, make_inputs=make_inputs)
