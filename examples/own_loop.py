"""Your own TP serving loop, hardened: one decorator and one Session.

    torchrun --nproc-per-node 2 examples/own_loop.py
    hardening suite operator --program examples/own_loop.py --ranks 2

Rank 0 makes each call's input and serves it in the envelope; every rank checks it and
runs its shard of a row-parallel projection (a functional all-reduce). Parity, warmup
lockstep, compile gates, the recompile guard, the weight check and every deadline come
from the Session, in its own order.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

import hardening.runtime as hr

HIDDEN, TOKENS, CALLS = 64, 8, 12


class RowParallel(nn.Module):
    def __init__(self, rank: int, world: int, seed: int) -> None:
        super().__init__()
        self.cols = slice(rank * HIDDEN // world, (rank + 1) * HIDDEN // world)
        full = torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(seed))
        self.w = nn.Parameter(full[:, self.cols].contiguous(), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(HIDDEN), requires_grad=False)  # the same on every rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(F.linear(x[..., self.cols], self.w), "sum", dist.group.WORLD) * self.scale


def make_inputs(call_id: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(call_id))}


@hr.record
def main() -> None:
    with hr.Session.from_env(hr.RuntimeConfig(), fingerprint={"model": "row-parallel-64", "seed": 0}) as s:
        model = RowParallel(s.rank, s.world_size, seed=s.user_keys["seed"])  # the seed every rank agreed on
        s.check_weights(model, replicated=("scale",))
        layer = s.compile(model)
        plane = s.control_plane({"x": hr.Spec(shape=(TOKENS, HIDDEN), dtype="float32")})
        plane.warmup(layer, calls=2, make_inputs=make_inputs)
        for call in plane.serve(CALLS, make_inputs=make_inputs):
            out = layer(call.x)
    print(f"rank {s.rank}: {CALLS} hardened calls, last output norm {out.norm():.3f}", flush=True)


if __name__ == "__main__":
    main()
