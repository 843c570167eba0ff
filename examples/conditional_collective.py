"""A region with the classic TP hang: a collective only one rank issues.

Rank 0 all-reduces inside ``forward``, rank 1 does not (a branch on the rank, as code
that logs or debugs "on the first rank only" does). Without the runtime both ranks wait
for the process-group timeout (30 s here, 1800 s with gloo's default, 600 s NCCL's).
With it, every rank raises ``CompileGateError: collectives differ across ranks in call 0
... rank 0: all_reduce(sum) of float32 (8, 64) on group '0' at conditional_collective.py:32;
rank 1: none`` right after the first compile, before rank 0 issues it. With
``compile: {check_collectives: false}`` the first warmup call ends at
``timeouts.call_deadline`` instead: rank 0 names the collective it is blocked in.

    hardening suite compile --only C-00 --target examples/conditional_collective.py:build
"""

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn

from hardening.region import Region, RegionContext


class RankConditional(nn.Module):
    def __init__(self, ctx: RegionContext) -> None:
        super().__init__()
        self.rank, self.group = ctx.rank, ctx.group
        gen = torch.Generator().manual_seed(ctx.seed)
        self.w = nn.Parameter(torch.randn(ctx.dims["hidden"], generator=gen), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.w
        if self.rank == 0:  # a collective only rank 0 issues
            y = funcol.all_reduce(y, "sum", self.group)
        return torch.tanh(y)


def build(ctx: RegionContext) -> Region:
    def make_inputs(call_id: int):
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + call_id)
        return (torch.randn(ctx.dims["tokens"], ctx.dims["hidden"], generator=gen).to(ctx.device, ctx.dtype),)

    return Region(module=RankConditional(ctx).to(ctx.device, ctx.dtype), make_inputs=make_inputs)
