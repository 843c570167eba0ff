"""Token ids whose length changes every call, as in prefill followed by decode steps.

A tensor-parallel embedding + MLP over ``(1, T)`` token ids, with ``T`` growing by one
each call and wrapping around. The region declares the token dimension as varying
(``varying_dims``): the envelope contract then accepts any ``T`` within its bounds and
still refuses a dtype, rank or batch change. Whether a new ``T`` recompiles is the
compile gate's call:

    hardening suite compile --only C-00 --target examples/growing_tokens.py:build
        -> fails: "recompiled ... size mismatch at index 1" (compile.dynamic: false)
    with a profile saying  compile: {dynamic: true}
        -> passes: one graph with a symbolic T, no recompiles
"""

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from hardening.region import Region, RegionContext

VOCAB = 512


class TPEmbedMLP(nn.Module):
    def __init__(self, ctx: RegionContext) -> None:
        super().__init__()
        hidden, mlp, world, rank = ctx.dims["hidden"], ctx.dims["mlp"], ctx.world_size, ctx.rank
        gen = torch.Generator().manual_seed(ctx.seed)
        self.embed = nn.Parameter(torch.randn(VOCAB, hidden, generator=gen), requires_grad=False)
        up = torch.randn(mlp, hidden, generator=gen) / hidden**0.5
        down = torch.randn(hidden, mlp, generator=gen) / mlp**0.5
        shard = slice(rank * mlp // world, (rank + 1) * mlp // world)
        self.up = nn.Parameter(up[shard].contiguous(), requires_grad=False)
        self.down = nn.Parameter(down[:, shard].contiguous(), requires_grad=False)
        self.group = ctx.group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed)
        return h + funcol.all_reduce(F.linear(F.gelu(F.linear(h, self.up)), self.down), "sum", self.group)


def build(ctx: RegionContext) -> Region:
    tokens = ctx.dims["tokens"]

    def make_inputs(call_id: int):
        length = tokens + call_id % 4  # prefill, then a few decode steps, then a new request
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + call_id)
        return (torch.randint(0, VOCAB, (1, length), generator=gen).to(ctx.device),)

    module = TPEmbedMLP(ctx).to(ctx.device, ctx.dtype)
    return Region(
        module=module,
        make_inputs=make_inputs,
        input_names=("input_ids",),
        varying_dims={"input_ids": {1: (1, 4 * tokens)}},
        replicated_params=("embed",),
    )
