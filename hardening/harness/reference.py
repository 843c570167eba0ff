"""The reference region: one DiT-style transformer block, tensor-parallel over all ranks.

The shape of the users' real workload (a video diffusion generator on 2xH200, TP=2):
adaLN modulation (replicated), column-parallel QKV with heads sharded across ranks,
attention over a head-sharded sliding KV cache, row-parallel output projection followed
by a functional all-reduce, and a column/row-parallel MLP with a second all-reduce.
Every rank derives the full weights from ``region.seed`` and keeps its shard, so the
shards of all ranks reassemble the same dense block.
"""

from __future__ import annotations

import math

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from hardening.runtime.digest import checksum
from hardening.harness.region import Region, RegionContext


DIMS = ("hidden", "heads", "tokens", "cache", "mlp", "batch")


def validate_dims(dims: dict[str, int], world_size: int) -> None:
    """ValueError unless the dims shard evenly over ``world_size`` ranks."""
    missing = [d for d in DIMS if d not in dims]
    if missing:
        raise ValueError(f"dims: the reference region needs {', '.join(missing)}")
    unknown = sorted(set(dims) - set(DIMS))
    if unknown:
        raise ValueError(f"dims: the reference region has no dim(s) {', '.join(unknown)} (it reads {', '.join(DIMS)})")
    hidden, heads, mlp = dims["hidden"], dims["heads"], dims["mlp"]
    if heads % world_size or mlp % world_size or hidden % heads:
        raise ValueError(
            f"dims: heads ({heads}) and mlp ({mlp}) must divide by the {world_size} ranks and hidden ({hidden}) by heads"
        )


class TPDiTBlock(nn.Module):
    """One rank's shard of a DiT block; ``forward(x, c)`` issues two all-reduces."""

    def __init__(self, ctx: RegionContext) -> None:
        super().__init__()
        dims = ctx.dims
        hidden, heads, mlp = dims["hidden"], dims["heads"], dims["mlp"]
        self.batch, self.tokens, self.cache_len = dims["batch"], dims["tokens"], dims["cache"]
        world, rank = ctx.world_size, ctx.rank
        validate_dims(dims, world)
        self.group = ctx.group
        self.local_heads = heads // world
        self.head_dim = hidden // heads
        width = self.local_heads * self.head_dim
        gen = torch.Generator().manual_seed(ctx.seed)

        def dense(out_features: int, in_features: int) -> torch.Tensor:
            return torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features)

        # Draw the full weights in a fixed order on every rank, then keep this rank's shard.
        w_ada = dense(6 * hidden, hidden)
        w_q, w_k, w_v = dense(hidden, hidden), dense(hidden, hidden), dense(hidden, hidden)
        w_out = dense(hidden, hidden)
        w_fc1, w_fc2 = dense(mlp, hidden), dense(hidden, mlp)

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.contiguous().to(device=ctx.device, dtype=ctx.dtype), requires_grad=False)

        def shards(r: int) -> dict[str, torch.Tensor]:
            heads_r = slice(r * width, (r + 1) * width)
            mlp_r = slice(r * (mlp // world), (r + 1) * (mlp // world))
            return {
                "ada": w_ada,  # replicated
                "qkv": torch.cat([w_q[heads_r], w_k[heads_r], w_v[heads_r]]),  # column-parallel
                "out": w_out[:, heads_r],  # row-parallel
                "fc1": w_fc1[mlp_r],  # column-parallel
                "fc2": w_fc2[:, mlp_r],  # row-parallel
            }

        for name, tensor in shards(rank).items():
            setattr(self, name, param(tensor))
        # What every rank's shard must fingerprint to: every rank holds the full weights
        # here, so it can state the manifest of all ranks (a checkpoint would ship it).
        self.weight_manifest = {
            name: {r: checksum(t.contiguous().to(ctx.dtype)).tolist() for r, t in ((r, shards(r)[name]) for r in range(world))}
            for name in shards(rank)
        }
        cache_shape = (self.batch, self.local_heads, self.cache_len, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape, device=ctx.device, dtype=ctx.dtype))
        self.register_buffer("cache_v", torch.zeros(cache_shape, device=ctx.device, dtype=ctx.dtype))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = F.linear(F.silu(c), self.ada).chunk(6, dim=-1)
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale1[:, None]) + shift1[:, None]
        qkv = F.linear(h, self.qkv).view(b, t, 3, self.local_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        keys = torch.cat([self.cache_k, k], dim=2)
        values = torch.cat([self.cache_v, v], dim=2)
        attn = F.scaled_dot_product_attention(q, keys, values)
        # Sliding window: keep the newest cache_len positions; shapes never change, so no recompiles.
        self.cache_k.copy_(keys[:, :, t:])
        self.cache_v.copy_(values[:, :, t:])
        o = F.linear(attn.transpose(1, 2).reshape(b, t, -1), self.out)
        o = funcol.all_reduce(o, "sum", self.group)
        x = x + gate1[:, None] * o
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale2[:, None]) + shift2[:, None]
        m = F.linear(F.gelu(F.linear(h, self.fc1)), self.fc2)
        m = funcol.all_reduce(m, "sum", self.group)
        return x + gate2[:, None] * m


def build(ctx: RegionContext) -> Region:
    """Factory of the reference region (``hardening.harness.reference:build``)."""
    block = TPDiTBlock(ctx)
    hidden = ctx.dims["hidden"]

    def make_inputs(call_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + call_id)
        x = torch.randn(block.batch, block.tokens, hidden, generator=gen)
        c = torch.randn(block.batch, hidden, generator=gen)
        return x.to(ctx.device, ctx.dtype), c.to(ctx.device, ctx.dtype)

    def reset_cache() -> None:
        block.cache_k.zero_()
        block.cache_v.zero_()

    return Region(
        module=block,
        make_inputs=make_inputs,
        parity_keys={"reference.local_heads": block.local_heads, "reference.cache_len": block.cache_len},
        input_names=("x", "c"),
        weight_manifest=block.weight_manifest,
        replicated_params=("ada",),
        reset_cache=reset_cache,
    )
