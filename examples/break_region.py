"""A user region with the most common graph break in real TP code: a host sync.

Column/row-parallel MLP whose forward checks its activations for overflow with
``.item()``. ``hardening suite compile --target examples/break_region.py:build`` fails
the compile gate (exit 1) and names the break; ``hardening baseline update`` records it,
and ``suite compile --baseline FILE`` then passes until a break is added.

The check reads a bool, not the float itself: under ``dynamic: false`` a float that
``.item()`` hands to the code after the break is a constant of the resumed graph, and
every new value recompiles it (the baseline would record recompiles after warmup).
"""

import warnings

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from hardening.region import Region, RegionContext


class LoggingTPMLP(nn.Module):
    def __init__(self, ctx: RegionContext) -> None:
        super().__init__()
        hidden, mlp, world, rank = ctx.dims["hidden"], ctx.dims["mlp"], ctx.world_size, ctx.rank
        gen = torch.Generator().manual_seed(ctx.seed)
        w1 = torch.randn(mlp, hidden, generator=gen) / hidden**0.5
        w2 = torch.randn(hidden, mlp, generator=gen) / mlp**0.5
        shard = slice(rank * mlp // world, (rank + 1) * mlp // world)
        self.fc1 = nn.Parameter(w1[shard].contiguous(), requires_grad=False)
        self.fc2 = nn.Parameter(w2[:, shard].contiguous(), requires_grad=False)
        self.group = ctx.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.fc1))
        if (h.abs().max() > 1e4).item():  # the break: a device-to-host sync, for a warning
            warnings.warn("LoggingTPMLP: activation overflow")
        return funcol.all_reduce(F.linear(h, self.fc2), "sum", self.group)


def build(ctx: RegionContext) -> Region:
    module = LoggingTPMLP(ctx)

    def make_inputs(call_id: int):
        gen = torch.Generator().manual_seed(ctx.seed * 7919 + call_id)
        return (torch.randn(ctx.dims["tokens"], ctx.dims["hidden"], generator=gen),)

    return Region(module=module, make_inputs=make_inputs)
