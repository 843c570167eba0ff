"""A tensor-parallel block written the way torch's own TP tutorial writes it: a plain
``nn.Module`` made parallel by ``parallelize_module`` on a ``DeviceMesh``.

Attention projections and the MLP are column-/row-parallel DTensors; the norm stays a
plain replicated tensor; the row-parallel layers' biases are ``Replicate`` DTensors.
Nothing here knows about the harness except the factory signature, so you can copy it:

    hardening suite all --ranks 2 --target examples/dtensor_block.py:build
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from hardening.region import Region, RegionContext


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.o = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, mlp, bias=False)
        self.down = nn.Linear(mlp, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm(x)
        # Column-parallel projections hold heads/world heads on each rank: -1 infers them.
        q, k, v = (p(h).view(b, t, -1, h.shape[-1] // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.norm(x))))


def build(ctx: RegionContext) -> Region:
    dims = ctx.dims
    hidden, heads, mlp, tokens = dims["hidden"], dims["heads"], dims["mlp"], dims["tokens"]
    torch.manual_seed(ctx.seed)  # the same full weights on every rank before sharding
    block = Block(hidden, heads, mlp).to(ctx.device, ctx.dtype)
    # The mesh over the group the harness hands in: every rank for TP, a pipeline's mesh
    # ranks (1..N-1) for the pp suite.
    mesh = DeviceMesh.from_group(ctx.group, ctx.device.type)
    parallelize_module(
        block,
        mesh,
        {
            "q": ColwiseParallel(),
            "k": ColwiseParallel(),
            "v": ColwiseParallel(),
            "o": RowwiseParallel(),
            "up": ColwiseParallel(),
            "down": RowwiseParallel(),
        },
    )
    block.eval().requires_grad_(False)  # inference: no autograd state in the compiled graphs

    def make_inputs(call_id: int):
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + call_id)
        return (torch.randn(1, tokens, hidden, generator=gen).to(ctx.device, ctx.dtype),)

    return Region(module=block, make_inputs=make_inputs, input_names=("hidden_states",), replicated_params=("norm.weight", "norm.bias"))
